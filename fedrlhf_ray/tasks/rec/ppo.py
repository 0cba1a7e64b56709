"""The recommendation task's RLlib edge: a PPO algorithm over the shaped slate env and the slate
policy module; the client's data and reward-model table pushed into its envs."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from ray.rllib.algorithms.algorithm import Algorithm
from ray.rllib.core.rl_module.rl_module import RLModuleSpec

from envs.rec_env import ShapedRewardWrapper, SlateRecEnv
from envs.types import ClientData
from fedrlhf_ray import rllib_edge
from fedrlhf_ray.schema import PPOSettings, SlateEnvConfig
from fedrlhf_ray.tasks.rec.policy import SlatePolicyModule, SlateScorer


def env_kwargs(env: SlateEnvConfig) -> dict[str, Any]:
    """The :class:`SlateRecEnv` keyword arguments a :class:`SlateEnvConfig` stands for."""
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


def build_ppo(client: ClientData, env: SlateEnvConfig, ppo: PPOSettings, lam: float, seed: int) -> Algorithm:
    """The client actor's PPO algorithm over the shaped slate env (see :func:`rllib_edge.build_ppo`)."""
    return rllib_edge.build_ppo(
        env_name=ENV_NAME,
        env_creator=make_shaped_env,
        env_config={"client": client, "env_kwargs": env_kwargs(env), "lam": lam, "seed": seed},
        ppo=ppo,
        module_spec=RLModuleSpec(
            module_class=SlatePolicyModule,
            model_config={
                "hidden": ppo.hidden,
                "embedding_dim": ppo.embedding_dim,
                "n_items": client.catalog.n_items,
                "n_features": client.catalog.n_features,
            },
        ),
        seed=seed,
    )


def load_client(algo: Algorithm, client: ClientData, seed: int) -> None:
    """Make the env runner's envs serve ``client``; the next sample starts fresh sessions from
    ``seed`` alone (in-flight episodes of the previous client are discarded)."""
    rllib_edge.call_envs(algo, "set_client", client)
    rllib_edge.restart_episodes(algo, seed)


def set_reward_table(algo: Algorithm, table: np.ndarray | None, lam: float | None = None) -> None:
    """Give every training env the client's refreshed reward-model scores (``None``: none yet)."""
    rllib_edge.call_envs(algo, "set_reward_table", table, lam)


def scorer_from(algo: Algorithm) -> SlateScorer:
    """The acting policy's scorer (a torch module in eval mode) for evaluation."""
    module = rllib_edge.acting_module(algo)
    module.eval()
    return module.scorer


def train_iterations(algo: Algorithm, iterations: int) -> tuple[int, dict[str, float]]:
    """Run ``iterations`` PPO iterations; returns (env steps sampled, the last one's metrics)."""
    steps, rows = rllib_edge.run_iterations(algo, iterations)
    return steps, rows[-1] if rows else {}


@torch.no_grad()
def score_observations(scorer: SlateScorer, obs: dict[str, np.ndarray]) -> np.ndarray:
    """Scores ``(B, M)`` for a batch of observations given as numpy arrays."""
    tensors = {k: torch.as_tensor(v) for k, v in obs.items()}
    scores, _, _ = scorer(tensors)
    return scores.numpy()
