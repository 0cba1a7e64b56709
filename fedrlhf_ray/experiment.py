"""One experiment lifecycle: from start or resume to its end, for every caller.

:func:`run_experiment` is the only round loop of the platform. ``fedrlhf run``, a Tune trial,
``fedrlhf train``, the benches and the tests call it and pass hooks instead of writing their
own loop (as Flower's ``Strategy.start()`` or RLlib's ``Algorithm`` serve every caller). It

1. checks what can be checked before anything is created: the data, the tracking store, Ray
   (started or joined) and whether the client actors fit on it;
2. creates the run directory (or reopens it on resume) and starts (or reopens) the MLflow run;
3. builds the driver and its client actors, and restores the last consistent checkpoint;
4. evaluates round 0 (a fresh run), then runs the rounds: each round's rows are appended, the
   driver checkpoints, MLflow gets the round, and ``on_round`` is called;
5. ends as ``completed`` (summary, artifacts, MLflow FINISHED), ``failed`` (FAILED) or
   ``interrupted`` (Ctrl-C or SIGTERM: KILLED), and always stops its client actors.

A run that dies before its first checkpoint leaves neither a run directory nor an MLflow run.
A resume that fails before it completes a new round leaves the run as it found it (its
``status.json``, its config and its MLflow run's status). The hook of the last round runs after
the run is finished, so a hook that ends the process (Tune, at a trial's last report) loses
nothing.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from fedrlhf_ray import tracking
from fedrlhf_ray.config import load_config
from fedrlhf_ray.errors import UserError
from fedrlhf_ray.ray_runtime import check_fits, ensure_ray, local_ray_processes, reap
from fedrlhf_ray.rundir import CONFIG, FINAL_WEIGHTS, RAY_PROCESSES, STATUS, SUMMARY, RunDir, find_link, warn
from fedrlhf_ray.schema import ExperimentConfig
from fedrlhf_ray.tasks import task_for

# Fields a resumed run may change: it otherwise keeps the config it started with.
RESUMABLE_OVERRIDES = ("federation.rounds",)


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C: the run ends interrupted (MLflow: KILLED)."""


_sigterm_received: list[bool] = []  # Ray may re-raise the interrupt as a plain KeyboardInterrupt


def _raise_terminated(signum: int, frame: Any) -> None:
    _sigterm_received.append(True)
    raise Terminated()


def install_sigterm_handler() -> None:
    """SIGTERM raises :class:`Terminated` (install it after ``ray.init``, which sets its own)."""
    signal.signal(signal.SIGTERM, _raise_terminated)


def was_terminated(err: BaseException) -> bool:
    """Whether an interrupt came from SIGTERM rather than Ctrl-C."""
    return isinstance(err, Terminated) or bool(_sigterm_received)


@dataclass
class Progress:
    """What the hooks see: the run directory, rounds done and to do, and the latest metrics."""

    run_dir: RunDir
    total_rounds: int
    completed_rounds: int
    resumed: bool
    placement: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)  # the round just finished
    last_eval: dict[str, float] = field(default_factory=dict)  # the latest eval/ metrics
    tracker: tracking.RunTracker | None = None


@dataclass
class Result:
    """How an experiment ended."""

    run_dir: RunDir
    status: str
    rounds: int
    initial: dict[str, float]
    final: dict[str, float]
    summary: dict[str, Any]
    tracker: tracking.RunTracker | None


RoundHook = Callable[[Progress], None]


def check_data(cfg: ExperimentConfig) -> None:
    """The preflight a run and a sweep share: the task's data (and prepared public models) can
    serve ``cfg``, checked before anything is created; a problem is one line."""
    task_for(cfg.env.name).check_data(cfg, announce=True)


