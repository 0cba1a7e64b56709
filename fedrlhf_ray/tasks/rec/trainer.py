"""Local RLHF: human feedback → reward model H_k → RLlib PPO on R⁰ + λ_k·H_k.

:class:`RLHFTrainer` is the :class:`~fedrlhf_ray.local_trainer.LocalTrainer` the federated
runtime runs inside client actors, and the engine of ``fedrlhf train`` for one client. One
instance owns one RLlib PPO algorithm and serves any number of virtual clients: a client's
record (simulated human RNG, feedback log, reward model, optimizer state) is swapped in and
out. Weights go in and out as named numpy arrays; the feedback, the human and the reward
model never leave this object.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from envs.types import ClientData
from fedrlhf_ray import rllib_edge
from fedrlhf_ray.attacks import malicious_clients
from fedrlhf_ray.local_trainer import Weights
from fedrlhf_ray.rllib_edge import RLlibLocalTrainer
from fedrlhf_ray.schema import ExperimentConfig
from fedrlhf_ray.seeding import derive_seed
from fedrlhf_ray.tasks.rec import ppo as rec_ppo
from fedrlhf_ray.tasks.rec.evaluation import evaluate_client
from fedrlhf_ray.tasks.rec.feedback import (
    FeedbackLog,
    RandomQueries,
    SimulatedHuman,
    UncertaintyQueries,
    collect_feedback,
)
from fedrlhf_ray.tasks.rec.reward_model import RewardModel


class RLHFTrainer(RLlibLocalTrainer):
    """Local RLHF for the virtual clients ``clients`` (indexed by client id).

    ``lambdas[i]`` is client i's λ, or an array with one λ per user (the centralized
    baseline's pooled client keeps every user's own λ). ``budget_scale`` multiplies a client's
    feedback budget and PPO iterations per round (the pooled client does the work of all the
    clients it stands for).
    """

    def __init__(
        self,
        cfg: ExperimentConfig,
        clients: Sequence[ClientData],
        lambdas: Sequence[float | np.ndarray],
        budget_scale: dict[int, int] | None = None,
    ) -> None:
        self.cfg = cfg
        self.clients = {c.client_id: c for c in clients}
        self.lambdas = {c.client_id: lam for c, lam in zip(clients, lambdas, strict=True)}
        self.budget_scale = budget_scale or {}
        first = clients[0]
        self._built(rec_ppo.build_ppo(first, cfg.slate_env(), cfg.ppo, 0.0, derive_seed(cfg.seed, "ppo")), cfg.seed)
        self.selector = (
            UncertaintyQueries(pool_factor=cfg.feedback.pool_factor)
            if cfg.feedback.query_strategy == "uncertainty"
            else RandomQueries()
        )
        self.client: ClientData | None = None
        self.reward_table: np.ndarray | None = None
        attack = cfg.attack
        # Malicious clients of attack.kind flipped_feedback: their humans answer the wrong way round.
        self.flipped_humans = (
            malicious_clients(cfg.seed, cfg.clients.num_clients, attack.fraction)
            if attack.kind == "flipped_feedback"
            else frozenset()
        )

    @property
    def loaded(self) -> ClientData:
        """The client :meth:`load_client` swapped in (every round method needs one)."""
        assert self.client is not None, "no client loaded: call load_client first"
        return self.client

    # -- swapping virtual clients ------------------------------------------------------------
    def _new_reward_model(self, client: ClientData) -> RewardModel:
        rm = self.cfg.reward_model
        return RewardModel(
            client.catalog,
            hidden=rm.hidden,
            embedding_dim=rm.embedding_dim,
            lr=rm.lr,
            weight_decay=rm.weight_decay,
            epochs=rm.epochs,
            batch_size=rm.batch_size,
            history_length=self.cfg.slate_env().history_length,
            seed=derive_seed(self.cfg.seed, "reward_model", client.client_id),
        )

    def load_client(self, client_id: int, state: dict[str, Any] | None) -> None:
        """Swap client ``client_id`` in; ``state`` is a record :meth:`save_client` made."""
        client = self.clients[client_id]
        self.client = client
        self.lam = self.lambdas[client_id]
        fb = self.cfg.feedback
        self.human = SimulatedHuman(
            client,
            beta=fb.beta,
            rating_noise=fb.rating_noise,
            seed=derive_seed(self.cfg.seed, "human", client_id),
            flipped=client_id in self.flipped_humans,
        )
        self.reward_model = self._new_reward_model(client)
        if state is None:
            self.feedback = FeedbackLog.empty()
            self._load_optimizer(None)
        else:
            self.human.set_state(state["human_rng"])
            self.feedback = FeedbackLog(**state["feedback"])
            self.reward_model.load_state_dict(state["reward_model"])
            self._load_optimizer(state["optimizer"])
        self.reward_table = (
            self.reward_model.reward_table(client) if self.reward_model.is_fitted else None
        )
        self._push_reward_table()

    def _push_reward_table(self) -> None:
        if np.ndim(self.lam) == 0 or self.reward_table is None:
            rec_ppo.set_reward_table(self.algo, self.reward_table, float(np.mean(self.lam)))
        else:  # one λ per user: fold it into the table's rows
            rec_ppo.set_reward_table(self.algo, self.reward_table * np.asarray(self.lam)[:, None], 1.0)

    def save_client(self) -> dict[str, Any]:
        """Everything that persists across rounds for the current client, as a plain tree
        (arrays, tensors, scalars) that the client store writes without pickle."""
        return {
            "human_rng": self.human.state(),
            "feedback": {f.name: getattr(self.feedback, f.name) for f in dataclasses.fields(self.feedback)},
            "reward_model": self.reward_model.state_dict(),
            "optimizer": self._optimizer_state(),
        }

    # -- a local round -----------------------------------------------------------------------
    def _begin(self, round_index: int, purpose: str) -> None:
        cid = self.loaded.client_id
        rllib_edge.seed_global_rngs(derive_seed(self.cfg.seed, purpose, round_index, cid))
        env_seed = derive_seed(self.cfg.seed, "env", purpose, round_index, cid)
        rec_ppo.load_client(self.algo, self.loaded, env_seed)

    def update_reward_model(self) -> dict[str, float]:
        """Ask this round's queries, refit H_k on all feedback so far, refresh the envs."""
        fb = self.cfg.feedback
        fitted = self.reward_model if self.reward_model.is_fitted else None
        budget = fb.budget_per_round * self.budget_scale.get(self.loaded.client_id, 1)
        new = collect_feedback(
            self.human, self.selector, budget=budget, kind=fb.kind, reward_model=fitted
        )
        self.feedback = self.feedback.extend(new)
        fit = self.reward_model.fit(self.feedback, self.loaded)
        self.reward_table = self.reward_model.reward_table(self.loaded)
        self._push_reward_table()
        return {
            "feedback/new_queries": float(len(new)),
            "feedback/total_pairs": float(self.feedback.num_pairs),
            "feedback/total_ratings": float(self.feedback.num_ratings),
            "reward_model/loss": float(fit["loss"]),
            "reward_model/train_pair_accuracy": float(fit["pair_accuracy"]),
            "reward_model/margin": float(fit["margin"]),
            "reward_model/heldout_pair_accuracy": float(
                self.reward_model.heldout_pairwise_accuracy(self.loaded)
            ),
        }

    def train(
        self, round_index: int, anchor: Weights | None = None, proximal_mu: float = 0.0
    ) -> tuple[int, dict[str, float]]:
        """One local round: feedback and reward model, then E PPO iterations.

        Returns the env steps sampled and scalar metrics — nothing else leaves the client.
        """
        start = time.perf_counter()
        self._begin(round_index, "train")
        metrics = self.update_reward_model()
        scale = self.budget_scale.get(self.loaded.client_id, 1)
        steps, rows = self._iterations_with_anchor(self.cfg.ppo.local_iterations * scale, anchor, proximal_mu)
        ppo_metrics = rows[-1] if rows else {}
        metrics.update({f"train/{k}": v for k, v in ppo_metrics.items()})
        metrics["train/env_steps"] = float(steps)
        metrics["train/seconds"] = time.perf_counter() - start
        return steps, metrics

    def finetune(self, round_index: int, iterations: int) -> None:
        """Local PPO steps on the client's current reward model, without new feedback."""
        if iterations > 0:
            self._begin(round_index, "finetune")
            rec_ppo.train_iterations(self.algo, iterations)

    def evaluate(self, round_index: int = 0) -> dict[str, float]:
        """Held-out metrics of the acting policy, ``eval/``-prefixed."""
        scorer = rec_ppo.scorer_from(self.algo)
        out = evaluate_client(
            lambda obs: rec_ppo.score_observations(scorer, obs),
            self.loaded,
            rec_ppo.env_kwargs(self.cfg.slate_env()),
            episodes_per_user=self.cfg.evaluation.episodes_per_user,
            ndcg_k=self.cfg.evaluation.ndcg_k,
            seed=derive_seed(self.cfg.seed, "eval", self.loaded.client_id),
            reward_table=self.reward_table,
            lam=float(np.mean(self.lam)),
        )
        return {f"eval/{k}": v for k, v in out.items()}


