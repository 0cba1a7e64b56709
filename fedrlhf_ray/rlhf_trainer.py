"""One client's local RLHF: human feedback → reward model H_k → RLlib PPO on R⁰ + λ·H_k.

This is the local trainer the federated runtime runs inside client actors; on its own it is
the single-client training of ``fedrlhf train``. Weights go in and out as named numpy arrays;
the feedback log, the simulated human and the reward model never leave this object.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from envs.types import ClientData
from fedrlhf_ray import rllib_ppo
from fedrlhf_ray.config import ExperimentConfig
from fedrlhf_ray.evaluation import evaluate_client
from fedrlhf_ray.feedback import (
    FeedbackLog,
    RandomQueries,
    SimulatedHuman,
    UncertaintyQueries,
    collect_feedback,
)
from fedrlhf_ray.reward_model import RewardModel
from fedrlhf_ray.seeding import derive_seed


class RLHFClientTrainer:
    """Local RLHF for one client; every seed derives from ``(cfg.seed, client_id)``."""

    def __init__(self, cfg: ExperimentConfig, client: ClientData, lam: float) -> None:
        # A client trains on one CPU. Torch's default (one thread per core) oversubscribes the
        # cores shared with Ray's processes: measured 20 s instead of 0.5 s per PPO iteration.
        torch.set_num_threads(1)
        self.cfg = cfg
        self.client = client
        self.lam = float(lam)
        cid = client.client_id
        fb = cfg.feedback
        self.human = SimulatedHuman(
            client,
            beta=fb.beta,
            rating_noise=fb.rating_noise,
            seed=derive_seed(cfg.seed, "human", cid),
        )
        self.selector = (
            UncertaintyQueries(pool_factor=fb.pool_factor)
            if fb.query_strategy == "uncertainty"
            else RandomQueries()
        )
        rm = cfg.reward_model
        self.reward_model = RewardModel(
            client.catalog,
            hidden=rm.hidden,
            embedding_dim=rm.embedding_dim,
            lr=rm.lr,
            weight_decay=rm.weight_decay,
            epochs=rm.epochs,
            batch_size=rm.batch_size,
            history_length=cfg.env.history_length,
            seed=derive_seed(cfg.seed, "reward_model", cid),
        )
        self.feedback = FeedbackLog.empty()
        self.reward_table: np.ndarray | None = None
        self.algo = rllib_ppo.build_ppo(
            client, cfg.env, cfg.ppo, self.lam, derive_seed(cfg.seed, "ppo", cid)
        )
        self.rounds_done = 0

    def get_weights(self) -> dict[str, np.ndarray]:
        return rllib_ppo.get_weights(self.algo)

    def set_weights(self, weights: dict[str, np.ndarray]) -> None:
        rllib_ppo.set_weights(self.algo, weights)

    def update_reward_model(self) -> dict[str, float]:
        """Ask this round's queries, refit H_k on all feedback so far, refresh the envs."""
        fb = self.cfg.feedback
        fitted = self.reward_model if self.reward_model.is_fitted else None
        new = collect_feedback(
            self.human,
            self.selector,
            budget=fb.budget_per_round,
            kind=fb.kind,
            reward_model=fitted,
        )
        self.feedback = self.feedback.extend(new)
        fit = self.reward_model.fit(self.feedback, self.client)
        self.reward_table = self.reward_model.reward_table(self.client)
        rllib_ppo.set_reward_table(self.algo, self.reward_table, self.lam)
        return {
            "feedback/new_queries": float(len(new)),
            "feedback/total_pairs": float(self.feedback.num_pairs),
            "feedback/total_ratings": float(self.feedback.num_ratings),
            "reward_model/loss": float(fit["loss"]),
            "reward_model/train_pair_accuracy": float(fit["pair_accuracy"]),
            "reward_model/margin": float(fit["margin"]),
            "reward_model/heldout_pair_accuracy": float(
                self.reward_model.heldout_pairwise_accuracy(self.client)
            ),
        }

    def train_round(self, iterations: int | None = None) -> tuple[int, dict[str, float]]:
        """One local round: feedback and reward model, then E PPO iterations.

        Returns the env steps sampled and scalar metrics — nothing else leaves the client.
        """
        start = time.perf_counter()
        metrics = self.update_reward_model()
        steps, ppo_metrics = rllib_ppo.train_iterations(
            self.algo, iterations or self.cfg.ppo.local_iterations
        )
        metrics.update({f"train/{k}": v for k, v in ppo_metrics.items()})
        metrics["train/env_steps"] = float(steps)
        metrics["train/seconds"] = time.perf_counter() - start
        self.rounds_done += 1
        return steps, metrics

    def evaluate(self) -> dict[str, float]:
        """Held-out metrics of the acting policy, ``eval/``-prefixed."""
        scorer = rllib_ppo.scorer_from(self.algo)
        out = evaluate_client(
            lambda obs: rllib_ppo.score_observations(scorer, obs),
            self.client,
            rllib_ppo.env_kwargs(self.cfg.env),
            episodes_per_user=self.cfg.evaluation.episodes_per_user,
            ndcg_k=self.cfg.evaluation.ndcg_k,
            seed=derive_seed(self.cfg.seed, "eval", self.client.client_id),
            reward_table=self.reward_table,
            lam=self.lam,
        )
        return {f"eval/{k}": v for k, v in out.items()}

    def stop(self) -> None:
        self.algo.stop()
