"""The RLlib edge: build a PPO algorithm for one client, read and write its weights.

Nothing outside this module touches RLlib types; the rest of the platform sees weights as
``dict[str, np.ndarray]`` and the policy as a plain torch :class:`SlateScorer`.
"""

from __future__ import annotations

import copy
import logging
import random
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from ray.rllib.algorithms.algorithm import Algorithm
from ray.rllib.algorithms.ppo import PPOConfig
from ray.rllib.algorithms.ppo.torch.ppo_torch_learner import PPOTorchLearner
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.tune.registry import register_env

from envs.rec_env import ShapedRewardWrapper, SlateRecEnv
from envs.types import ClientData
from fedrlhf_ray.config import EnvConfig, PPOSettings
from fedrlhf_ray.policy import SlatePolicyModule, SlateScorer

if TYPE_CHECKING:
    from ray.rllib.core.learner.learner_group import LearnerGroup
    from ray.rllib.env.env_runner_group import EnvRunnerGroup

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


class ProximalPPOLearner(PPOTorchLearner):
    """PPO whose loss adds FedProx's proximal term μ/2·‖θ − θ_global‖².

    The anchor θ_global and μ come with each local round's instructions (the strategy's, not
    the config's); with μ = 0 or no anchor the loss is exactly PPO's.
    """

    def build(self) -> None:
        super().build()
        self._anchor: dict[str, torch.Tensor] | None = None
        self._mu = 0.0

    def set_anchor(self, weights: dict[str, np.ndarray] | None, mu: float = 0.0) -> None:
        self._anchor = None if weights is None else {k: torch.as_tensor(v) for k, v in weights.items()}
        self._mu = float(mu)

    def compute_loss_for_module(self, *, module_id, config, batch, fwd_out):
        loss = super().compute_loss_for_module(
            module_id=module_id, config=config, batch=batch, fwd_out=fwd_out
        )
        mu = self._mu
        if mu > 0.0 and self._anchor is not None:
            # A TorchRLModule (RLlib types it as the framework-neutral RLModule).
            module = cast(torch.nn.Module, self.module[module_id].unwrapped())
            prox = sum(
                ((param - self._anchor[name]) ** 2).sum()
                for name, param in module.named_parameters()
                if name in self._anchor
            )
            loss = loss + 0.5 * mu * prox
        return loss


def build_ppo(
    client: ClientData,
    env: EnvConfig,
    ppo: PPOSettings,
    lam: float,
    seed: int,
) -> Algorithm:
    """One in-process PPO algorithm (no remote env runners: a client is already an actor).

    PPO's adaptive KL coefficient is switched off (the clip objective alone): it would be
    hidden learner state shared by every virtual client an actor serves.
    """
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
            use_kl_loss=False,
        )
        .learners(learner_class=ProximalPPOLearner)
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


# RLlib types an algorithm's learner and env-runner groups Optional (they are None until
# built); an algorithm from build_algo() always has both.
def _learners(algo: Algorithm) -> LearnerGroup:
    group = algo.learner_group
    assert group is not None, "the algorithm has no learner group"
    return group


def _env_runners(algo: Algorithm) -> EnvRunnerGroup:
    group = algo.env_runner_group
    assert group is not None, "the algorithm has no env runner group"
    return group


def get_weights(algo: Algorithm) -> dict[str, np.ndarray]:
    """Every parameter (policy and value head) from the learner, as numpy arrays."""
    weights = _learners(algo).get_weights()[DEFAULT_MODULE_ID]
    return {name: np.asarray(value).copy() for name, value in weights.items()}


def set_weights(algo: Algorithm, weights: dict[str, np.ndarray]) -> None:
    """Load weights into the learner AND the env runner that acts.

    ``algo.set_weights`` leaves env runners acting with stale weights (they only accept a
    newer ``weights_seq_no``); a state without a sequence number forces the update.
    """
    _learners(algo).set_weights({DEFAULT_MODULE_ID: weights})

    def push(runner: Any) -> Any:  # a SingleAgentEnvRunner (typed as the EnvRunner base)
        return runner.set_state({"rl_module": {DEFAULT_MODULE_ID: weights}})

    _env_runners(algo).foreach_env_runner(push, local_env_runner=True)


def acting_weights(algo: Algorithm) -> dict[str, np.ndarray]:
    """The weights of the local env runner's module: the policy that actually samples."""
    module = algo.env_runner.module
    return {k: np.asarray(v).copy() for k, v in module.get_state().items()}


def set_prox_anchor(algo: Algorithm, weights: dict[str, np.ndarray] | None, mu: float = 0.0) -> None:
    """The global weights FedProx's proximal term pulls towards, with its μ (``None``: no term)."""

    # RLlib's annotation has a second (kwargs) parameter; the learner alone is passed here.
    def anchor(learner: Any, _: Any = None) -> Any:  # a ProximalPPOLearner
        return learner.set_anchor(weights, mu)

    _learners(algo).foreach_learner(anchor)


def get_optimizer_state(algo: Algorithm) -> dict[str, Any]:
    """The learner's optimizer state (Adam moments, step counts): part of a client's record.

    Only the optimizer: RLlib adds the learner's ``weights_seq_no`` to any learner state, and
    restoring an older one makes the env runner reject the next weight syncs (it only takes
    newer numbers), so a swapped-in client would act with stale weights from its second PPO
    iteration on. The arrays are copied: RLlib hands out views of the live tensors.
    """
    learner = _learners(algo).get_state(components="learner/optimizer")["learner"]
    return {"learner": {"optimizer": copy.deepcopy(learner["optimizer"])}}


def set_optimizer_state(algo: Algorithm, state: dict[str, Any]) -> None:
    _learners(algo).set_state(state)


def load_client(algo: Algorithm, client: ClientData, seed: int) -> None:
    """Make the env runner's envs serve ``client``; the next sample starts fresh sessions.

    The env runner's own seed is replaced so that the new sessions are a function of
    ``seed`` alone (RLlib reads ``_seed`` on the first reset after ``_needs_initial_reset``),
    and in-flight episodes of the previous client are discarded.
    """

    def swap(runner: Any) -> None:
        runner.env.unwrapped.call("set_client", client)
        runner._seed = int(seed)
        runner._needs_initial_reset = True

    _env_runners(algo).foreach_env_runner(swap, local_env_runner=True)


def seed_global_rngs(seed: int) -> None:
    """Seed the global RNGs RLlib draws from (action sampling, minibatch shuffling).

    Our code never uses them; reseeding them from (root seed, round, client) before each
    local round makes a client's round independent of which actor ran it and of what that
    actor ran before, so a resumed run repeats an uninterrupted one exactly.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_reward_table(algo: Algorithm, table: np.ndarray | None, lam: float | None = None) -> None:
    """Give every training env the client's refreshed reward-model scores (``None``: none yet)."""

    def push(runner: Any) -> Any:  # a SingleAgentEnvRunner (typed as the EnvRunner base)
        return runner.env.unwrapped.call("set_reward_table", table, lam)

    _env_runners(algo).foreach_env_runner(push, local_env_runner=True)


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
        }
    return steps, metrics


@torch.no_grad()
def score_observations(scorer: SlateScorer, obs: dict[str, np.ndarray]) -> np.ndarray:
    """Scores ``(B, M)`` for a batch of observations given as numpy arrays."""
    tensors = {k: torch.as_tensor(v) for k, v in obs.items()}
    scores, _, _ = scorer(tensors)
    return scores.numpy()
