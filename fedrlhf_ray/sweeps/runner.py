"""Running a sweep with Ray Tune, and what it leaves: the sweep directory and MLflow runs.

Tune runs one trial (:mod:`fedrlhf_ray.sweeps.trial`) per point of the search space, with ASHA
or Optuna when the sweep asks; random search is seeded by the base experiment's seed. MLflow
gets one experiment per sweep: a parent run for the sweep and a child run per trial. The sweep
directory keeps ``sweep.yaml`` (the resolved sweep), ``trials.csv``, ``best.json`` and
``best_config.yaml``; ``fedrlhf tune --resume`` continues it through Tune's restore.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from fedrlhf_ray.config import with_values
from fedrlhf_ray.errors import SweepError
from fedrlhf_ray.sweeps.schema import BEST_CONFIG, BEST_FILE, SWEEP_FILE, Sweep
from fedrlhf_ray.sweeps.trial import run_trial, trial_resources
from fedrlhf_ray.tasks import all_tasks, task_for

if TYPE_CHECKING:
    from ray.tune.search import SearchAlgorithm, Searcher

def _absolute_paths(raw: dict[str, Any], root: Path) -> dict[str, Any]:
    """Trials run in their own working directories: no path field of any task may be relative.
    A field that may also name a model (a Hugging Face name) changes only where the path exists."""
    values = {}
    for task in all_tasks():
        for key, must_exist in [(k, False) for k in task.path_fields] + [(k, True) for k in task.name_or_path_fields]:
            value = _at(raw, key)
            if not isinstance(value, str) or not value or "://" in value or Path(value).expanduser().is_absolute():
                continue
            path = root / Path(value).expanduser()
            if not must_exist or path.exists():
                values[key] = str(path.resolve())
    return with_values(raw, values) if values else raw


def _at(raw: dict[str, Any], dotted: str) -> Any:
    node: Any = raw
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _trainable(sweep: Sweep, tracking_uri: str | None, parent_run_id: str | None):
    from ray import tune

    settings = sweep.settings
    fn = tune.with_parameters(
        run_trial,
        base=_absolute_paths(sweep.base, Path.cwd()),
        sweep_name=settings.name,
        tracking_uri=tracking_uri,
        parent_run_id=parent_run_id,
        mlflow_experiment=settings.mlflow_experiment or settings.name,
    )
    return tune.with_resources(fn, lambda values: trial_resources(sweep.trial_config(values)))


def _tune_config(sweep: Sweep):
    from ray import tune

    s = sweep.settings
    cfg = sweep.base_config
    scheduler = None
    search_alg: Searcher | SearchAlgorithm | None = None
    if s.scheduler is not None:
        from ray.tune.schedulers import ASHAScheduler

        scheduler = ASHAScheduler(
            time_attr="training_iteration", max_t=cfg.federation.rounds,
            grace_period=min(s.scheduler.grace_period, cfg.federation.rounds),
            reduction_factor=s.scheduler.reduction_factor,
        )
    if s.search_alg is not None:
        from ray.tune.search.optuna import OptunaSearch

        search_alg = OptunaSearch(seed=cfg.seed)
        max_concurrent = s.max_concurrent
    else:
        from ray.tune.search import BasicVariantGenerator

        # Seeded, so that a sweep file always draws the same trials (Tune's default is unseeded).
        search_alg = BasicVariantGenerator(max_concurrent=s.max_concurrent or 0, random_state=cfg.seed)
        max_concurrent = None
    return tune.TuneConfig(
        metric=s.metric, mode=s.mode, num_samples=s.num_samples, scheduler=scheduler,
        search_alg=search_alg, max_concurrent_trials=max_concurrent,
        trial_name_creator=lambda t: f"{s.name}_{t.trial_id}",
        trial_dirname_creator=lambda t: f"{s.name}_{t.trial_id}",
    )


def run_sweep(sweep: Sweep, sweep_dir: Path, tracking_uri: str | None, *, resume: bool = False):
    """Run (or resume) the sweep in ``sweep_dir``; returns Tune's ResultGrid.

    The caller's process sets ``TUNE_DISABLE_STRICT_METRIC_CHECKING=1`` (the CLI does): Tune's
    strict check ends fit() with a traceback when a report lacks the metric (a typo in the sweep
    file); without it the sweep ends and :func:`summarize_sweep` says so in one line."""
    from ray import tune

    from fedrlhf_ray import tracking

    parent = tracking.load_tracker(sweep_dir) if resume else None
    if tracking_uri is not None and parent is None:
        exp = tracking.experiment_id(tracking_uri, sweep.settings.mlflow_experiment or sweep.settings.name)
        from mlflow.tracking import MlflowClient

        run = MlflowClient(tracking_uri).create_run(
            exp, run_name=sweep.settings.name,
            tags={"fedrlhf.sweep": sweep.settings.name, "fedrlhf.sweep_dir": str(sweep_dir),
                  "fedrlhf.role": "sweep", **tracking.run_tags(sweep.base_config)},
        )
        parent = tracking.RunTracker(tracking_uri, run.info.run_id, per_client=False)
        parent.log_params(sweep_params(sweep))
        parent.save(sweep_dir)
    elif parent is not None:
        parent.reopen()
    trainable = _trainable(sweep, parent.tracking_uri if parent else None, parent.run_id if parent else None)
    try:
        if resume:
            tuner = tune.Tuner.restore(str(sweep_dir), trainable=trainable, resume_unfinished=True, resume_errored=True)
        else:
            tuner = tune.Tuner(
                trainable,
                param_space=sweep.param_space(),
                tune_config=_tune_config(sweep),
                run_config=tune.RunConfig(
                    name=sweep_dir.name, storage_path=str(sweep_dir.parent),
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                    failure_config=tune.FailureConfig(max_failures=0),
                    verbose=1,
                ),
            )
        results = tuner.fit()
    except BaseException as err:
        if parent is not None:
            status = "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"
            close_trial_runs(parent, sweep, None, status)
            parent.finish(status)
        raise
    return results, parent


def sweep_params(sweep: Sweep) -> dict[str, str]:
    """The parent run's params: how the sweep searched (the trials carry the full configs)."""
    s = sweep.settings
    params = {"sweep.metric": s.metric, "sweep.mode": s.mode, "sweep.num_samples": s.num_samples,
              "sweep.max_concurrent": s.max_concurrent, "sweep.scheduler": s.scheduler.type if s.scheduler else None,
              "sweep.search_alg": s.search_alg.type if s.search_alg else None}
    for key, dim in s.search_space.items():
        params[f"search.{key}"] = json.dumps({dim.kind: getattr(dim, dim.kind)})
    return {k: str(v) for k, v in params.items()}


