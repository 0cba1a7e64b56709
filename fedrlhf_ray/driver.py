"""The federated driver: owns the global weights and the round loop.

Each round: sample clients (seeded per round), broadcast the global weights with one
``ray.put``, collect client updates with ``ray.wait`` under a straggler timeout, aggregate
with the configured strategy, evaluate every client on held-out data, append the metrics and
write a checkpoint (atomically) that holds everything a resume needs: the round, the global
weights, the strategy state and every virtual client's record.

Every random stream is derived from ``(seed, round, client)``, so a resumed run repeats an
uninterrupted one exactly. The driver runs as a Ray actor (``DriverActor``) in ``fedrlhf run``;
it holds no data of any client.
"""

from __future__ import annotations

import json
import os
import pickle
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import ray

from fedrlhf_ray.client import ClientActor
from fedrlhf_ray.config import ExperimentConfig
from fedrlhf_ray.evaluation import summarize
from fedrlhf_ray.local_trainer import ClientUpdate, LocalTrainer, Weights
from fedrlhf_ray.seeding import derive_rng
from fedrlhf_ray.strategies import make_strategy, merge, sparse_keys_of, split_personal
from fedrlhf_ray.tracking import RunTracker

CHECKPOINT = "checkpoint.pkl"
METRICS = "metrics.jsonl"
CLIENT_METRICS = "client_metrics.jsonl"

# (host index, number of hosts) -> a picklable zero-argument factory run inside the actor.
HostTrainerFactory = Callable[[int, int], Callable[[], LocalTrainer]]


