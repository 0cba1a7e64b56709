"""The federated driver: owns the global weights and the round.

Each round reads as sample → configure → collect → aggregate → evaluate: sample clients (seeded
per round), ask the strategy for the round's instructions, broadcast the global weights with one
``ray.put``, collect the round with the collector (the plain updates under a straggler timeout,
or, under secure aggregation, only their sum), aggregate with the strategy, and evaluate every
client on held-out data. The client actors are a :class:`~fedrlhf_ray.host_pool.HostPool`.
The driver's checkpoint holds the round, the global weights and the strategy's state — never a
client's record: client actors keep those in their own store, and the driver never asks for
them. Everything the driver receives from a client actor passes through :meth:`_received`:
shared weights (or masked vectors), sample counts and scalar metrics.

A client actor that dies mid-round is restarted by Ray; the driver retries the lost clients'
round once on it (the actor restores them from its store as of the last completed round, so
the retry reproduces the lost result exactly). If the retry fails too, the round aggregates
what arrived when at least ``federation.min_results`` did.

Every random stream is derived from ``(seed, round, client)``, so a resumed or retried run
repeats an uninterrupted one exactly. The driver runs in its own Ray actor (:class:`DriverHost`,
the driver actor), on the node the run started from unless ``ray.driver_resources`` says
otherwise, and holds no data of any client; the experiment's process only gets metrics and rows.
"""

from __future__ import annotations

import contextlib
import io
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import ray

from fedrlhf_ray import privacy
from fedrlhf_ray.attacks import Attack
from fedrlhf_ray.collectors import Collected, Collector, PlainCollector, RoundSpent
from fedrlhf_ray.config import validate_config
from fedrlhf_ray.errors import UserError
from fedrlhf_ray.host_pool import HostPool
from fedrlhf_ray.local_trainer import ClientUpdate, LocalTrainer, RoundInstructions, Weights
from fedrlhf_ray.metrics import summarize
from fedrlhf_ray.privacy.client_policy import ClientPolicy, evaluation_digest, round_input_digest
from fedrlhf_ray.privacy.secagg import SecAggError
from fedrlhf_ray.rundir import CLIENT_STORE, WARNING_PREFIX, RunDir, warn
from fedrlhf_ray.schema import ExperimentConfig
from fedrlhf_ray.seeding import derive_rng
from fedrlhf_ray.state_codec import StateFileError
from fedrlhf_ray.strategies import RoundPlan, SumAggregator, make_strategy, merge, sparse_keys_of, split_personal
from fedrlhf_ray.tasks import task_for

# (host index, number of hosts) -> a picklable zero-argument factory run inside the actor.
HostTrainerFactory = Callable[[int, int], Callable[[], LocalTrainer]]


class RoundFailed(RuntimeError):
    """Too few clients answered a round, even after retrying the lost ones."""