def pool_clients(clients: Sequence[ClientData], client_id: int) -> ClientData:
    """All clients' users as one client: the centralized baseline's data."""
    return ClientData(
        client_id=client_id,
        users=tuple(u for c in clients for u in c.users),
        catalog=clients[0].catalog,
        rating_scale=clients[0].rating_scale,
    )


def build_host_trainer(cfg: ExperimentConfig, host_index: int, num_hosts: int) -> RLHFTrainer:
    """Inside client actor ``host_index`` of ``num_hosts``: the trainer for its clients.

    The actor builds the clients itself from the config (data is resolved on the actor's own
    node) and keeps its own. Under the centralized baseline, the host of the pooled client (id K)
    also gets all users pooled, with every user's λ, and the feedback budget and PPO iterations
    of the clients sampled per round.
    """
    from fedrlhf_ray.tasks import hosted_clients
    from fedrlhf_ray.tasks.rec.clients import build_clients

    clients = build_clients(cfg)
    lambdas = cfg.client_lambdas()
    mine, pooled = hosted_clients(clients, host_index, num_hosts, cfg.federation.baseline == "centralized")
    lams: list[float | np.ndarray] = [lambdas[c.client_id] for c in mine]
    scale: dict[int, int] = {}
    if pooled:
        k = len(clients)
        mine.append(pool_clients(clients, k))
        lams.append(np.concatenate([[lambdas[c.client_id]] * len(c.users) for c in clients]))
        scale[k] = cfg.clients_per_round_count(k)
    return RLHFTrainer(cfg, mine, lams, budget_scale=scale)
