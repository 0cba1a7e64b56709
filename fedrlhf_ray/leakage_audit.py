"""The leakage audit's driver: it runs rounds like the federated driver and, after each, plays the
honest-but-curious server on exactly what it received (the attacks are in ``privacy.audit``).

The ground truth a client's attack is scored against (which item rows its users trained on) is
the task's to give (:meth:`~fedrlhf_ray.tasks.Task.audit_members`); it is read in the driver's
process to score the attack, which itself uses only what the driver received.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedrlhf_ray.collectors import Collected, Collector, Hosts
from fedrlhf_ray.driver import FederatedDriver
from fedrlhf_ray.local_trainer import AuditRequest, ClientUpdate, MaskedUpdate, RoundInstructions
from fedrlhf_ray.privacy.audit import audit_round
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


class AuditedDriver(FederatedDriver):
    """The driver, auditing every round with what it received (see the module docstring)."""

    def __init__(self, cfg: ExperimentConfig, run_dir: Any, **kwargs: Any) -> None:
        super().__init__(cfg, run_dir, **kwargs)
        tables = sparse_keys_of(self.global_weights)
        if not tables:
            raise ValueError("the audit needs a policy with an item-embedding table (ppo.embedding_dim > 0)")
        self.table = tables[0]
        n_rows = np.shape(self.global_weights[self.table])[0]
        self.rated = task_for(cfg.env.name).audit_members(cfg, n_rows - 1)
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