# The last secure round whose masked inputs the driver asked for (see FederatedDriver.run_round).
SECURE_ROUND = "secure_round.json"
NOTHING_SENT = {"round": 0, "fewest": 1, "evaluated": -1}


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
    """See the module docstring. ``trainer_factory`` defaults to the task's trainer;
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
        num_hosts = num_workers(cfg, len(self.eval_clients)) if only_clients is None else 1
        if trainer_factory is None:
            cfg_dict = cfg.to_dict()
            trainer_factory = lambda w, n: TaskTrainerFactory(cfg_dict, w, n)  # noqa: E731
        self.store_root = client_store_root(cfg, self.run_dir)
        self.prefixes = personal_prefixes(cfg)
        self.pool = HostPool(
            [trainer_factory(w, num_hosts) for w in range(num_hosts)], str(self.store_root), self.prefixes,
            Attack.from_config(cfg), cfg.ray.cpus_per_worker, received=self._received,
            policy=ClientPolicy.from_config(cfg),
        )
        self.global_weights: Weights = self.pool.first("initial_weights")
        if privacy.private_evaluation(cfg) and cfg.privacy.secagg_adversary == "malicious":
            # The federation's setup: the clients' identities into the registry.
            self.pool.call("register", 0, self.pool.by_host(self.training_clients))
        sparse = sparse_keys_of(self.global_weights) if fed.sparse_rows else []
        self.strategy = make_strategy(fed, sparse_keys=sparse, privacy=privacy.layers(cfg))
        self.collector: Collector = privacy.secure_collector(cfg, self._note_secure_round) or PlainCollector(
            fed.straggler_timeout_s, fed.min_results
        )
        # Under secure aggregation or DP, held-out metrics are summed securely too.
        self.secure_evaluation = privacy.secure_collector(cfg, evaluation=True)
        # What the driver noted of its secure sessions (see SECURE_ROUND). On resume, rounds up to
        # its "round" that no checkpoint completed are spent, never run again.
        self.journal: dict[str, int] = dict(NOTHING_SENT)
        self.round = 0

    @property
    def hosts(self) -> list[Any]:
        return self.pool.hosts

    @property
    def num_hosts(self) -> int:
        return self.pool.num_hosts

    def shutdown(self) -> None:
        self.pool.shutdown()

    # -- what crosses from the clients -----------------------------------------------------------
    def _received(self, obj: Any) -> Any:
        """Every object the driver receives from a client actor passes here (tests record it)."""
        return obj

    # -- the round -----------------------------------------------------------------------------
    def plan_round(self, round_index: int) -> RoundPlan:
        """The strategy's plan of round ``round_index``: its clients, drawn from the round's stream."""
        pool = self.training_clients
        m = self.cfg.clients_per_round_count(len(pool))
        rng = derive_rng(self.cfg.seed, "sample", round_index)
        return self.strategy.plan_round(round_index, pool, m, rng)

    def stop_reason(self, round_index: int) -> str | None:
        """Why round ``round_index`` must not run (the strategy's say, e.g. a spent privacy
        budget), or None."""
        pool = len(self.training_clients)
        return self.strategy.stop_before(round_index, pool, self.cfg.clients_per_round_count(pool))

    def instructions(self, plan: RoundPlan) -> RoundInstructions:
        """What the round's clients are told: the strategy's instructions (and its layers')."""
        return self.strategy.configure_train(plan)

    def collect(
        self, round_index: int, sampled: list[int], global_ref: Any, instructions: RoundInstructions,
        shared: Weights,
    ) -> Collected:
        """The round's collection. The client stores keep the records a fall back to the oldest
        checkpoint the driver may still restore needs (``keep_from``)."""
        keep_from = self.run_dir.oldest_kept_checkpoint()
        digest = round_input_digest(self.global_weights, instructions)
        try:
            return self.collector.collect(
                self.pool, round_index, sampled, global_ref, instructions, shared, keep_from, digest
            )
        except SecAggError as err:
            raise RoundFailed(str(err)) from None

    def aggregate(self, plan: RoundPlan, shared: Weights, collected: Collected) -> Weights:
        """The strategy's new shared weights from what was collected: a secure sum, or the updates."""
        if collected.total is not None:
            weighted_sum, total_weight = collected.total
            # The preflight refused secure aggregation with a strategy that cannot sum.
            assert isinstance(self.strategy, SumAggregator), self.strategy.name
            return self.strategy.aggregate_sum(plan, shared, weighted_sum, total_weight)
        plain = [u for u in collected.updates if isinstance(u, ClientUpdate)]
        return self.strategy.aggregate(plan, shared, [u.weights for u in plain], [u.num_samples for u in plain])

    def _note_secure_round(self, round_index: int, fewest: int) -> None:
        """On disk before a secure round's masked inputs are asked for (see :meth:`run_round`)."""
        self.journal.update(round=round_index, fewest=fewest)
        self.run_dir.write_json(SECURE_ROUND, self.journal)

    def _note_secure_evaluation(self, round_index: int) -> None:
        """On disk before a secure evaluation's masked inputs are asked for (see :meth:`evaluate`)."""
        self.journal["evaluated"] = round_index
        self.run_dir.write_json(SECURE_ROUND, self.journal)

    def _noted_secure_round(self) -> dict[str, int]:
        """:data:`SECURE_ROUND`'s notes; nothing sent yet when it is missing."""
        if not (self.run_dir.path / SECURE_ROUND).exists():
            return dict(NOTHING_SENT)
        noted = self.run_dir.read_json(SECURE_ROUND) or {}
        values: dict[str, int] = {}
        for key, least in (("round", 0), ("fewest", 1), ("evaluated", -1)):
            value = noted.get(key, -1 if key == "evaluated" else None)
            if isinstance(value, int) and value >= least:
                values[key] = value
        if len(values) < 3:
            raise UserError(
                f"--resume {self.run_dir}: {SECURE_ROUND} is damaged, so which rounds the clients sent masked "
                "inputs for is unknown; start the run again"
            )
        return values

    def run_round(self) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """Sample, configure, collect, aggregate and evaluate round ``self.round + 1``: its metrics
        and client rows. The caller checkpoints (:meth:`checkpoint`) once the rows are written.

        Under secure aggregation a round runs at most once: one that fails after its masked
        inputs were asked for is spent (the global model stays, DP accounts it, the run goes on
        with the next round, new sample, masks and noise), and so is, on resume, a round noted
        in :data:`SECURE_ROUND` that no checkpoint completed."""
        r = self.round + 1
        start = time.perf_counter()
        restarts, retried = self.pool.actor_restarts, self.pool.retried_clients
        plan = self.plan_round(r)
        if r <= self.journal["round"]:
            return self._spent_round(plan, RoundSpent(
                f"round {r} was cut off after its masked inputs were asked for", self.journal["fewest"]
            ), start)
        sampled = list(plan.sampled)
        instructions = self.instructions(plan)
        global_ref = ray.put(self.global_weights)
        shared, personal = split_personal(self.global_weights, self.prefixes)
        try:
            collected = self.collect(r, sampled, global_ref, instructions, shared)
        except RoundSpent as spent:
            return self._spent_round(plan, spent, start)
        updates = collected.updates
        train_seconds = time.perf_counter() - start
        if len(updates) < min(self.cfg.federation.min_results, len(sampled)) and not collected.skipped:
            reason = f"round {r}: {len(updates)} of {len(sampled)} clients answered, fewer than federation.min_results"
            if collected.total is not None:  # a secure sum: the masked inputs have left
                return self._spent_round(plan, RoundSpent(reason, len(updates)), start)
            raise RoundFailed(reason)
        self.global_weights = merge(self.aggregate(plan, shared, collected), personal)
        self.round = r

        metrics: dict[str, float] = {
            "round": float(r),
            "fed/clients_sampled": float(len(sampled)),
            "fed/clients_aggregated": float(len(updates)),
            "fed/stragglers": float(len(sampled) - len(updates)),
            **collected.metrics,
            "fed/update_bytes": collected.received_bytes,
            "fed/train_seconds": train_seconds,
        }
        for key in sorted({name for u in updates for name in u.metrics}):
            values = [u.metrics[key] for u in updates if key in u.metrics]
            metrics[f"{key}/mean"] = float(np.nanmean(values)) if values else float("nan")
        # Under DP, who was sampled is part of the secret the accountant's amplification by
        # sampling relies on: only the counts above are logged, no client's training row.
        client_rows: list[dict[str, Any]] = [] if self.cfg.privacy.dp.enabled else [
            {"round": r, "client": u.client_id, "kind": "train", **u.metrics} for u in updates
        ]
        # A run the strategy will stop before the next round ends with this one: evaluate it.
        if self.cfg.evaluation_due(r) or (r < self.cfg.federation.rounds and self.stop_reason(r + 1)):
            eval_metrics, eval_rows = self.evaluate(r)
            metrics.update(eval_metrics)
            client_rows += eval_rows
        metrics.update(self.strategy.round_metrics())
        # Updates the non-finite filter dropped were received, not aggregated.
        metrics["fed/clients_aggregated"] -= metrics.get("fed/rejected", 0.0)
        metrics["fed/actor_restarts"] = float(self.pool.actor_restarts - restarts)
        metrics["fed/retried_clients"] = float(self.pool.retried_clients - retried)
        metrics["fed/round_seconds"] = time.perf_counter() - start
        return metrics, client_rows

    def _spent_round(
        self, plan: RoundPlan, spent: RoundSpent, start: float
    ) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """A secure round that failed after its masked inputs were asked for (see :meth:`run_round`);
        ``start``: when the round began (``time.perf_counter``)."""
        r = plan.round_index
        self.strategy.spent(plan, spent.contributors)
        self.round = r
        warn(f"{spent}; the round is spent, never run again: "
             f"the global model stays as it was and the run goes on with round {r + 1}")
        metrics: dict[str, float] = {
            "round": float(r),
            "fed/round_failed": 1.0,
            "fed/clients_sampled": float(len(plan.sampled)),
            "fed/clients_aggregated": 0.0,
        }
        rows: list[dict[str, Any]] = []
        if self.cfg.evaluation_due(r) or (r < self.cfg.federation.rounds and self.stop_reason(r + 1)):
            eval_metrics, rows = self.evaluate(r)
            metrics.update(eval_metrics)
        metrics.update(self.strategy.round_metrics())
        metrics["fed/round_seconds"] = time.perf_counter() - start
        return metrics, rows

    def evaluate(self, round_index: int) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """Every client's held-out metrics for the current global model, and their summary; under
        secure aggregation or DP only their means, from a secure sum (:meth:`_evaluate_securely`)."""
        fed = self.cfg.federation
        finetune = fed.finetune_iterations if fed.personalization == "finetune" else 0
        global_ref = ray.put(self.global_weights)
        if self.secure_evaluation is not None:
            return self._evaluate_securely(round_index, global_ref, finetune), []
        groups = self.pool.by_host(self.eval_clients)
        replies, failed = self.pool.call("evaluate_clients", round_index, groups, global_ref, finetune)
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

    def client_samples(self, round_index: int) -> dict[int, str]:
        """Each evaluated client's text of its own model (none under the privacy modes, whose
        clients release no per-client output); a client whose host died twice is left out."""
        if self.secure_evaluation is not None:
            return {}
        fed = self.cfg.federation
        finetune = fed.finetune_iterations if fed.personalization == "finetune" else 0
        groups = self.pool.by_host(self.eval_clients)
        replies, _ = self.pool.call("client_samples", round_index, groups, ray.put(self.global_weights), finetune)
        return {c: text for h, texts in replies.items() for c, text in zip(groups[h], texts, strict=True)
                if text is not None}

    def _evaluate_securely(self, round_index: int, global_ref: Any, finetune: int) -> dict[str, float]:
        """``<metric>/mean`` over the clients and ``eval/clients``, summed securely: no client's
        metrics reach the driver, and only over at least 3 clients. An evaluation runs at most
        once a round; one that fails, or that a resume finds noted, is left out with a warning."""
        assert self.secure_evaluation is not None
        r = round_index
        if len(self.eval_clients) < 3:
            warn(f"round {r}: {len(self.eval_clients)} clients evaluate; a secure sum needs 3, so no metrics")
            return {}
        if r <= self.journal["evaluated"]:
            warn(f"round {r}: its secure evaluation was cut off after its masked inputs were asked for; "
                 "it is not run again, so the round has no held-out metrics")
            return {}
        digest = evaluation_digest(self.global_weights, finetune)
        try:
            means, count = self.secure_evaluation.evaluate(
                self.pool, r, self.eval_clients, global_ref, finetune, digest,
                lambda _session, _fewest: self._note_secure_evaluation(r),
            )
        except (SecAggError, RoundSpent) as err:
            warn(f"round {r}: the secure evaluation failed ({err}); the round has no held-out metrics")
            return {}
        return {**{f"{k}/mean": v for k, v in means.items()}, "eval/clients": float(count)}

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
        journal = self._noted_secure_round()
        for r in rounds:
            try:
                state = self.run_dir.load_checkpoint(r)
                weights = {str(k): np.asarray(v) for k, v in state["global_weights"].items()}
                expected = {k: np.shape(v) for k, v in self.global_weights.items()}
                if {k: v.shape for k, v in weights.items()} != expected:
                    raise ValueError("its global weights do not fit the model")
                self.strategy.load_state(state["strategy"])
            except (StateFileError, KeyError, TypeError, ValueError, AttributeError) as err:
                warn(f"the checkpoint of round {r} is damaged ({err}); falling back to the one before")
                continue
            # Clients' records as of the last round they may have trained in: they go on from there.
            groups = self.pool.by_host(self.training_clients)
            replies, failed = self.pool.call("restore", max(r, journal["round"]), groups)
            damaged = sorted(c for ids in replies.values() for c in ids)
            if damaged or failed:
                warn(f"client records of round {r} are damaged (clients {damaged[:5]}); falling back to the one before")
                continue
            self.round = r
            self.global_weights = weights
            self.journal = journal
            self.run_dir.truncate_metrics(r)
            return r
        what = f"{len(rounds)} checkpoint(s), none usable" if rounds else "no checkpoint"
        raise UserError(f"--resume {self.run_dir}: {what}; start the run again")

    def placement(self) -> list[dict[str, Any]]:
        """Which Ray node runs each client host, and which clients it serves."""
        return self.pool.placement(self.training_clients)


class DriverHost:
    """The lifecycle's side of the driver, run in a Ray actor (:data:`DriverActor`, the card's
    driver actor) or, for instrumented tests and benches, in the lifecycle's own process.

    It builds the driver (``driver_cls``: :class:`FederatedDriver` or a subclass) inside the actor,
    so the global weights live there and only metrics, rows and file names come back; the task's
    round artifacts (IMDb: sample generations) and the final model are written from here too.
    """

    def __init__(self) -> None:
        self.driver: FederatedDriver | None = None
        self.artifacts: Any = None
        self.pending_warnings: list[str] = []

    def invoke(self, method: str, *args: Any) -> tuple[Any, list[str]]:
        """``self.method(*args)`` in the actor, with the warning lines it printed (an actor's
        stderr does not reach the command's console: the caller prints them there). When it
        raises, its warnings wait for :meth:`drain`."""
        buffer = io.StringIO()
        try:
            with contextlib.redirect_stderr(buffer):
                result = getattr(self, method)(*args)
        except BaseException:
            self.pending_warnings = _warning_lines(buffer.getvalue())
            raise
        return result, _warning_lines(buffer.getvalue())

    def drain(self) -> list[str]:
        lines, self.pending_warnings = self.pending_warnings, []
        return lines

    def start(
        self, driver_cls: Callable[..., FederatedDriver], cfg: ExperimentConfig, run_dir: str,
        trainer_factory: HostTrainerFactory | None, only_clients: Sequence[int] | None,
    ) -> None:
        self.driver = driver_cls(cfg, run_dir, trainer_factory=trainer_factory, only_clients=only_clients)
        if trainer_factory is None:  # a replaced trainer is not the task's: no task artifacts
            self.artifacts = task_for(cfg.env.name).round_artifacts(cfg)

    @property
    def started(self) -> FederatedDriver:
        assert self.driver is not None, "the driver has not started"
        return self.driver

    def ping(self) -> bool:
        return True

    def where(self) -> dict[str, Any]:
        """The Ray node and process the driver runs in."""
        node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"
        return {"node_id": node, "pid": os.getpid()}

    def call(self, method: str, *args: Any) -> Any:
        """``driver.method(*args)``: its round, evaluation, checkpoint, restore, placement, ..."""
        return getattr(self.started, method)(*args)

    def write_round_artifacts(self, round_index: int) -> list[str]:
        """The task's text of the global model after an evaluated round, and of each client's own
        model where the clients release it; the names written."""
        if self.artifacts is None:
            return []
        drv = self.started
        names = [drv.run_dir.write_samples(round_index, self.artifacts.text(round_index, drv.global_weights))]
        for client, text in sorted(drv.client_samples(round_index).items()):
            names.append(drv.run_dir.write_samples(round_index, text, client))
        return names

    def save_final_weights(self) -> None:
        drv = self.started
        drv.run_dir.save_final_weights(drv.global_weights)

    def shutdown(self) -> None:
        if self.driver is not None:
            self.driver.shutdown()


def _warning_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(WARNING_PREFIX)]


DriverActor = ray.remote(DriverHost)


def driver_actor_options(cfg: ExperimentConfig) -> dict[str, Any]:
    """Where the driver actor runs: on ``ray.driver_resources`` if given; in a Tune trial, in the
    trial's placement group (with the client actors it starts); else on this node, with no CPU
    (it relays and aggregates; the client actors train)."""
    from ray.util import get_current_placement_group
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    wanted = cfg.ray.driver_resources
    options: dict[str, Any] = {"num_cpus": 0, "max_restarts": 0, "max_task_retries": 0}
    if wanted:
        custom = {k: float(v) for k, v in wanted.items() if k not in ("CPU", "GPU")}
        options.update(num_cpus=float(wanted.get("CPU", 0.0)), num_gpus=float(wanted.get("GPU", 0.0)))
        if custom:
            options["resources"] = custom
        return options
    if get_current_placement_group() is None:
        node = ray.get_runtime_context().get_node_id()
        options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id=node, soft=False)
    return options
