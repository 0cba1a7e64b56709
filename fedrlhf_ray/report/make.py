"""What ``fedrlhf report`` does: a report of runs (and its logging to the sweeps' MLflow runs),
or every report of a results folder made again from its summaries, with the docs' tables."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fedrlhf_ray.errors import UserError
from fedrlhf_ray.report.docs import rewrite_tables
from fedrlhf_ray.report.pages import TaskView, provenance, write_report
from fedrlhf_ray.report.runs import MLFLOW_SOURCE, RUNS_FILE, Run, find_runs, read_summaries
from fedrlhf_ray.sweeps.schema import SWEEP_FILE
from fedrlhf_ray.tasks import task_for
from fedrlhf_ray.tracking import DEFAULT_DB, load_tracker


@dataclass(frozen=True)
class Made:
    """What a report command wrote: the files, the docs it rewrote, the MLflow runs it logged to."""

    files: list[Path]
    documents: list[Path]
    mlflow_runs: list[str]


def task_view(runs: Sequence[Run]) -> TaskView:
    names = {str(run.config.get("env.name")) for run in runs}
    if len(names) > 1:
        raise UserError(f"report: the runs are of different tasks' environments ({', '.join(sorted(names))}); "
                        "report each task's runs apart")
    try:
        task = task_for(names.pop())
    except ValueError as err:
        raise UserError(f"report: {err}") from None
    return TaskView(task.headline_metric, task.report_metrics, task.trade_off)


def log_to_sweeps(sources: Sequence[str], files: Sequence[Path]) -> list[str]:
    """The report's files as artifacts (``report/``) of each source sweep's parent MLflow run;
    returns those runs' ids. A source without a tracked sweep is left as it is."""
    ids = []
    for source in sources:
        folder = Path(source)
        if source.startswith(MLFLOW_SOURCE) or not (folder / SWEEP_FILE).is_file():
            continue
        tracker = load_tracker(folder)
        if tracker is None:
            continue
        try:
            for file in files:
                tracker.log_artifacts(file.parent, [file.name], "report")
        except Exception as err:  # noqa: BLE001 - MLflow's errors share no base class worth naming
            raise UserError(
                f"report: written, but not logged to the sweep's MLflow run {tracker.run_id} "
                f"({type(err).__name__}); check that the store {folder / 'mlflow_run.json'} names is reachable"
            ) from None
        ids.append(tracker.run_id)
    return ids


def report_runs(sources: Sequence[str], out: Path, reference: str | None, tracking_uri: str | None,
                command: str) -> Made:
    """The report of the runs in ``sources`` (see :func:`fedrlhf_ray.report.runs.find_runs`);
    ``mlflow:`` sources are read from ``tracking_uri``, else $MLFLOW_TRACKING_URI, else the
    default store."""
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{DEFAULT_DB}"
    runs = find_runs(sources, uri)
    files = write_report(runs, out, reference, task_view(runs), provenance(command))
    return Made(files, [], log_to_sweeps(sources, files))


def regenerate(results: Path, docs: bool, command: str) -> Made:
    """Every report folder in ``results`` (each holding a ``runs.json``) made again from its
    summaries, and with ``docs`` the marked tables of the README and ``docs/`` beside ``results``."""
    if not results.is_dir():
        raise UserError(f"report: --from {results} is not a folder; give the folder of report folders (results/)")
    folders = sorted(p.parent for p in results.glob(f"*/{RUNS_FILE}"))
    if not folders:
        raise UserError(f"report: --from {results} holds no report folder with a {RUNS_FILE}; make one with "
                        f"fedrlhf report SOURCE… --out {results}/NAME")
    files = []
    for folder in folders:
        summaries = read_summaries(folder)
        runs = summaries.to_runs(str(folder / RUNS_FILE))
        files += write_report(runs, folder, summaries.reference, task_view(runs), summaries.provenance,
                              regenerated_by=command)
    root = results.resolve().parent
    return Made(files, rewrite_tables(root) if docs else [], [])



