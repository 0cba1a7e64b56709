"""The RLlib edge of the IMDb task: a PPO algorithm over the text env and the LM policy module."""

from __future__ import annotations

from typing import Any

import numpy as np
from ray.rllib.algorithms.algorithm import Algorithm
from ray.rllib.core.rl_module.rl_module import RLModuleSpec

from envs.text_env import TextContinuationEnv
from fedrlhf_ray import rllib_edge
from fedrlhf_ray.schema import ExperimentConfig
from fedrlhf_ray.tasks.text.policy import KL_METRIC, LMPolicyModule, TextPPOLearner

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


def build_text_ppo(cfg: ExperimentConfig, source: tuple[str, str], vocab_size: int, eos_id: int,
                   seed: int) -> Algorithm:
    """One in-process PPO algorithm over the text env (PPO's own adaptive KL to the previous
    policy is off: the KL that matters here is to the reference, in :class:`TextPPOLearner`)."""
    imdb = cfg.imdb()
    env_config = {
        "vocab_size": vocab_size, "generate_tokens": imdb.generate_tokens, "prompt_tokens": imdb.prompt_tokens,
        "eos_id": eos_id, "seed": seed,
    }
    return rllib_edge.build_ppo(
        env_name=TEXT_ENV_NAME, env_creator=make_text_env, env_config=env_config, ppo=cfg.ppo,
        module_spec=RLModuleSpec(module_class=LMPolicyModule, model_config={"source": list(source)}),
        seed=seed, learner_class=TextPPOLearner, episodes_for_smoothing=1000, grad_clip=1.0,
    )


def set_client(algo: Algorithm, prompts: list[np.ndarray], lam: Any, scorer: Any, seed: int) -> None:
    """Every training env serves this client's prompts, λ and scorer; fresh episodes from ``seed``."""
    rllib_edge.call_envs(algo, "set_client", prompts, lam, scorer)
    rllib_edge.restart_episodes(algo, seed)


def set_kl_coeff(algo: Algorithm, beta: float) -> None:
    def set_beta(learner: Any, _: Any = None) -> Any:
        return learner.set_kl_coeff(beta)

    rllib_edge.learners(algo).foreach_learner(set_beta)


def acting_module(algo: Algorithm) -> LMPolicyModule:
    module: LMPolicyModule = rllib_edge.acting_module(algo)
    return module


def train_iterations(algo: Algorithm, iterations: int) -> tuple[int, dict[str, float]]:
    """``iterations`` PPO iterations: (env steps sampled, the mean of the iterations' metrics)."""
    steps, rows = rllib_edge.run_iterations(algo, iterations, (KL_METRIC,))
    for row in rows:
        row["kl_to_reference_per_token"] = row.pop(KL_METRIC)
    return steps, {k: float(np.nanmean([r[k] for r in rows])) for k in rows[0]} if rows else {}
