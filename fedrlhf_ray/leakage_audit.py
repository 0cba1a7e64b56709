"""The leakage audit's drivers: they run rounds like the federated driver and play the server.

:class:`AuditedDriver` is the honest-but-curious server: after each round it attacks exactly
what it received (the attacks are in ``privacy.audit``). :class:`DeviatingDriver` is a server
that lies in what it sends the clients (``privacy.deviations``) and scores what it learned.

The ground truth a client's attack is scored against (which item rows its users trained on) is
the task's to give (:meth:`~fedrlhf_ray.tasks.Task.audit_members`); it is read in the driver's
process to score the attack, which itself uses only what the driver received.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray

from fedrlhf_ray.collectors import Collected, Collector, Hosts
from fedrlhf_ray.driver import FederatedDriver
from fedrlhf_ray.local_trainer import AuditRequest, ClientUpdate, MaskedUpdate, RoundInstructions, Weights
from fedrlhf_ray.privacy.audit import audit_round, membership_attack, row_changes
from fedrlhf_ray.privacy.deviations import ATTACKS, Learned, craft
from fedrlhf_ray.privacy.secure_round import SecureCollector
from fedrlhf_ray.rundir import warn
from fedrlhf_ray.schema import ExperimentConfig
from fedrlhf_ray.strategies import RoundPlan, sparse_keys_of
from fedrlhf_ray.tasks import task_for


@dataclass
class AuditingCollector:
    """Collects like ``inner`` and keeps what the driver received this round, for the audit."""

    inner: Collector
    received: list[ClientUpdate | MaskedUpdate] = field(default_factory=list)

    def collect(
        self, hosts: Hosts, round_index: int, sampled: list[int], global_ref: Any,
        instructions: RoundInstructions, shared: Mapping[str, np.ndarray], keep_from: int, digest: str = "",
    ) -> Collected:
        collected = self.inner.collect(
            hosts, round_index, sampled, global_ref, instructions, shared, keep_from, digest
        )
        self.received = list(collected.updates)
        return collected


def ground_truth(cfg: ExperimentConfig, weights: Weights) -> tuple[str, dict[int, np.ndarray]]:
    """The table the audit reads and, per client, which of its rows the client's users trained on."""
    tables = sparse_keys_of(weights)
    if not tables:
        raise ValueError("the audit needs a policy with an item-embedding table (ppo.embedding_dim > 0)")
    n_rows = np.shape(weights[tables[0]])[0]
    return tables[0], task_for(cfg.env.name).audit_members(cfg, n_rows - 1)


class AuditedDriver(FederatedDriver):
    """The driver, auditing every round with what it received (see the module docstring)."""

    def __init__(self, cfg: ExperimentConfig, run_dir: Any, **kwargs: Any) -> None:
        super().__init__(cfg, run_dir, **kwargs)
        self.table, self.rated = ground_truth(cfg, self.global_weights)
        self.auditing = AuditingCollector(self.collector)
        self.collector = self.auditing

    def instructions(self, plan: RoundPlan) -> RoundInstructions:
        return dataclasses.replace(super().instructions(plan), audit=AuditRequest())

    def run_round(self) -> tuple[dict[str, float], list[dict[str, Any]]]:
        before = dict(self.global_weights)
        self.auditing.received = []
        metrics, rows = super().run_round()
        # Under secure aggregation every masked vector; in the clear, the updates that carry the table.
        updates: list[ClientUpdate | MaskedUpdate] = []
        for update in self.auditing.received:
            if isinstance(update, MaskedUpdate) or self.table in update.weights:
                updates.append(update)
        audit = audit_round(before, self.global_weights, updates, self.rated, self.table)
        for key in sorted({k for row in audit for k in row if k.startswith("audit/")}):
            values = [row[key] for row in audit]
            metrics[f"{key}/mean"] = float(np.mean(values)) if values else float("nan")
        rows += [{"round": self.round, "kind": "audit", **{**row, "client": int(row["client"])}} for row in audit]
        return metrics, rows


class DeviatingDriver(FederatedDriver):
    """The driver as a server that deviates: every round it plays ``attack`` (a name of
    :data:`~fedrlhf_ray.privacy.deviations.ATTACKS`) against the client actors, then scores, for
    each client whose update it learned, the membership attack on that update
    (``audit/deviation/...``), and notes a refusal (``audit/deviation/refused``, the client's
    line as a warning) and per-client metrics of a crafted model (``audit/deviation/evaluations``)."""

    def __init__(self, cfg: ExperimentConfig, run_dir: Any, *, attack: str, **kwargs: Any) -> None:
        super().__init__(cfg, run_dir, **kwargs)
        self.table, self.rated = ground_truth(cfg, self.global_weights)
        secure = self.collector if isinstance(self.collector, SecureCollector) else None
        self.deviation = ATTACKS[attack](self.collector, secure)
        self.collector = self.deviation

    def instructions(self, plan: RoundPlan) -> RoundInstructions:
        return self.deviation.told(super().instructions(plan))

    def evaluate(self, round_index: int) -> tuple[dict[str, float], list[dict[str, Any]]]:
        result = super().evaluate(round_index)
        if round_index > 0:
            fed = self.cfg.federation
            finetune = fed.finetune_iterations if fed.personalization == "finetune" else 0
            crafted = ray.put(craft(self.global_weights, self.cfg.seed + round_index))
            self.deviation.probe(self.pool, round_index, self.eval_clients, crafted, finetune)
        return result

    def run_round(self) -> tuple[dict[str, float], list[dict[str, Any]]]:
        before = dict(self.global_weights)
        self.deviation.learned = Learned()
        metrics, rows = super().run_round()
        learned = self.deviation.learned
        if learned.refusal:
            warn(f"the deviating server ({self.deviation.name}) was refused: {learned.refusal}")
        scored = []
        for c, view in sorted(learned.updates.items()):
            if self.table in view:
                attack = membership_attack(row_changes(before[self.table], view[self.table]), self.rated[c])
                scored.append({"client": c, **{f"audit/deviation/{k}": v for k, v in attack.items()
                                               if k in ("auc", "p_value", "precision_at_n", "base_rate")}})
        for key in ("auc", "p_value", "precision_at_n", "base_rate"):
            values = [row[f"audit/deviation/{key}"] for row in scored]
            metrics[f"audit/deviation/{key}/mean"] = float(np.mean(values)) if values else float("nan")
        metrics["audit/deviation/refused"] = float(bool(learned.refusal))
        metrics["audit/deviation/clients"] = float(len(scored))
        metrics["audit/deviation/evaluations"] = float(len(learned.evaluations))
        rows += [{"round": self.round, "kind": "deviation", **row} for row in scored]
        return metrics, rows


def audit_driver(attack: str | None) -> Callable[..., FederatedDriver]:
    """What builds the audit's driver: the honest-but-curious server, or the one deviating by ``attack``."""
    return AuditedDriver if attack is None else functools.partial(DeviatingDriver, attack=attack)
