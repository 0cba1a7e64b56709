"""The RLlib edge every task shares: one in-process PPO algorithm per client actor, its weights
and optimizer state, FedProx's anchor, seeding and the env runner's envs.

Nothing else in the engine touches RLlib types: the rest of the platform sees weights as
``dict[str, np.ndarray]``. A task supplies its env creator, its RLModule and (optionally) a
learner subclass of :class:`ProximalPPOLearner`; :class:`RLlibLocalTrainer` is the base of the
tasks' :class:`~fedrlhf_ray.local_trainer.LocalTrainer` implementations.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from ray.rllib.algorithms.algorithm import Algorithm
from ray.rllib.algorithms.ppo import PPOConfig
from ray.rllib.algorithms.ppo.torch.ppo_torch_learner import PPOTorchLearner
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.core.rl_module.rl_module import RLModuleSpec

from fedrlhf_ray.local_trainer import Weights
from fedrlhf_ray.schema import PPOSettings

if TYPE_CHECKING:
    from ray.rllib.core.learner.learner_group import LearnerGroup
    from ray.rllib.env.env_runner_group import EnvRunnerGroup


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


def register_env_once(name: str, creator: Callable[[Any], Any]) -> None:
    """Register an env creator with Tune's registry in this process (RLlib looks envs up there)."""
    from ray.tune.registry import ENV_CREATOR, _global_registry, register_env

    if not _global_registry.contains(ENV_CREATOR, name):
        register_env(name, creator)


def build_ppo(
    *,
    env_name: str,
    env_creator: Callable[[Any], Any],
    env_config: dict[str, Any],
    ppo: PPOSettings,
    module_spec: RLModuleSpec,
    seed: int,
    learner_class: type[ProximalPPOLearner] = ProximalPPOLearner,
    episodes_for_smoothing: int = 20,
    grad_clip: float | None = None,
) -> Algorithm:
    """One in-process PPO algorithm (no remote env runners: a client is already an actor).

    PPO's adaptive KL coefficient (to the previous policy) is switched off, the clip objective
    alone: it would be hidden learner state shared by every virtual client an actor serves.
    """
    register_env_once(env_name, env_creator)
    config = (
        PPOConfig()
        .environment(env=env_name, env_config=env_config)
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
            grad_clip=grad_clip,
        )
        .learners(learner_class=learner_class)
        .rl_module(rl_module_spec=module_spec)
        .reporting(metrics_num_episodes_for_smoothing=episodes_for_smoothing)
        .debugging(seed=seed, log_level="ERROR")
    )
    return config.build_algo()


# RLlib types an algorithm's learner and env-runner groups Optional (they are None until
# built); an algorithm from build_algo() always has both.
def learners(algo: Algorithm) -> LearnerGroup:
    group = algo.learner_group
    assert group is not None, "the algorithm has no learner group"
    return group


def env_runners(algo: Algorithm) -> EnvRunnerGroup:
    group = algo.env_runner_group
    assert group is not None, "the algorithm has no env runner group"
    return group


def get_weights(algo: Algorithm) -> dict[str, np.ndarray]:
    """Every parameter (policy and value head) from the learner, as numpy arrays."""
    weights = learners(algo).get_weights()[DEFAULT_MODULE_ID]
    return {name: np.asarray(value).copy() for name, value in weights.items()}


def set_weights(algo: Algorithm, weights: dict[str, np.ndarray]) -> None:
    """Load weights into the learner AND the env runner that acts.

    ``algo.set_weights`` leaves env runners acting with stale weights (they only accept a
    newer ``weights_seq_no``); a state without a sequence number forces the update.
    """
    learners(algo).set_weights({DEFAULT_MODULE_ID: weights})

    def push(runner: Any) -> Any:  # a SingleAgentEnvRunner (typed as the EnvRunner base)
        return runner.set_state({"rl_module": {DEFAULT_MODULE_ID: weights}})

    env_runners(algo).foreach_env_runner(push, local_env_runner=True)


def acting_module(algo: Algorithm) -> Any:
    """The local env runner's module: the policy that actually samples."""
    return algo.env_runner.module


def acting_weights(algo: Algorithm) -> dict[str, np.ndarray]:
    """The weights of the local env runner's module."""
    return {k: np.asarray(v).copy() for k, v in acting_module(algo).get_state().items()}


def set_prox_anchor(algo: Algorithm, weights: dict[str, np.ndarray] | None, mu: float = 0.0) -> None:
    """The global weights FedProx's proximal term pulls towards, with its μ (``None``: no term)."""

    # RLlib's annotation has a second (kwargs) parameter; the learner alone is passed here.
    def anchor(learner: Any, _: Any = None) -> Any:  # a ProximalPPOLearner
        return learner.set_anchor(weights, mu)

    learners(algo).foreach_learner(anchor)


