"""The RLlib edge: build a PPO algorithm for one client, read and write its weights.

Nothing outside this module touches RLlib types; the rest of the platform sees weights as
``dict[str, np.ndarray]`` and the policy as a plain torch :class:`SlateScorer`.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from ray.rllib.algorithms.algorithm import Algorithm
from ray.rllib.algorithms.ppo import PPOConfig
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.tune.registry import register_env

from envs.rec_env import ShapedRewardWrapper, SlateRecEnv
from envs.types import ClientData
from fedrlhf_ray.config import EnvConfig, PPOSettings
from fedrlhf_ray.policy import SlatePolicyModule, SlateScorer

# RLlib warns on every build that PPO runs on the new API stack, which is what we want.
logging.getLogger("ray.rllib.algorithms.algorithm_config").setLevel(logging.ERROR)


def env_kwargs(env: EnvConfig) -> dict[str, Any]:
    """The :class:`SlateRecEnv` keyword arguments an :class:`EnvConfig` stands for."""
    return {
        "slate_size": env.slate_size,
        "session_length": env.session_length,
        "history_length": env.history_length,
        "positives_per_slate": env.positives_per_slate,
        "like_threshold": env.like_threshold,
    }


ENV_NAME = "fedrlhf-shaped-slate"


def make_shaped_env(ctx: Any) -> ShapedRewardWrapper:
    """RLlib env creator: the client's training env with reward shaping.

    ``ctx`` is RLlib's ``EnvContext`` over the env config written by :func:`build_ppo`; the
    worker and vector indices enter the seed so that no two envs share a random stream.
    """
    worker = getattr(ctx, "worker_index", 0)
    vector = getattr(ctx, "vector_index", 0)
    seed = int(np.random.SeedSequence([ctx["seed"], worker, vector]).generate_state(1)[0])
    env = SlateRecEnv(ctx["client"], mode="train", seed=seed, **ctx["env_kwargs"])
    return ShapedRewardWrapper(env, lam=ctx["lam"])


register_env(ENV_NAME, make_shaped_env)


def build_ppo(
    client: ClientData, env: EnvConfig, ppo: PPOSettings, lam: float, seed: int
) -> Algorithm:
    """One in-process PPO algorithm (no remote env runners: a client is already an actor)."""
    config = (
        PPOConfig()
        .environment(
            env=ENV_NAME,
            env_config={"client": client, "env_kwargs": env_kwargs(env), "lam": lam, "seed": seed},
        )
        .env_runners(num_env_runners=0, num_envs_per_env_runner=ppo.num_envs)
        .training(
            lr=ppo.lr,
            gamma=ppo.gamma,
            lambda_=ppo.lambda_gae,
            clip_param=ppo.clip_param,
            entropy_coeff=ppo.entropy_coeff,
            vf_loss_coeff=ppo.vf_loss_coeff,
            train_batch_size_per_learner=ppo.train_batch_size,
            minibatch_size=ppo.minibatch_size,
            num_epochs=ppo.num_epochs,
        )
        .rl_module(
            rl_module_spec=RLModuleSpec(
                module_class=SlatePolicyModule,
                model_config={
                    "hidden": ppo.hidden,
                    "embedding_dim": ppo.embedding_dim,
                    "n_items": client.catalog.n_items,
                    "n_features": client.catalog.n_features,
                },
            )
        )
        .reporting(metrics_num_episodes_for_smoothing=20)
        .debugging(seed=seed, log_level="ERROR")
    )
    return config.build_algo()


def get_weights(algo: Algorithm) -> dict[str, np.ndarray]:
    """Every parameter (policy and value head) from the learner, as numpy arrays."""
    weights = algo.learner_group.get_weights()[DEFAULT_MODULE_ID]
    return {name: np.asarray(value).copy() for name, value in weights.items()}


def set_weights(algo: Algorithm, weights: dict[str, np.ndarray]) -> None:
    """Load weights into the learner AND the env runner that acts.

    ``algo.set_weights`` leaves env runners acting with stale weights (they only accept a
    newer ``weights_seq_no``); a state without a sequence number forces the update.
    """
    algo.learner_group.set_weights({DEFAULT_MODULE_ID: weights})
    algo.env_runner_group.foreach_env_runner(
        lambda runner: runner.set_state({"rl_module": {DEFAULT_MODULE_ID: weights}}),
        local_env_runner=True,
    )


def acting_weights(algo: Algorithm) -> dict[str, np.ndarray]:
    """The weights of the local env runner's module: the policy that actually samples."""
    module = algo.env_runner.module
    return {k: v.detach().cpu().numpy().copy() for k, v in module.state_dict().items()}


def set_reward_table(algo: Algorithm, table: np.ndarray, lam: float | None = None) -> None:
    """Give every training env the client's refreshed reward-model scores."""
    algo.env_runner_group.foreach_env_runner(
        lambda runner: runner.env.unwrapped.call("set_reward_table", table, lam),
        local_env_runner=True,
    )


def scorer_from(algo: Algorithm) -> SlateScorer:
    """The acting policy's scorer (a torch module in eval mode) for evaluation."""
    module = algo.env_runner.module
    module.eval()
    return module.scorer


def train_iterations(algo: Algorithm, iterations: int) -> tuple[int, dict[str, float]]:
    """Run ``iterations`` PPO iterations; returns (env steps sampled, last scalar metrics)."""
    steps = 0
    metrics: dict[str, float] = {}
    for _ in range(iterations):
        result = algo.train()
        runners = result.get("env_runners", {})
        steps += int(runners.get("num_env_steps_sampled", 0))
        learner = result.get("learners", {}).get(DEFAULT_MODULE_ID, {})
        metrics = {
            "episode_return_mean": float(runners.get("episode_return_mean", np.nan)),
            "policy_loss": float(learner.get("policy_loss", np.nan)),
            "vf_loss": float(learner.get("vf_loss", np.nan)),
            "entropy": float(learner.get("entropy", np.nan)),
            "mean_kl": float(learner.get("mean_kl_loss", np.nan)),
        }
    return steps, metrics


@torch.no_grad()
def score_observations(scorer: SlateScorer, obs: dict[str, np.ndarray]) -> np.ndarray:
    """Scores ``(B, M)`` for a batch of observations given as numpy arrays."""
    tensors = {k: torch.as_tensor(v) for k, v in obs.items()}
    scores, _, _ = scorer(tensors)
    return scores.numpy()