def num_workers(cfg: ExperimentConfig, num_training_clients: int) -> int:
    """W client actors: as configured, else as many as the cluster's CPUs allow (≤ clients)."""
    if cfg.ray.num_workers is not None:
        return min(cfg.ray.num_workers, num_training_clients)
    cpus = ray.cluster_resources().get("CPU", 1.0)
    return max(1, min(num_training_clients, int(cpus // cfg.ray.cpus_per_worker)))


def personal_prefixes(cfg: ExperimentConfig) -> tuple[str, ...]:
    """Parameter-name prefixes that stay on the client."""
    if cfg.federation.baseline == "local":
        return ("",)  # every parameter: each client trains alone
    if cfg.federation.personalization == "personal_head":
        return tuple(cfg.federation.personal_layers)
    return ()


class FederatedDriver:
    """See the module docstring. ``trainer_factory`` defaults to the RLHF trainer."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        run_dir: str | os.PathLike,
        *,
        resume: bool = False,
        trainer_factory: HostTrainerFactory | None = None,
        tracker: RunTracker | None = None,
    ) -> None:
        self.cfg = cfg
        self.tracker = tracker
        self.run_dir = Path(run_dir)
        fed = cfg.federation
        self.num_clients = cfg.clients.num_clients
        # The centralized baseline trains one pooled client, id K, on everyone's data.
        self.training_clients = (
            [self.num_clients] if fed.baseline == "centralized" else list(range(self.num_clients))
        )
        self.num_hosts = num_workers(cfg, self.num_clients)
        if trainer_factory is None:
            from fedrlhf_ray.rlhf_trainer import RLHFTrainerFactory  # imports RLlib: only when used

            cfg_dict = cfg.to_dict()
            trainer_factory = lambda w, n: RLHFTrainerFactory(cfg_dict, w, n)  # noqa: E731
        factory = trainer_factory
        self.prefixes = personal_prefixes(cfg)
        self.hosts = [
            ClientActor.options(num_cpus=cfg.ray.cpus_per_worker).remote(
                factory(w, self.num_hosts), self.prefixes
            )
            for w in range(self.num_hosts)
        ]
        ray.get([h.ready.remote() for h in self.hosts])
        self.global_weights: Weights = ray.get(self.hosts[0].initial_weights.remote())
        self.strategy = make_strategy(fed, sparse_keys=sparse_keys_of(self.global_weights))
        self.round = 0
        if resume:
            self._restore()

    # -- helpers -----------------------------------------------------------------------------
    def sample_clients(self, round_index: int) -> list[int]:
        pool = self.training_clients
        m = self.cfg.clients_per_round_count(len(pool))
        rng = derive_rng(self.cfg.seed, "sample", round_index)
        return sorted(int(c) for c in rng.choice(pool, size=m, replace=False))

    # -- the round ---------------------------------------------------------------------------
    def run_round(self) -> dict[str, float]:
        """Train, aggregate, evaluate and checkpoint round ``self.round + 1``."""
        fed = self.cfg.federation
        r = self.round + 1
        start = time.perf_counter()
        sampled = self.sample_clients(r)
        global_ref = ray.put(self.global_weights)
        # The local baseline has no global model to stay close to.
        proximal = self.strategy.proximal_mu > 0 and fed.baseline != "local"
        updates = self._collect_updates(r, sampled, global_ref, proximal)
        pending = len(sampled) - len(updates)
        train_seconds = time.perf_counter() - start

        if updates and fed.baseline != "local":
            shared, personal = split_personal(self.global_weights, self.prefixes)
            aggregated = self.strategy.aggregate(
                shared, [u.weights for u in updates], [u.num_samples for u in updates]
            )
            self.global_weights = merge(aggregated, personal)
        self.round = r

        metrics: dict[str, float] = {
            "round": float(r),
            "fed/clients_sampled": float(len(sampled)),
            "fed/clients_aggregated": float(len(updates)),
            "fed/stragglers": float(pending),
            "fed/env_steps": float(sum(u.num_samples for u in updates)),
            "fed/train_seconds": train_seconds,
        }
        for key in sorted({name for u in updates for name in u.metrics}):
            values = [u.metrics[key] for u in updates if key in u.metrics]
            metrics[f"{key}/mean"] = float(np.nanmean(values)) if values else float("nan")
        client_rows = [
            {"round": r, "client": u.client_id, "kind": "train", **u.metrics} for u in updates
        ]
        if self.cfg.evaluation_due(r):
            eval_metrics, eval_rows = self.evaluate(r)
            metrics.update(eval_metrics)
            client_rows += eval_rows
        metrics["fed/round_seconds"] = time.perf_counter() - start
        self._append(METRICS, [metrics])
        self._append(CLIENT_METRICS, client_rows)
        self._checkpoint()
        if self.tracker is not None:  # after the checkpoint: a logged round is a resumable round
            self.tracker.log_round(r, metrics, client_rows)
        return metrics

    def _collect_updates(
        self, round_index: int, sampled: list[int], global_ref, proximal: bool
    ) -> list[ClientUpdate]:
        """Updates that arrive before the straggler deadline (or the first ``min_results``).

        Each host streams its clients' updates back from one call. A client still training
        at the deadline is left out of this round's aggregate; its host finishes it (and its
        record advances, as a real client's local state would) before serving anything else.
        """
        fed = self.cfg.federation
        groups = self._by_host(sampled)
        if fed.straggler_timeout_s is None:  # nothing to time out: one reply per host is cheapest
            batches = ray.get([
                self.hosts[h].train_batch.remote(round_index, ids, global_ref, proximal)
                for h, ids in groups.items()
            ])
            return sorted((u for batch in batches for u in batch), key=lambda u: u.client_id)
        streams = [
            self.hosts[h].train_clients.remote(round_index, ids, global_ref, proximal)
            for h, ids in groups.items()
        ]
        deadline = None if fed.straggler_timeout_s is None else time.monotonic() + fed.straggler_timeout_s
        needed = min(fed.min_results, len(sampled))
        updates: list[ClientUpdate] = []
        while streams:
            timeout = None
            if len(updates) >= needed:
                timeout = max(0.0, deadline - time.monotonic())
            ready, _ = ray.wait(streams, num_returns=1, timeout=timeout)
            if not ready:
                break  # deadline passed with enough results
            try:
                updates.append(ray.get(next(ready[0])))
            except StopIteration:
                streams.remove(ready[0])
        # Aggregation order must not depend on which host finished first.
        return sorted(updates, key=lambda u: u.client_id)

    def _by_host(self, client_ids: list[int]) -> dict[int, list[int]]:
        """Clients grouped by the host that keeps their records (client k on host k mod W)."""
        groups: dict[int, list[int]] = {}
        for c in client_ids:
            groups.setdefault(c % self.num_hosts, []).append(c)
        return groups

    def evaluate(self, round_index: int) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """Every client's held-out metrics for the current global model, and their summary."""
        fed = self.cfg.federation
        finetune = fed.finetune_iterations if fed.personalization == "finetune" else 0
        global_ref = ray.put(self.global_weights)
        groups = self._by_host(list(range(self.num_clients)))
        results = ray.get(
            [self.hosts[h].evaluate_clients.remote(round_index, ids, global_ref, finetune) for h, ids in groups.items()]
        )
        by_client = {c: m for ids, ms in zip(groups.values(), results, strict=True) for c, m in zip(ids, ms, strict=True)}
        clients = sorted(by_client)
        per_client = [by_client[c] for c in clients]
        summary: dict[str, float] = {}
        for key in sorted({name for m in per_client for name in m}):
            summary.update(summarize([m.get(key, float("nan")) for m in per_client], key))
        rows = [
            {"round": round_index, "client": c, "kind": "eval", **m}
            for c, m in zip(clients, per_client, strict=True)
        ]
        return summary, rows

    def initial_evaluation(self) -> dict[str, float]:
        """Round-0 metrics of the untrained global model (logged once per run)."""
        metrics, rows = self.evaluate(0)
        metrics["round"] = 0.0
        self._append(METRICS, [metrics])
        self._append(CLIENT_METRICS, rows)
        if self.tracker is not None:
            self.tracker.log_round(0, metrics, rows)
        return metrics

    # -- persistence -------------------------------------------------------------------------
    def _append(self, name: str, rows: list[dict[str, Any]]) -> None:
        with (self.run_dir / name).open("a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")

    def _checkpoint(self) -> None:
        records = {}
        for host_records in ray.get([h.get_records.remote() for h in self.hosts]):
            records.update(host_records)
        state = {
            "round": self.round,
            "global_weights": self.global_weights,
            "strategy": self.strategy.state(),
            "records": records,  # by client id, so a resume may use another number of hosts
        }
        tmp = self.run_dir / (CHECKPOINT + ".tmp")
        with tmp.open("wb") as f:
            pickle.dump(state, f, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, self.run_dir / CHECKPOINT)

    def _restore(self) -> None:
        with (self.run_dir / CHECKPOINT).open("rb") as f:
            state = pickle.load(f)
        self.round = int(state["round"])
        self.global_weights = state["global_weights"]
        per_host: list[dict] = [{} for _ in self.hosts]
        for client_id, record in state["records"].items():
            per_host[client_id % self.num_hosts][client_id] = record
        ray.get([h.set_records.remote(rec) for h, rec in zip(self.hosts, per_host, strict=True)])
        # Rows past the checkpoint come from a round that crashed before it was saved.
        for name in (METRICS, CLIENT_METRICS):
            file = self.run_dir / name
            if file.exists():
                rows = [json.loads(line) for line in file.read_text().splitlines() if line]
                tmp = file.with_suffix(".tmp")
                tmp.write_text("".join(json.dumps(x) + "\n" for x in rows if x["round"] <= self.round))
                os.replace(tmp, file)

    def completed_rounds(self) -> int:
        return self.round

    def final_weights(self) -> Weights:
        return self.global_weights

    def save_global_weights(self, path: str) -> str:
        """The final global model as a NumPy ``.npz`` (parameter name → array): no pickle."""
        np.savez(path, **self.global_weights)
        return path

    def placement(self) -> list[dict[str, Any]]:
        """Which Ray node runs each client host, and which clients it serves."""
        nodes = ray.get([h.node_id.remote() for h in self.hosts])
        groups = self._by_host(self.training_clients)
        return [{"host": i, "node_id": n, "clients": groups.get(i, [])} for i, n in enumerate(nodes)]


DriverActor = ray.remote(FederatedDriver)
