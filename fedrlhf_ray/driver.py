"""The federated driver: owns the global weights and the round.

Each round: sample clients (seeded per round), ask the strategy for the round's instructions,
broadcast the global weights with one ``ray.put``, collect the client updates under a
straggler timeout, aggregate with the strategy, and evaluate every client on held-out data.
The driver's checkpoint holds the round, the global weights and the strategy's state — never a
client's record: client actors keep those in their own store, and the driver never asks for
them. Everything the driver receives from a client actor passes through :meth:`_received`:
shared weights, sample counts and scalar metrics.

A client actor that dies mid-round is restarted by Ray; the driver retries the lost clients'
round once on it (the actor restores them from its store as of the last completed round, so
the retry reproduces the lost result exactly). If the retry fails too, the round aggregates
what arrived when at least ``federation.min_results`` did.

Every random stream is derived from ``(seed, round, client)``, so a resumed or retried run
repeats an uninterrupted one exactly. The driver runs in the experiment's process (the Ray
driver) and holds no data of any client.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray.exceptions import RayActorError

from fedrlhf_ray import privacy
from fedrlhf_ray.attacks import Attack
from fedrlhf_ray.client import ClientActor
from fedrlhf_ray.config import validate_config
from fedrlhf_ray.errors import UserError
from fedrlhf_ray.local_trainer import ClientUpdate, LocalTrainer, MaskedUpdate, RoundInstructions, Weights
from fedrlhf_ray.metrics import summarize
from fedrlhf_ray.privacy.client_dp import UNCLIPPED_KEY
from fedrlhf_ray.privacy.secagg import SecAggError
from fedrlhf_ray.rundir import CLIENT_STORE, RunDir, warn
from fedrlhf_ray.schema import ExperimentConfig
from fedrlhf_ray.seeding import derive_rng
from fedrlhf_ray.state_codec import StateFileError
from fedrlhf_ray.strategies import make_strategy, merge, sparse_keys_of, split_personal
from fedrlhf_ray.tasks import task_for

# (host index, number of hosts) -> a picklable zero-argument factory run inside the actor.
HostTrainerFactory = Callable[[int, int], Callable[[], LocalTrainer]]
# Building a client actor loads its clients' data and an RLlib algorithm: seconds, not minutes.
ACTOR_START_TIMEOUT_S = 300.0


class RoundFailed(RuntimeError):
    """Too few clients answered a round, even after retrying the lost ones."""


class TaskTrainerFactory:
    """The one host factory: builds, inside client actor ``host_index`` of ``num_hosts``, the
    configured task's trainer (picklable: a config dict and two numbers travel to the actor)."""

    def __init__(self, cfg_dict: dict[str, Any], host_index: int, num_hosts: int) -> None:
        self.cfg_dict = cfg_dict
        self.host_index = host_index
        self.num_hosts = num_hosts

    def __call__(self) -> LocalTrainer:
        cfg = validate_config(self.cfg_dict)
        return task_for(cfg.env.name).build_trainer(cfg, self.host_index, self.num_hosts)