def close_trial_runs(parent, sweep: Sweep, results, status_if_unknown: str = "FINISHED") -> int:
    """Trials that Tune stopped (ASHA) or lost leave their MLflow runs RUNNING: close them
    (FAILED for an errored trial, FINISHED + ``fedrlhf.stopped_early`` for a stopped one)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(parent.tracking_uri)
    parent_run = client.get_run(parent.run_id)
    exp = parent_run.info.experiment_id
    sweep_dir = Path(parent_run.data.tags.get("fedrlhf.sweep_dir", ""))
    running = client.search_runs(
        [exp], f"tags.mlflow.parentRunId = '{parent.run_id}' and attributes.status = 'RUNNING'"
    )
    errored = set()
    if results is not None:
        prefix = f"{sweep.settings.name}_"
        errored = {Path(r.path).name.removeprefix(prefix) for r in results if r.error is not None}
    from fedrlhf_ray.rundir import STATUS, RunDir
    from fedrlhf_ray.tracking import RunTracker, log_run_files

    panels = task_for(sweep.base_config.env.name).curve_panels
    for run in running:
        trial = run.data.tags.get("fedrlhf.trial_id")
        status = "FAILED" if trial in errored else status_if_unknown
        tracker = RunTracker(parent.tracking_uri, run.info.run_id)
        run_dir = Path(run.data.tags.get("fedrlhf.run_dir", ""))
        # The trial's live directory (Tune's, on its node) and the copy the sweep directory
        # keeps of its last checkpoint, which a resume restores, both say it was stopped.
        copies = sorted((sweep_dir / f"{sweep.settings.name}_{trial}").glob("checkpoint_*")) if trial else []
        for folder in [run_dir, *copies[-1:]]:
            if status == "FINISHED" and (folder / STATUS).is_file():
                RunDir(folder).write_status("stopped", reason="stopped early by the scheduler")
        if run_dir.is_dir():  # on this node: keep what the trial got to write
            log_run_files(tracker, run_dir, run.info.run_name, panels)
        if status == "FINISHED":
            tracker.set_tags({"fedrlhf.stopped_early": "true"})
        tracker.finish(status)
    return len(running)


def fail_trial_runs(parent, reason: str) -> None:
    """Mark every trial run of the sweep FAILED (a sweep without a result has no good trial)."""
    from mlflow.tracking import MlflowClient

    from fedrlhf_ray.tracking import RunTracker

    client = MlflowClient(parent.tracking_uri)
    exp = client.get_run(parent.run_id).info.experiment_id
    for run in client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent.run_id}'"):
        tracker = RunTracker(parent.tracking_uri, run.info.run_id)
        tracker.set_tags({"fedrlhf.failure": reason})
        tracker.finish("FAILED")


def summarize_sweep(sweep: Sweep, sweep_dir: Path, results, parent) -> dict[str, Any]:
    """Best trial (by its last report) → best.json, best_config.yaml, trials.csv, MLflow parent run."""
    s = sweep.settings
    rows = []
    for r in results:
        m = r.metrics or {}
        rows.append({
            "trial_id": m.get("trial_id"), "rounds": m.get("training_iteration", 0),
            s.metric: m.get(s.metric, float("nan")), "error": str(r.error)[:200] if r.error else "",
            **{k: r.config.get(k) for k in s.search_space},
        })
    with_metric = [r for r in results if r.error is None and r.metrics and s.metric in r.metrics]
    if not with_metric:
        if parent is not None:
            close_trial_runs(parent, sweep, results, "FAILED")
            fail_trial_runs(parent, f"no report carried the sweep's metric {s.metric}")
            parent.finish("FAILED")
        errors = [str(r.error).strip().splitlines()[-1] for r in results if r.error is not None]
        raise SweepError(
            f"sweep {s.name}: no trial reported {s.metric}" + (f"; first trial error: {errors[0]}" if errors else "")
        )
    sign = 1 if s.mode == "max" else -1
    best = max(with_metric, key=lambda r: sign * r.metrics[s.metric])
    best_cfg = sweep.trial_config(best.config)
    best_cfg = best_cfg.model_copy(update={"name": f"{s.name}-best"})
    summary = {
        "metric": s.metric, "mode": s.mode, "value": best.metrics[s.metric],
        "trial_id": best.metrics.get("trial_id"), "rounds": best.metrics.get("training_iteration"),
        "search_values": {k: best.config.get(k) for k in s.search_space},
        "trials": rows,
    }
    if parent is not None:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(parent.tracking_uri)
        found = client.search_runs(
            [client.get_run(parent.run_id).info.experiment_id],
            f"tags.mlflow.parentRunId = '{parent.run_id}' and tags.`fedrlhf.trial_id` = '{summary['trial_id']}'",
        )
        summary["mlflow_run_id"] = found[0].info.run_id if found else None
    (sweep_dir / BEST_FILE).write_text(json.dumps(summary, indent=2, default=str))
    (sweep_dir / BEST_CONFIG).write_text(yaml.safe_dump(best_cfg.to_dict(), sort_keys=False))
    import pandas as pd

    pd.DataFrame(rows).to_csv(sweep_dir / "trials.csv", index=False)
    if parent is not None:
        close_trial_runs(parent, sweep, results)
        parent.log_metrics({f"best/{s.metric}": float(best.metrics[s.metric])})
        parent.set_tags({"fedrlhf.best_trial": str(summary["trial_id"]),
                         "fedrlhf.best_run_id": str(summary.get("mlflow_run_id")),
                         **{f"fedrlhf.best.{k}": str(v) for k, v in summary["search_values"].items()}})
        parent.log_artifacts(sweep_dir, [SWEEP_FILE, BEST_FILE, BEST_CONFIG, "trials.csv"])
        parent.finish("FINISHED")
    return summary
