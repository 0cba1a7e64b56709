"""One sweep from start or resume to its end: what ``fedrlhf tune`` runs (the CLI only parses,
announces and prints the table).

It reads the sweep (or the sweep directory's copy on resume), runs the base experiment's
preflight (its task's data, the tracking store) before anything is created, makes the sweep
directory, starts or joins Ray, runs the trials through Tune (``runner.run_sweep``) and writes
the sweep's results (``runner.summarize_sweep``). A sweep that fails before any trial started
leaves no sweep directory; one that stops later is sealed (``seal``: a resume checks that no
file changed before Tune unpickles any) and says how to resume it.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fedrlhf_ray import tracking
from fedrlhf_ray.errors import UserError
from fedrlhf_ray.experiment import check_data, install_sigterm_handler, new_run_dir
from fedrlhf_ray.ray_runtime import ensure_ray
from fedrlhf_ray.sweeps.runner import run_sweep, summarize_sweep
from fedrlhf_ray.sweeps.schema import SWEEP_FILE, Sweep, load_sweep
from fedrlhf_ray.sweeps.seal import check_seal, seal


@dataclass
class SweepOutcome:
    """How a sweep ended: its settings, directory, summary (best trial, every trial's row),
    tracking URI (None: not tracked) and wall time."""

    sweep: Sweep
    sweep_dir: Path
    summary: dict[str, Any]
    tracking_uri: str | None
    seconds: float


def open_sweep(sweep_file: str | None, overrides: list[str], resume: str | None) -> tuple[Sweep, Path | None]:
    """The sweep to run and, on resume, its directory."""
    if resume:
        sweep_dir = Path(resume).resolve()
        if not (sweep_dir / SWEEP_FILE).is_file():
            raise UserError(f"--resume {sweep_dir}: no {SWEEP_FILE} there (not a sweep directory)")
        if overrides:
            raise UserError("--set: a resumed sweep keeps its settings")
        return load_sweep(sweep_dir / SWEEP_FILE), sweep_dir
    if sweep_file:
        return load_sweep(sweep_file, overrides), None
    raise UserError("tune: give a sweep file, or --resume SWEEP_DIR")


def _stop_trials(ray_mode: str) -> None:
    """End this process's Ray (its trial actors die with it) before the sweep is sealed: an
    interrupted trial must not write into the sweep directory afterwards. A Ray this process
    did not start or join (a test session's) is left alone."""
    if ray_mode in ("started", "joined"):
        import ray

        ray.shutdown()


def tune_sweep(
    sweep_file: str | None,
    overrides: list[str],
    *,
    resume: str | None = None,
    address: str | None = None,
    tracking_uri: str | None = None,
    out: str = "runs/sweeps",
    on_start: Callable[[Sweep, Path], None] | None = None,
) -> SweepOutcome:
    """Run (or resume) a sweep; see the module docstring. ``on_start`` sees the sweep and its
    directory once they exist, before the first trial."""
    sweep, sweep_dir = open_sweep(sweep_file, overrides, resume)
    if sweep_dir is not None:
        check_seal(sweep_dir)  # before Tune unpickles anything of it
    cfg = sweep.base_config
    check_data(cfg)  # data problems surface here, before anything is created
    uri = None
    if cfg.tracking.enabled:
        previous = tracking.load_tracker(sweep_dir) if sweep_dir else None
        uri = tracking.usable_tracking_uri(cfg, tracking_uri or (previous.tracking_uri if previous else None))
    fresh = sweep_dir is None
    if sweep_dir is None:
        sweep_dir = new_run_dir(out, sweep.settings.name).path
        (sweep_dir / SWEEP_FILE).write_text(yaml.safe_dump(sweep.to_dict(), sort_keys=False))
    if on_start is not None:
        on_start(sweep, sweep_dir)
    start = time.perf_counter()
    ray_mode = "existing"
    try:
        ray_mode = ensure_ray(cfg, address)
        joined = ray_mode == "joined"
        install_sigterm_handler()
        uri = tracking.cluster_tracking_uri(uri, joined)
        results, parent = run_sweep(sweep, sweep_dir, uri, resume=not fresh)
        summary = summarize_sweep(sweep, sweep_dir, results, parent)
    except BaseException as err:
        if fresh and not any(p.is_dir() for p in sweep_dir.iterdir()):
            shutil.rmtree(sweep_dir, ignore_errors=True)  # no trial started: leave nothing behind
            raise
        _stop_trials(ray_mode)
        seal(sweep_dir)
        if not isinstance(err, UserError):  # a UserError ran to the end or never started
            print(f"fedrlhf: sweep stopped; resume with: fedrlhf tune --resume {sweep_dir}", file=sys.stderr)
        raise
    _stop_trials(ray_mode)
    seal(sweep_dir)
    return SweepOutcome(sweep, sweep_dir, summary, uri, time.perf_counter() - start)