def num_workers(cfg: ExperimentConfig, num_training_clients: int) -> int:
    """W client actors: as configured, else as many as the cluster's CPUs allow (≤ clients)."""
    if cfg.ray.num_workers is not None:
        return min(cfg.ray.num_workers, num_training_clients)
    cpus = ray.cluster_resources().get("CPU", 1.0)
    return max(1, min(num_training_clients, int(cpus // cfg.ray.cpus_per_worker)))


def personal_prefixes(cfg: ExperimentConfig) -> tuple[str, ...]:
    """Parameter-name prefixes that stay on the client under ``personal_head``."""
    if cfg.federation.personalization == "personal_head":
        return tuple(cfg.federation.personal_layers)
    return ()


def client_store_root(cfg: ExperimentConfig, run_dir: RunDir) -> Path:
    """Where the client actors keep their records: ``<run dir>/clients``, or a folder named
    after the run directory under ``federation.client_state_dir``."""
    configured = cfg.federation.client_state_dir
    if configured is None:
        return (run_dir.path / CLIENT_STORE).resolve()
    return (Path(configured).expanduser() / run_dir.path.name).resolve()


class FederatedDriver:
    """See the module docstring. ``trainer_factory`` defaults to the RLHF trainer;
    ``only_clients`` restricts training and evaluation to those clients (``fedrlhf train``)."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        run_dir: RunDir | str | Path,
        *,
        trainer_factory: HostTrainerFactory | None = None,
        only_clients: Sequence[int] | None = None,
    ) -> None:
        self.cfg = cfg
        self.run_dir = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
        fed = cfg.federation
        self.num_clients = cfg.clients.num_clients
        self.eval_clients = sorted(only_clients) if only_clients is not None else list(range(self.num_clients))
        # The centralized baseline trains one pooled client, id K, on everyone's data.
        if fed.baseline == "centralized":
            self.training_clients = [self.num_clients]
        else:
            self.training_clients = list(self.eval_clients)
        self.num_hosts = num_workers(cfg, len(self.eval_clients)) if only_clients is None else 1
        if trainer_factory is None:
            cfg_dict = cfg.to_dict()
            trainer_factory = lambda w, n: TaskTrainerFactory(cfg_dict, w, n)  # noqa: E731
        self.store_root = client_store_root(cfg, self.run_dir)
        self.prefixes = personal_prefixes(cfg)
        # Ray actor handles: their methods are called with .remote(), which Ray's typing of a
        # ray.remote(class) cannot express, so the handles are typed Any.
        self.hosts: list[Any] = [
            # Ray restarts a host whose process dies; its calls are not retried blindly: the
            # driver decides what to retry (see _call_hosts).
            ClientActor.options(num_cpus=cfg.ray.cpus_per_worker, max_restarts=-1, max_task_retries=0).remote(
                trainer_factory(w, self.num_hosts), str(self.store_root), self.prefixes, Attack.from_config(cfg)
            )
            for w in range(self.num_hosts)
        ]
        self._wait_ready()
        self.global_weights: Weights = self._received(ray.get(self.hosts[0].initial_weights.remote()))
        sparse = sparse_keys_of(self.global_weights) if fed.sparse_rows else []
        self.strategy = make_strategy(fed, sparse_keys=sparse, privacy=privacy.layers(cfg))
        self.secure = privacy.secure_aggregation(cfg)
        self.round = 0
        self.actor_restarts = 0
        self.retried_clients = 0

    def _wait_ready(self) -> None:
        refs = [h.ready.remote() for h in self.hosts]
        done, pending = ray.wait(refs, num_returns=len(refs), timeout=ACTOR_START_TIMEOUT_S)
        if pending:
            self.shutdown()
            raise UserError(
                f"{len(pending)} of {len(refs)} client actors did not start within {ACTOR_START_TIMEOUT_S:.0f}s: "
                f"the cluster lacks {self.cfg.ray.cpus_per_worker:g} free CPU(s) per actor; lower "
                "ray.num_workers or ray.cpus_per_worker, or free the cluster"
            )
        for ref in done:
            self._received(ray.get(ref))

    def _await_restart(self, h: int) -> bool:
        """Until Ray has restarted host ``h`` (a call right after the death may still reach
        the dead process); False if it does not come back."""
        deadline = time.monotonic() + ACTOR_START_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                self._received(ray.get(self.hosts[h].ready.remote(), timeout=ACTOR_START_TIMEOUT_S))
                return True
            except RayActorError:
                time.sleep(0.5)
            except ray.exceptions.GetTimeoutError:
                return False
        return False

    def shutdown(self) -> None:
        for host in self.hosts:
            ray.kill(host)

    # -- what crosses from the clients -----------------------------------------------------------
    def _received(self, obj: Any) -> Any:
        """Every object the driver receives from a client actor passes here (tests record it)."""
        return obj

    # -- helpers -------------------------------------------------------------------------------
    def sample_clients(self, round_index: int) -> list[int]:
        pool = self.training_clients
        m = self.cfg.clients_per_round_count(len(pool))
        rng = derive_rng(self.cfg.seed, "sample", round_index)
        return self.strategy.sample_clients(round_index, pool, m, rng)

    def stop_reason(self, round_index: int) -> str | None:
        """Why round ``round_index`` must not run (the strategy's say, e.g. a spent privacy
        budget), or None."""
        pool = len(self.training_clients)
        return self.strategy.stop_before(round_index, pool, self.cfg.clients_per_round_count(pool))

    def by_host(self, client_ids: list[int]) -> dict[int, list[int]]:
        """Clients grouped by the host that serves them (client k on host k mod W)."""
        groups: dict[int, list[int]] = {}
        for c in client_ids:
            groups.setdefault(c % self.num_hosts, []).append(c)
        return groups

    def _fetch(self, refs: dict[int, Any]) -> tuple[dict[int, Any], list[int]]:
        """Every host's reply (through :meth:`_received`) and the hosts whose actor died. Every
        reply is fetched before another error is re-raised: Ray prints a traceback for each
        error nobody fetched, which would bury the one-line message of this one."""
        replies: dict[int, Any] = {}
        lost: list[int] = []
        error: Exception | None = None
        for h, ref in refs.items():
            try:
                replies[h] = self._received(ray.get(ref))
            except RayActorError:
                lost.append(h)
            except Exception as err:  # noqa: BLE001 - re-raised below
                error = error or err
        if error is not None:
            raise error
        return replies, lost

    def call_hosts_once(
        self, method: str, round_index: int, groups: dict[int, list[int]], args: dict[int, tuple[Any, ...]]
    ) -> dict[int, Any]:
        """``host.method(round_index, ids, *args[h])`` on every host of ``groups``, not retried:
        a host that dies is left out of the replies (its clients drop out), and later calls
        find it restarted."""
        replies, lost = self._fetch(
            {h: getattr(self.hosts[h], method).remote(round_index, ids, *args.get(h, ())) for h, ids in groups.items()}
        )
        for h in lost:
            self.actor_restarts += 1
            warn(f"client actor {h} died in round {round_index}; its {len(groups[h])} client(s) drop out")
            self._await_restart(h)
        return replies

    def _call_hosts(
        self, method: str, round_index: int, groups: dict[int, list[int]], *rest: Any
    ) -> tuple[dict[int, Any], list[int]]:
        """``host.method(round_index, ids, *rest)`` on every host of ``groups``; a host that dies
        is retried once after Ray restarted it. Returns the replies by host and the hosts lost twice."""
        replies, lost = self._fetch(
            {h: getattr(self.hosts[h], method).remote(round_index, ids, *rest) for h, ids in groups.items()}
        )
        failed = []
        for h in lost:
            self.actor_restarts += 1
            self.retried_clients += len(groups[h])
            warn(
                f"client actor {h} died in round {round_index}; retrying its {len(groups[h])} client(s) on its restart"
            )
            try:
                if not self._await_restart(h):
                    raise RayActorError()
                retry = getattr(self.hosts[h], method).remote(round_index, groups[h], *rest)
                replies[h] = self._received(ray.get(retry))
            except RayActorError:
                # Lost twice: the round goes on without these clients; Ray restarts the host
                # again, and later calls must find it up.
                self.actor_restarts += 1
                self._await_restart(h)
                failed.append(h)
        return replies, failed

    # -- the round -----------------------------------------------------------------------------
    def instructions(self, round_index: int) -> RoundInstructions:
        """What the round's clients are told: the strategy's instructions, and how far back the
        client stores must keep records."""
        return dataclasses.replace(
            self.strategy.configure_train(round_index), keep_from=self.run_dir.oldest_kept_checkpoint()
        )

    def run_round(self) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """Train, aggregate and evaluate round ``self.round + 1``: its metrics and client rows.

        The caller checkpoints (:meth:`checkpoint`) once the rows are written."""
        r = self.round + 1
        start = time.perf_counter()
        restarts, retried = self.actor_restarts, self.retried_clients
        sampled = self.sample_clients(r)
        instructions = self.instructions(r)
        global_ref = ray.put(self.global_weights)
        shared, personal = split_personal(self.global_weights, self.prefixes)
        updates: Sequence[ClientUpdate | MaskedUpdate]
        if self.secure is not None:
            # Masked: the driver only ever holds the survivors' sum (see privacy/secure_round.py).
            template = {**shared, UNCLIPPED_KEY: np.zeros(1)} if instructions.dp_count else shared
            try:
                weighted_sum, total_weight, updates, extra = self.secure.collect(
                    self, r, sampled, global_ref, instructions, template
                )
            except SecAggError as err:
                raise RoundFailed(str(err)) from None
            received = float(sum(u.masked.nbytes for u in updates))
        else:
            updates = self._collect_updates(r, sampled, global_ref, instructions)
            received = float(sum(a.nbytes for u in updates for a in u.weights.values()))
            extra = {"fed/env_steps": float(sum(u.num_samples for u in updates))}
        train_seconds = time.perf_counter() - start
        if len(updates) < min(self.cfg.federation.min_results, len(sampled)) and not extra.get("secagg/skipped"):
            raise RoundFailed(
                f"round {r}: {len(updates)} of {len(sampled)} clients answered, fewer than federation.min_results"
            )
        if self.secure is not None:
            aggregated = self.strategy.aggregate_masked(shared, weighted_sum, total_weight)
        else:
            plain = [u for u in updates if isinstance(u, ClientUpdate)]
            aggregated = self.strategy.aggregate(shared, [u.weights for u in plain], [u.num_samples for u in plain])
        self.global_weights = merge(aggregated, personal)
        self.round = r

        metrics: dict[str, float] = {
            "round": float(r),
            "fed/clients_sampled": float(len(sampled)),
            "fed/clients_aggregated": float(len(updates)),
            "fed/stragglers": float(len(sampled) - len(updates)),
            **extra,
            "fed/update_bytes": received,
            "fed/train_seconds": train_seconds,
        }
        for key in sorted({name for u in updates for name in u.metrics}):
            values = [u.metrics[key] for u in updates if key in u.metrics]
            metrics[f"{key}/mean"] = float(np.nanmean(values)) if values else float("nan")
        client_rows: list[dict[str, Any]] = [
            {"round": r, "client": u.client_id, "kind": "train", **u.metrics} for u in updates
        ]
        # A run the strategy will stop before the next round ends with this one: evaluate it.
        if self.cfg.evaluation_due(r) or (r < self.cfg.federation.rounds and self.stop_reason(r + 1)):
            eval_metrics, eval_rows = self.evaluate(r)
            metrics.update(eval_metrics)
            client_rows += eval_rows
        metrics.update(self.strategy.round_metrics())
        metrics["fed/actor_restarts"] = float(self.actor_restarts - restarts)
        metrics["fed/retried_clients"] = float(self.retried_clients - retried)
        metrics["fed/round_seconds"] = time.perf_counter() - start
        return metrics, client_rows

    def _collect_updates(
        self, round_index: int, sampled: list[int], global_ref: Any, instructions: RoundInstructions
    ) -> list[ClientUpdate]:
        """Updates that arrive before the straggler deadline (or the first ``min_results``).

        Each host streams its clients' updates back from one call. A client still training at
        the deadline is left out of this round's aggregate; its host finishes it (and its record
        advances, as a real client's local state would) before serving anything else.
        """
        fed = self.cfg.federation
        groups = self.by_host(sampled)
        if fed.straggler_timeout_s is None:  # nothing to time out: one reply per host is cheapest
            replies, _ = self._call_hosts("train_batch", round_index, groups, global_ref, instructions)
            return sorted((u for batch in replies.values() for u in batch), key=lambda u: u.client_id)
        deadline = time.monotonic() + fed.straggler_timeout_s
        needed = min(fed.min_results, len(sampled))
        streams = {
            self.hosts[h].train_clients.remote(round_index, ids, global_ref, instructions): (h, ids, True)
            for h, ids in groups.items()
        }
        updates: list[ClientUpdate] = []
        while streams:
            timeout = None if len(updates) < needed else max(0.0, deadline - time.monotonic())
            ready, _ = ray.wait(list(streams), num_returns=1, timeout=timeout)
            if not ready:
                break  # deadline passed with enough results
            stream: Any = ready[0]  # an ObjectRefGenerator; ray.wait is typed for ObjectRefs only
            h, ids, first_try = streams[stream]
            try:
                update = self._received(ray.get(next(stream)))
            except StopIteration:
                del streams[stream]
                continue
            except RayActorError:
                del streams[stream]
                self.actor_restarts += 1
                alive = self._await_restart(h)
                missing = [c for c in ids if c not in {u.client_id for u in updates}]
                if first_try and missing and alive:
                    self.retried_clients += len(missing)
                    warn(
                        f"client actor {h} died in round {round_index}; "
                        f"retrying {len(missing)} client(s) on its restart"
                    )
                    retry = self.hosts[h].train_clients.remote(round_index, missing, global_ref, instructions)
                    streams[retry] = (h, missing, False)
                continue
            updates.append(update)
        # Aggregation order must not depend on which host finished first.
        return sorted(updates, key=lambda u: u.client_id)

    def evaluate(self, round_index: int) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """Every client's held-out metrics for the current global model, and their summary."""
        fed = self.cfg.federation
        finetune = fed.finetune_iterations if fed.personalization == "finetune" else 0
        global_ref = ray.put(self.global_weights)
        groups = self.by_host(self.eval_clients)
        replies, failed = self._call_hosts("evaluate_clients", round_index, groups, global_ref, finetune)
        if failed:
            raise RoundFailed(f"round {round_index}: client actors {failed} died twice while evaluating")
        by_client = {c: m for h, ms in replies.items() for c, m in zip(groups[h], ms, strict=True)}
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

    def initial_evaluation(self) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """Round-0 metrics of the untrained global model."""
        metrics, rows = self.evaluate(0)
        return {"round": 0.0, **metrics}, rows

    # -- the driver's checkpoint ---------------------------------------------------------------
    def checkpoint(self) -> None:
        """Round, global weights and strategy state; the client actors saved their own records."""
        self.run_dir.save_checkpoint(
            self.round,
            {"round": self.round, "global_weights": self.global_weights, "strategy": self.strategy.state()},
        )

    def restore(self) -> int:
        """Continue from the newest checkpoint that the client stores agree with; a damaged one
        falls back to the one before, with a warning. Returns the round restored."""
        rounds = self.run_dir.checkpoint_rounds()
        for r in rounds:
            try:
                state = self.run_dir.load_checkpoint(r)
            except StateFileError as err:
                warn(f"the checkpoint of round {r} is damaged ({err}); falling back to the one before")
                continue
            groups = self.by_host(self.training_clients)
            replies, failed = self._call_hosts("restore", r, groups)
            damaged = sorted(c for ids in replies.values() for c in ids)
            if damaged or failed:
                warn(f"client records of round {r} are damaged (clients {damaged[:5]}); falling back to the one before")
                continue
            self.round = r
            self.global_weights = {k: np.asarray(v) for k, v in state["global_weights"].items()}
            self.strategy.load_state(state["strategy"])
            self.run_dir.truncate_metrics(r)
            return r
        what = f"{len(rounds)} checkpoint(s), none usable" if rounds else "no checkpoint"
        raise UserError(f"--resume {self.run_dir}: {what}; start the run again")

    def placement(self) -> list[dict[str, Any]]:
        """Which Ray node runs each client host, and which clients it serves."""
        nodes = [self._received(n) for n in ray.get([h.node_id.remote() for h in self.hosts])]
        groups = self.by_host(self.training_clients)
        return [{"host": i, "node_id": n, "clients": groups.get(i, [])} for i, n in enumerate(nodes)]