def get_optimizer_state(algo: Algorithm) -> dict[str, Any]:
    """The learner's optimizer state (Adam moments, step counts): part of a client's record.

    Only the optimizer: RLlib adds the learner's ``weights_seq_no`` to any learner state, and
    restoring an older one makes the env runner reject the next weight syncs (it only takes
    newer numbers), so a swapped-in client would act with stale weights from its second PPO
    iteration on. The arrays are copied: RLlib hands out views of the live tensors.
    """
    learner = learners(algo).get_state(components="learner/optimizer")["learner"]
    return {"learner": {"optimizer": copy.deepcopy(learner["optimizer"])}}


def set_optimizer_state(algo: Algorithm, state: dict[str, Any]) -> None:
    learners(algo).set_state(state)


def call_envs(algo: Algorithm, method: str, *args: Any) -> None:
    """``env.method(*args)`` on every env of the env runner (the vector env forwards the call)."""

    def call(runner: Any) -> Any:  # a SingleAgentEnvRunner (typed as the EnvRunner base)
        return runner.env.unwrapped.call(method, *args)

    env_runners(algo).foreach_env_runner(call, local_env_runner=True)


def restart_episodes(algo: Algorithm, seed: int) -> None:
    """Discard in-flight episodes; the next sample resets every env from ``seed`` alone.

    RLlib's env runner has no public call for it: it reads ``_seed`` on the first reset after
    ``_needs_initial_reset``, so a swapped-in client's sessions do not depend on the previous one.
    """

    def reseed(runner: Any) -> None:
        runner._seed = int(seed)
        runner._needs_initial_reset = True

    env_runners(algo).foreach_env_runner(reseed, local_env_runner=True)


def seed_global_rngs(seed: int) -> None:
    """Seed the global RNGs RLlib draws from (action sampling, minibatch shuffling).

    Our code never uses them; reseeding them from (root seed, round, client) before each
    local round makes a client's round independent of which actor ran it and of what that
    actor ran before, so a resumed run repeats an uninterrupted one exactly.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def run_iterations(
    algo: Algorithm, iterations: int, learner_keys: tuple[str, ...] = ()
) -> tuple[int, list[dict[str, float]]]:
    """``iterations`` PPO iterations: (env steps sampled, each iteration's scalar metrics:
    return, losses, entropy and the learner's ``learner_keys``)."""
    steps = 0
    rows: list[dict[str, float]] = []
    for _ in range(iterations):
        result = algo.train()
        runners = result.get("env_runners", {})
        steps += int(runners.get("num_env_steps_sampled", 0))
        learner = result.get("learners", {}).get(DEFAULT_MODULE_ID, {})
        row = {
            "episode_return_mean": float(runners.get("episode_return_mean", np.nan)),
            "policy_loss": float(learner.get("policy_loss", np.nan)),
            "vf_loss": float(learner.get("vf_loss", np.nan)),
            "entropy": float(learner.get("entropy", np.nan)),
        }
        row.update({key: float(learner.get(key, np.nan)) for key in learner_keys})
        rows.append(row)
    return steps, rows


class RLlibLocalTrainer:
    """What the tasks' RLlib trainers share: one algorithm serving many virtual clients, whose
    weights and optimizer state are swapped in and out, and the per-round seeding."""

    algo: Algorithm
    seed: int

    def samples(self, round_index: int) -> str | None:
        return None

    def _built(self, algo: Algorithm, seed: int) -> None:
        self.algo = algo
        self.seed = seed
        self._fresh_optimizer = get_optimizer_state(algo)

    def _load_optimizer(self, state: dict[str, Any] | None) -> None:
        """A client's optimizer state, or a fresh one for a client that has not trained yet."""
        set_optimizer_state(self.algo, self._fresh_optimizer if state is None else state)

    def _optimizer_state(self) -> dict[str, Any]:
        return get_optimizer_state(self.algo)

    def get_weights(self) -> Weights:
        return get_weights(self.algo)

    def set_weights(self, weights: Weights) -> None:
        set_weights(self.algo, {**self.get_weights(), **weights})

    def _iterations_with_anchor(
        self, iterations: int, anchor: Weights | None, proximal_mu: float, learner_keys: tuple[str, ...] = ()
    ) -> tuple[int, list[dict[str, float]]]:
        """PPO iterations with FedProx's term towards ``anchor`` (removed afterwards)."""
        set_prox_anchor(self.algo, anchor, proximal_mu)
        try:
            return run_iterations(self.algo, iterations, learner_keys)
        finally:
            set_prox_anchor(self.algo, None)

    def stop(self) -> None:
        self.algo.stop()
