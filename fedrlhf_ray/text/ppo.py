"""The RLlib edge of the IMDb task: a PPO algorithm over the text env and the LM policy module."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from ray.rllib.algorithms.algorithm import Algorithm
from ray.rllib.algorithms.ppo import PPOConfig
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.tune.registry import register_env

from envs.text_env import TextContinuationEnv
from fedrlhf_ray.config import ExperimentConfig
from fedrlhf_ray.text.policy import KL_METRIC, LMPolicyModule, TextPPOLearner

logging.getLogger("ray.rllib.algorithms.algorithm_config").setLevel(logging.ERROR)

TEXT_ENV_NAME = "fedrlhf-text"


def make_text_env(ctx: Any) -> TextContinuationEnv:
    """RLlib env creator: a text env with a placeholder prompt until the trainer sets a client."""
    worker = getattr(ctx, "worker_index", 0)
    vector = getattr(ctx, "vector_index", 0)
    seed = int(np.random.SeedSequence([ctx["seed"], worker, vector]).generate_state(1)[0])
    placeholder = [np.full(ctx["prompt_tokens"], ctx["eos_id"], dtype=np.int64)]
    return TextContinuationEnv(
        placeholder, vocab_size=ctx["vocab_size"], generate_tokens=ctx["generate_tokens"], eos_id=ctx["eos_id"],
        prompt_tokens=ctx["prompt_tokens"], seed=seed,
    )


register_env(TEXT_ENV_NAME, make_text_env)


def build_text_ppo(cfg: ExperimentConfig, source: tuple[str, str], vocab_size: int, eos_id: int,
                   seed: int) -> Algorithm:
    """One in-process PPO algorithm over the text env (PPO's own adaptive KL to the previous
    policy is off: the KL that matters here is to the reference, in :class:`TextPPOLearner`)."""
    ppo, imdb = cfg.ppo, cfg.env.imdb
    env_config = {
        "vocab_size": vocab_size, "generate_tokens": imdb.generate_tokens, "prompt_tokens": imdb.prompt_tokens,
        "eos_id": eos_id, "seed": seed,
    }
    config = (
        PPOConfig()
        .environment(env=TEXT_ENV_NAME, env_config=env_config)
        .env_runners(num_env_runners=0, num_envs_per_env_runner=ppo.num_envs)
        .training(
            lr=ppo.lr, gamma=ppo.gamma, lambda_=ppo.lambda_gae, clip_param=ppo.clip_param,
            entropy_coeff=ppo.entropy_coeff, vf_loss_coeff=ppo.vf_loss_coeff,
            train_batch_size_per_learner=ppo.train_batch_size, minibatch_size=ppo.minibatch_size,
            num_epochs=ppo.num_epochs, use_kl_loss=False, grad_clip=1.0,
        )
        .learners(learner_class=TextPPOLearner)
        .rl_module(rl_module_spec=RLModuleSpec(module_class=LMPolicyModule, model_config={"source": list(source)}))
        .reporting(metrics_num_episodes_for_smoothing=1000)
        .debugging(seed=seed, log_level="ERROR")
    )
    return config.build_algo()


def _envs(algo: Algorithm, method: str, *args: Any) -> None:
    group = algo.env_runner_group
    assert group is not None, "the algorithm has no env runner group"

    def call(runner: Any) -> Any:
        return runner.env.unwrapped.call(method, *args)

    group.foreach_env_runner(call, local_env_runner=True)


def set_client(algo: Algorithm, prompts: list[np.ndarray], lam: Any, scorer: Any, seed: int) -> None:
    """Every training env serves this client's prompts, λ and scorer; fresh episodes from ``seed``."""
    _envs(algo, "set_client", prompts, lam, scorer)
    group = algo.env_runner_group
    assert group is not None

    def reseed(runner: Any) -> None:
        runner._seed = int(seed)
        runner._needs_initial_reset = True

    group.foreach_env_runner(reseed, local_env_runner=True)


def set_kl_coeff(algo: Algorithm, beta: float) -> None:
    group = algo.learner_group
    assert group is not None

    def set_beta(learner: Any, _: Any = None) -> Any:
        return learner.set_kl_coeff(beta)

    group.foreach_learner(set_beta)


def acting_module(algo: Algorithm) -> LMPolicyModule:
    module: Any = algo.env_runner.module
    return module


def train_iterations(algo: Algorithm, iterations: int) -> tuple[int, dict[str, float]]:
    """``iterations`` PPO iterations: (env steps sampled, the mean of the iterations' metrics)."""
    steps = 0
    rows: list[dict[str, float]] = []
    for _ in range(iterations):
        result = algo.train()
        runners = result.get("env_runners", {})
        steps += int(runners.get("num_env_steps_sampled", 0))
        learner = result.get("learners", {}).get(DEFAULT_MODULE_ID, {})
        rows.append({
            "episode_return_mean": float(runners.get("episode_return_mean", np.nan)),
            "policy_loss": float(learner.get("policy_loss", np.nan)),
            "vf_loss": float(learner.get("vf_loss", np.nan)),
            "entropy": float(learner.get("entropy", np.nan)),
            "kl_to_reference_per_token": float(learner.get(KL_METRIC, np.nan)),
        })
    return steps, {k: float(np.nanmean([r[k] for r in rows])) for k in rows[0]} if rows else {}