def resume_config(run_dir: Path, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """The config a run directory was started with, plus the overrides a resume may make."""
    rd = RunDir(run_dir)
    if not rd.path.is_dir():
        raise UserError(f"--resume {run_dir}: no such run directory")
    refuse_links(Path(run_dir))
    if not (rd / CONFIG).is_file():
        raise UserError(f"--resume {run_dir}: no {CONFIG} there (not a run directory)")
    if not rd.checkpoint_rounds():
        raise UserError(f"--resume {run_dir}: no checkpoint there (no round finished); start the run again")
    for text in overrides:
        if text.partition("=")[0].strip() not in RESUMABLE_OVERRIDES:
            raise UserError(
                f"--set {text!r}: a resumed run keeps its config; only {', '.join(RESUMABLE_OVERRIDES)} may change"
            )
    cfg = load_config(rd / CONFIG, list(overrides))
    done = rd.checkpoint_rounds()[0]
    stopped = (rd.read_json(SUMMARY) or {}).get("stopped") if rd.status() == "completed" else None
    if stopped:
        raise UserError(f"--resume {run_dir}: the run ended after round {done} ({stopped}); it cannot go on")
    if rd.status() == "completed" and cfg.federation.rounds <= done:
        raise UserError(
            f"--resume {run_dir}: the run already completed its {done} rounds; "
            f"add rounds with --set federation.rounds={done + 1} or more"
        )
    return cfg


def refuse_links(run_dir: Path, client_state_dir: str | None = None) -> None:
    """A resume reads and writes the run directory and the client store: one line, before
    anything is read or written, if a symbolic link or a hard-linked file lies anywhere in them."""
    roots = [run_dir]
    if client_state_dir is not None:
        roots.append(Path(client_state_dir).expanduser() / run_dir.resolve().name)
    for root in roots:
        link = find_link(root)
        if link is not None:
            kind = "a symbolic link" if link.is_symlink() else "a file with another hard link"
            raise UserError(
                f"--resume {run_dir}: {link} is {kind}; a run directory holds neither "
                "(remove it, or start the run again)"
            )


def check_out_location(out: str | Path, label: str = "--out") -> None:
    """Fail before anything starts when ``out`` cannot hold run directories: it is a file, lies
    under a file, or the folder that would hold it is read-only."""
    path = Path(out).expanduser().absolute()
    for ancestor in (path, *path.parents):
        if ancestor.exists():
            if not ancestor.is_dir():
                where = "is a file" if ancestor == path else f"lies under the file {ancestor}"
                raise UserError(f"{label} {out}: {where}; give a folder")
            if not os.access(ancestor, os.W_OK | os.X_OK) or _read_only_mount(ancestor):
                raise UserError(f"{label} {out}: {ancestor} is read-only; give a writable folder")
            return


def _read_only_mount(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def new_run_dir(out: str | Path, name: str) -> RunDir:
    """``OUT/NAME-YYYYmmdd-HHMMSS``, created now; one line when OUT cannot hold it."""
    parent = Path(out)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    path = parent / f"{name}-{stamp}"
    try:
        parent.mkdir(parents=True, exist_ok=True)
        suffix = 1
        while path.exists():  # two runs started in the same second
            path = parent / f"{name}-{stamp}-{suffix}"
            suffix += 1
        path.mkdir()
        probe = path / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        shutil.rmtree(path, ignore_errors=True)
        raise UserError(
            f"--out {out}: cannot create a run directory there ({err.strerror or err}); give a writable folder"
        ) from None
    return RunDir(path.resolve())


def run_experiment(
    cfg: ExperimentConfig,
    *,
    out: str | Path = "runs",
    run_dir: str | Path | None = None,
    resume: bool = False,
    tracking_uri: str | None = None,
    address: str | None = None,
    trainer_factory: Any = None,
    only_clients: Sequence[int] | None = None,
    extra_tags: dict[str, str] | None = None,
    on_start: RoundHook | None = None,
    on_round: RoundHook | None = None,
    handle_sigterm: bool = False,
    check_resources: bool = True,
    driver_cls: Callable[..., Any] | None = None,
    in_process_driver: bool = False,
) -> Result:
    """Run ``cfg`` (see the module docstring).

    ``run_dir``: the run directory to use (a Tune trial's) or, with ``resume``, to continue;
    otherwise a new one is made under ``out``. ``trainer_factory`` replaces the RLHF trainer
    (tests and benches); ``only_clients`` trains and evaluates just those clients (single-client
    training). ``check_resources`` is off inside a Tune trial, whose placement group holds its
    actors' CPUs already. ``driver_cls`` builds the driver in place of :class:`FederatedDriver` (the leakage
    audit's drivers: a subclass, or one with its arguments bound).
    """
    if trainer_factory is None:
        check_data(cfg)
    if not resume and run_dir is None:
        check_out_location(out)
    if cfg.federation.client_state_dir is not None:
        check_out_location(cfg.federation.client_state_dir, "federation.client_state_dir")
    uri = None
    if cfg.tracking.enabled:
        # A resume continues where its MLflow run lives unless told otherwise: only that store
        # is checked (not the default one of the current folder).
        previous = None
        if resume and tracking_uri is None and run_dir is not None:
            previous = tracking.load_tracker(Path(run_dir), cfg.tracking.per_client)
        uri = tracking.usable_tracking_uri(cfg, previous.tracking_uri if previous else tracking_uri)
    if resume and run_dir is not None:
        refuse_links(Path(run_dir), cfg.federation.client_state_dir)
        reap(RunDir(run_dir).read_json(RAY_PROCESSES), str(run_dir))
    ray_mode = ensure_ray(cfg, address)
    if handle_sigterm:
        install_sigterm_handler()

    from fedrlhf_ray.driver import FederatedDriver, num_workers

    if check_resources:
        training = 1 if only_clients is not None else cfg.clients.num_clients
        check_fits(cfg, num_workers(cfg, training))

    if resume:
        if run_dir is None:
            raise ValueError("resume needs the run directory")
        rd = RunDir(Path(run_dir).resolve())
        before = {name: _read_bytes(rd / name) for name in (STATUS, CONFIG)}
    else:
        rd = new_run_dir(out, cfg.name) if run_dir is None else _fresh_dir(Path(run_dir))
        before = {}
    life = _Lifecycle(cfg, rd, resume, before, owns_ray=ray_mode == "started")
    try:
        return life.run(
            uri, trainer_factory, only_clients, extra_tags, on_start, on_round, driver_cls or FederatedDriver,
            in_process_driver,
        )
    finally:
        life.stop_actors()


def _fresh_dir(path: Path) -> RunDir:
    path.mkdir(parents=True, exist_ok=True)
    return RunDir(path.resolve())


def _read_bytes(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


class _Lifecycle:
    """The state of one :func:`run_experiment` call, so that its error path knows what exists."""

    def __init__(
        self, cfg: ExperimentConfig, rd: RunDir, resume: bool, before: dict[str, bytes | None], owns_ray: bool
    ) -> None:
        self.owns_ray = owns_ray
        self.cfg = cfg
        self.rd = rd
        self.resume = resume
        self.before = before
        self.driver: DriverClient | None = None
        self.driver_where: dict[str, Any] = {}
        self.tracker: tracking.RunTracker | None = None
        self.tracker_status_before: str | None = None
        self.new_rounds = 0
        self.finished = False

    def run(
        self, uri, trainer_factory, only_clients, extra_tags, on_start, on_round, driver_cls, in_process_driver
    ) -> Result:
        cfg, rd = self.cfg, self.rd
        try:
            if self.owns_ray:
                rd.write_json(RAY_PROCESSES, local_ray_processes())
            rd.write_config(cfg.to_dict())  # on resume: a raised federation.rounds is kept
            self.tracker = self._start_tracking(uri, extra_tags)
            driver = self.driver = DriverClient.start(
                cfg, driver_cls, rd, trainer_factory, only_clients, in_process=in_process_driver
            )
            done_round = 0
            if self.resume:
                done_round = driver.call("restore")
                initial = rd.round_metrics(0)
            else:
                initial, rows = driver.call("initial_evaluation")
                rd.append_metrics([initial], rows)
                self._write_samples(0)
            if self.tracker is not None:
                if self.resume:
                    self.tracker.reopen()
                    self.tracker.set_tags(tracking.run_tags(cfg))
                    self.tracker.backfill(rd.path)
                else:
                    self.tracker.log_round(0, initial, rd.client_metrics())
            placement = driver.call("placement")
            self.driver_where = driver.host("where")
            rd.write_status("running", placement=placement, driver=self.driver_where)
            if self.tracker is not None:
                self.tracker.set_tags({"fedrlhf.ray_nodes": str(len({p["node_id"] for p in placement}))})
            progress = Progress(
                rd, cfg.federation.rounds, done_round, self.resume, placement,
                last_eval=rd.last_evaluation(), tracker=self.tracker,
            )
            if on_start is not None:
                on_start(progress)
            result = None
            while done_round < cfg.federation.rounds and result is None:
                metrics, rows = driver.call("run_round")
                done_round = int(metrics["round"])
                rd.append_metrics([metrics], rows)
                driver.call("checkpoint")
                self.new_rounds += 1
                if any(k.startswith("eval/") for k in metrics):
                    self._write_samples(done_round)
                if self.tracker is not None:  # after the checkpoint: a logged round is a resumable round
                    self.tracker.log_round(done_round, metrics, rows)
                progress.completed_rounds = done_round
                progress.metrics = metrics
                if any(k.startswith("eval/") for k in metrics):
                    progress.last_eval = {k: v for k, v in metrics.items() if k.startswith("eval/")}
                done = done_round == cfg.federation.rounds
                stop = None if done else driver.call("stop_reason", done_round + 1)
                if stop is not None:
                    warn(f"the run ends after round {done_round}: {stop}")
                if done or stop is not None:
                    result = self._finish(initial, progress, stop)
                if on_round is not None:
                    on_round(progress)
            return result if result is not None else self._finish(initial, progress)
        except BaseException as err:
            self._fail(err)
            raise

    def _write_samples(self, round_index: int) -> None:
        """The task's text of the global model (IMDb: sample generations), to the run dir and MLflow."""
        if self.driver is None:
            return
        names = self.driver.host("write_round_artifacts", round_index)
        if self.tracker is not None and names:
            self.tracker.log_artifacts(self.rd.path, names, "samples")

    # -- tracking ------------------------------------------------------------------------------
    def _start_tracking(self, uri: str | None, extra_tags: dict[str, str] | None) -> tracking.RunTracker | None:
        if uri is None:
            return None
        if self.resume:
            previous = tracking.load_tracker(self.rd.path, self.cfg.tracking.per_client)
            if previous is not None and previous.tracking_uri == uri:
                self.tracker_status_before = previous.status()
                return previous
        return tracking.start_run(self.cfg, self.rd.path, uri, extra_tags=extra_tags)

    # -- the end -------------------------------------------------------------------------------
    def _finish(self, initial: dict[str, float], progress: Progress, stopped: str | None = None) -> Result:
        rd = self.rd
        final = progress.last_eval
        rounds = progress.completed_rounds
        summary: dict[str, Any] = {"rounds": rounds, "initial": initial, "final": final}
        if stopped is not None:
            summary["stopped"] = stopped
        if "privacy/epsilon" in progress.metrics:
            summary["privacy"] = {
                k.removeprefix("privacy/"): v for k, v in progress.metrics.items() if k.startswith("privacy/")
            }
            summary["privacy"].update(delta=self.cfg.privacy.dp.delta, mode=self.cfg.privacy.dp.mode)
        summary.update(task_for(self.cfg.env.name).summary(final))
        rd.write_json(SUMMARY, summary)
        # The commit lets a report say what code made the run (None outside a git checkout).
        rd.write_status("completed", rounds=rounds, placement=progress.placement, driver=self.driver_where,
                        commit=tracking.git_commit())
        if self.tracker is not None:
            self._log_artifacts(with_model=True)
            self.tracker.finish("FINISHED")
        self.finished = True
        return Result(rd, "completed", rounds, initial, final, summary, self.tracker)

    def _log_artifacts(self, with_model: bool) -> None:
        rd = self.rd
        assert self.tracker is not None
        if with_model and self.driver is not None:
            self.driver.host("save_final_weights")
            self.tracker.log_artifacts(rd.path, [FINAL_WEIGHTS], "model")
        tracking.log_run_files(self.tracker, rd.path, self.cfg.name, task_for(self.cfg.env.name).curve_panels)

    def _fail(self, err: BaseException) -> None:
        rd = self.rd
        if self.finished:  # a hook failed after the run was complete: it stays complete
            return
        interrupted = isinstance(err, KeyboardInterrupt)
        mlflow_status = "KILLED" if interrupted else "FAILED"
        if not self.resume and not rd.checkpoint_rounds():
            # Nothing to resume: leave nothing behind.
            self.stop_actors()
            shutil.rmtree(rd.path, ignore_errors=True)
            if self.tracker is not None:
                self._close_tracker(mlflow_status, delete=True)
            return
        if self.resume and self.new_rounds == 0:
            # A resume that got nowhere leaves the run as it found it.
            for name, data in self.before.items():
                if data is not None:
                    with contextlib.suppress(OSError):
                        (rd / name).write_bytes(data)
            if self.tracker is not None and self.tracker_status_before not in (None, "RUNNING"):
                self._close_tracker(self.tracker_status_before, delete=False, artifacts=False)
            elif self.tracker is not None:
                self._close_tracker(mlflow_status, delete=False, artifacts=False)
            return
        try:
            rd.write_status("interrupted" if interrupted else "failed", error=str(err)[:500])
        except UserError as write_err:
            warn(str(write_err))
        if self.tracker is not None:
            self._close_tracker(mlflow_status, delete=False)

    def stop_actors(self) -> None:
        if self.driver is not None:
            self.driver.stop()
            self.driver = None

    def _close_tracker(self, status: str, *, delete: bool, artifacts: bool = True) -> None:
        """Close the MLflow run; an error of the tracking server itself must not hide the run's."""
        assert self.tracker is not None
        try:
            if artifacts and not delete:
                self._log_artifacts(with_model=False)
        except Exception as err:  # noqa: BLE001 - reported, then the run is still closed
            warn(f"could not log artifacts to MLflow run {self.tracker.run_id}: {err}")
        try:
            self.tracker.finish(status)
            if delete:
                self.tracker.client().delete_run(self.tracker.run_id)
        except Exception as err:  # noqa: BLE001
            warn(f"could not close MLflow run {self.tracker.run_id}: {str(err).splitlines()[0]}")


class DriverClient:
    """How the lifecycle talks to the driver: its :class:`~fedrlhf_ray.driver.DriverHost` in the
    driver actor (the default: this process then holds no model weights, only metrics and rows),
    or in this process (``in_process``: for tests and benches that instrument the driver class).
    An error the driver raises comes back as itself (a one-line UserError stays one)."""

    def __init__(self, actor: Any, local: Any) -> None:
        self.actor = actor
        self.local = local

    @classmethod
    def start(
        cls, cfg: ExperimentConfig, driver_cls: Callable[..., Any], rd: RunDir, trainer_factory: Any,
        only_clients: Sequence[int] | None, *, in_process: bool,
    ) -> DriverClient:
        from fedrlhf_ray.driver import DriverActor, DriverHost, driver_actor_options

        args = (driver_cls, cfg, str(rd.path), trainer_factory, only_clients)
        if in_process:
            local = DriverHost()
            local.start(*args)
            return cls(None, local)
        client = cls(DriverActor.options(**driver_actor_options(cfg)).remote(), None)
        client.host("start", *args)
        return client

    def host(self, method: str, *args: Any) -> Any:
        """``DriverHost.method(*args)``, where the host runs."""
        if self.local is not None:
            return getattr(self.local, method)(*args)
        import ray
        from ray.exceptions import RayTaskError

        try:
            result, warnings = ray.get(self.actor.invoke.remote(method, *args))
        except RayTaskError as err:
            self._print(ray.get(self.actor.drain.remote()))
            cause = err.cause
            if isinstance(cause, Exception):
                raise cause from None
            raise
        self._print(warnings)
        return result

    @staticmethod
    def _print(lines: list[str]) -> None:
        for line in lines:
            print(line, file=sys.stderr)

    def call(self, method: str, *args: Any) -> Any:
        """``FederatedDriver.method(*args)`` (its round, evaluation, checkpoint, restore, ...)."""
        return self.host("call", method, *args)

    def stop(self) -> None:
        """Stop the client actors, then the driver actor, and wait until it is gone (it must not
        write into a run directory that is about to be removed)."""
        if self.local is not None:
            self.local.shutdown()
            return
        import time

        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        ray.kill(self.actor)  # its client actors go with it (Ray ends the actors a dead owner made)
        deadline = time.monotonic() + 30.0
        while time.monotonic() < deadline:
            try:
                ray.get(self.actor.ping.remote(), timeout=1.0)
            except RayActorError:
                return
            except GetTimeoutError:
                continue  # still busy: the kill has not landed yet
            time.sleep(0.1)
