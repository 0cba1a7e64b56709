"""Ray Tune sweeps over any experiment field, each trial one whole federated run.

A sweep file names a base experiment and a search space over its dotted fields::

    name: lambda_sweep
    experiment: quickstart.yaml            # relative to the sweep file
    overrides: {federation.rounds: 4}      # fixed for every trial
    search_space:
      shaping.lambda: {grid: [0.0, 1.0, 2.0]}
      ppo.lr: {loguniform: [3.0e-4, 3.0e-3]}
    metric: eval/liked_hit_rate/mean
    mode: max
    num_samples: 1
    max_concurrent: 2
    scheduler: {type: asha, grace_period: 2}
    search_alg: {type: optuna}

Every trial reports after every round (the metrics of ``fed/``, ``train/``, ``eval/`` ... with
the last evaluation carried forward), checkpoints its run directory for Tune's restore, and is
one MLflow run, a child of the sweep's parent run, in one MLflow experiment. Each trial's
driver runs in the trial's process and its client actors in the trial's placement group
(``{}`` for the driver + one ``{"CPU": cpus_per_worker}`` bundle per client actor), so
concurrent trials never wait on each other's CPUs.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fedrlhf_ray.config import (
    ConfigError,
    ExperimentConfig,
    parse_override,
    read_yaml,
    validate_config,
    with_values,
)

SWEEP_FILE = "sweep.yaml"
BEST_FILE = "best.json"
BEST_CONFIG = "best_config.yaml"
METRIC_NAMESPACES = ("eval/", "fed/", "train/", "reward_model/", "feedback/")
EVAL_STATS = ("mean", "median", "std", "worst_decile")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Dimension(_Strict):
    """One searched field: exactly one of the distributions."""

    grid: list[Any] | None = Field(None, min_length=1, description="Every value, in every sample (Tune's grid_search).")
    choice: list[Any] | None = Field(None, min_length=1, description="One value drawn at random per trial.")
    uniform: tuple[float, float] | None = Field(None, description="[low, high], drawn uniformly.")
    loguniform: tuple[float, float] | None = Field(None, description="[low, high], both > 0, drawn log-uniformly.")
    randint: tuple[int, int] | None = Field(None, description="[low, high), an integer drawn uniformly.")

    @model_validator(mode="after")
    def _one_kind(self) -> Dimension:
        given = [k for k in DISTRIBUTIONS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(DISTRIBUTIONS)} (got {', '.join(given) or 'none'})")
        kind = given[0]
        if kind in ("uniform", "loguniform", "randint"):
            low, high = getattr(self, kind)
            if not low < high:
                raise ValueError(f"{kind}: low ({low}) must be < high ({high})")
            if kind == "loguniform" and low <= 0:
                raise ValueError(f"loguniform: low ({low}) must be > 0")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in DISTRIBUTIONS if getattr(self, k) is not None)

    def representatives(self) -> list[Any]:
        """Values that every trial's config must accept: all listed values, or both ends."""
        if self.grid is not None:
            return list(self.grid)
        if self.choice is not None:
            return list(self.choice)
        if self.randint is not None:
            return [self.randint[0], self.randint[1] - 1]
        return list(getattr(self, self.kind))

    def to_tune(self):
        from ray import tune

        if self.grid is not None:
            return tune.grid_search(list(self.grid))
        if self.choice is not None:
            return tune.choice(list(self.choice))
        if self.uniform is not None:
            return tune.uniform(*self.uniform)
        if self.loguniform is not None:
            return tune.loguniform(*self.loguniform)
        return tune.randint(*self.randint)


DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform", "randint")


class ASHASettings(_Strict):
    """Asynchronous successive halving on the per-round reports."""

    type: Literal["asha"] = "asha"
    grace_period: int = Field(1, ge=1, description="Rounds every trial runs before it may be stopped.")
    reduction_factor: float = Field(2.0, gt=1.0, description="Keep 1/reduction_factor of trials at each rung.")


class OptunaSettings(_Strict):
    """Optuna's TPE sampler through Tune's integration (seeded from the base experiment's seed)."""

    type: Literal["optuna"] = "optuna"


class SweepConfig(_Strict):
    """A sweep: a base experiment, a search space and how to search it."""

    name: str = Field(..., min_length=1, pattern=r"^[A-Za-z0-9_.-]+$", description="Sweep name (directory and MLflow parent run).")
    experiment: str = Field(..., description="Base experiment YAML, relative to the sweep file.")
    overrides: dict[str, Any] = Field(default_factory=dict, description="Dotted fields fixed for every trial.")
    search_space: dict[str, Dimension] = Field(..., min_length=1, description="Dotted field → distribution.")
    metric: str = Field("eval/liked_hit_rate/mean", description="Reported metric that ranks trials.")
    mode: Literal["max", "min"] = Field("max", description="Maximise or minimise the metric.")
    num_samples: int = Field(1, ge=1, description="Samples of the space (a grid is repeated this many times).")
    max_concurrent: int | None = Field(None, ge=1, description="Trials at once (default: as many as the CPUs fit).")
    scheduler: ASHASettings | None = Field(None, description="Early stopping (ASHA), or none.")
    search_alg: OptunaSettings | None = Field(None, description="Optuna, or none (Tune's grid/random variants).")
    mlflow_experiment: str | None = Field(None, description="MLflow experiment of the trials (default: the sweep's name).")

    @model_validator(mode="after")
    def _checks(self) -> SweepConfig:
        if not self.metric.startswith(METRIC_NAMESPACES):
            raise ValueError(f"metric: got {self.metric!r} — must start with one of {', '.join(METRIC_NAMESPACES)}")
        if self.metric.startswith("eval/") and self.metric.rsplit("/", 1)[-1] not in EVAL_STATS:
            raise ValueError(
                f"metric: got {self.metric!r} — an eval metric is summarised over clients: end it with /{', /'.join(EVAL_STATS)}"
            )
        if self.search_alg is not None:
            grids = [k for k, d in self.search_space.items() if d.kind == "grid"]
            if grids:
                raise ValueError(f"search_space.{grids[0]}: optuna cannot search a grid — use choice")
        return self


class SweepError(RuntimeError):
    """A sweep that ran but gave no result (every trial failed)."""


class Sweep:
    """A validated sweep: its settings and the base experiment."""

    def __init__(self, settings: SweepConfig, base: dict[str, Any]) -> None:
        self.settings = settings
        self.base = base  # raw base experiment with the fixed overrides applied

    @property
    def base_config(self) -> ExperimentConfig:
        return validate_config(self.base)

    def trial_config(self, values: dict[str, Any]) -> ExperimentConfig:
        return validate_config(with_values(self.base, values))

    def param_space(self) -> dict[str, Any]:
        return {key: dim.to_tune() for key, dim in self.settings.search_space.items()}

    def to_dict(self) -> dict[str, Any]:
        """The resolved sweep (base experiment inlined): what the sweep directory keeps."""
        out = self.settings.model_dump(mode="json", exclude_none=True)
        out["search_space"] = {
            k: d.model_dump(mode="json", exclude_none=True) for k, d in self.settings.search_space.items()
        }
        out["experiment"] = self.base
        out.pop("overrides", None)
        return out


def load_sweep(path: str | Path, overrides: list[str] | None = None) -> Sweep:
    """Read and validate a sweep file; every searched value is checked against the config.

    ``overrides`` (``key=value``, from ``--set``) are added to the sweep's fixed overrides."""
    path = Path(path)
    raw = read_yaml(path)
    for text in overrides or []:
        key, value = parse_override(text)
        raw.setdefault("overrides", {})
        if not isinstance(raw["overrides"], dict):
            break  # reported by the validation below
        raw["overrides"][".".join(key)] = value
    base_ref = raw.get("experiment")
    try:
        settings = SweepConfig.model_validate(
            {**raw, "experiment": base_ref if isinstance(base_ref, str) else "<inline>"}
        )
    except ValidationError as err:
        raise ConfigError(f"{path}: {_sweep_error(err)}") from None
    if isinstance(base_ref, dict):  # a resolved sweep.yaml inlines its experiment
        base_raw = base_ref
    else:
        base_path = (path.parent / settings.experiment).resolve()
        try:
            base_raw = read_yaml(base_path)
        except ConfigError as err:
            raise ConfigError(f"{path}: experiment: {err}") from None
    try:
        base = with_values(base_raw, settings.overrides, "overrides.")
        validate_config(base)
    except ConfigError as err:
        raise ConfigError(f"{path}: overrides: {err}") from None
    sweep = Sweep(settings, base)
    firsts = {k: d.representatives()[0] for k, d in settings.search_space.items()}
    for key, dim in settings.search_space.items():
        for value in dim.representatives():
            try:
                sweep.trial_config({**firsts, key: value})
            except ConfigError as err:
                raise ConfigError(f"{path}: search_space.{key}={value!r}: {err}") from None
    return sweep


def _sweep_error(err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        return f"{loc}: unknown field"
    if first["type"] == "missing":
        return f"{loc}: required field missing"
    if "input" in first and not isinstance(first["input"], dict) and loc:
        return f"{loc}: got {first['input']!r} — {msg}"
    return f"{loc}: {msg}" if loc else msg


# -- the trial --------------------------------------------------------------------------------------
def trial_workers(cfg: ExperimentConfig) -> int:
    """Client actors of one trial: as configured, else one (trials share the cluster)."""
    return min(cfg.ray.num_workers or 1, cfg.clients.num_clients)


def trial_resources(cfg: ExperimentConfig):
    """The trial's placement group: an empty bundle for the driver, one per client actor."""
    from ray import tune

    return tune.PlacementGroupFactory([{}] + [{"CPU": cfg.ray.cpus_per_worker}] * trial_workers(cfg))


def tune_report(metrics: dict[str, float], last_eval: dict[str, float]) -> dict[str, float]:
    """A round's report with the latest evaluation carried forward (rounds without one still
    carry the metric the scheduler ranks by)."""
    out = {**last_eval, **metrics}
    return {k: v for k, v in out.items() if isinstance(v, (int, float)) and not (isinstance(v, float) and math.isinf(v))}


def run_trial(config: dict[str, Any], *, base: dict[str, Any], sweep_name: str, tracking_uri: str | None,
              parent_run_id: str | None, mlflow_experiment: str) -> None:
    """One Tune trial: one whole federated experiment (see the module docstring)."""
    from ray import tune
    from ray.tune import Checkpoint

    from fedrlhf_ray import tracking
    from fedrlhf_ray.driver import FederatedDriver

    ctx = tune.get_context()
    trial_id = ctx.get_trial_id()
    raw = with_values(base, config)
    raw["name"] = ctx.get_trial_name()
    cfg = validate_config(raw)
    cfg = cfg.model_copy(update={
        "ray": cfg.ray.model_copy(update={"num_workers": trial_workers(cfg)}),
        "tracking": cfg.tracking.model_copy(update={"experiment": mlflow_experiment}),
    })
    run_dir = Path(ctx.get_trial_dir()) / "run"
    checkpoint = tune.get_checkpoint()
    resume = checkpoint is not None
    if resume:
        shutil.rmtree(run_dir, ignore_errors=True)
        with checkpoint.as_directory() as saved:
            shutil.copytree(saved, run_dir)
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))

    tracker = None
    if cfg.tracking.enabled and tracking_uri is not None:
        tracker = tracking.load_tracker(run_dir, cfg.tracking.per_client) if resume else None
        if tracker is None:
            tags = {"fedrlhf.sweep": sweep_name, "fedrlhf.trial_id": trial_id,
                    **{f"fedrlhf.search.{k}": str(v) for k, v in config.items()}}
            if parent_run_id:
                tags["mlflow.parentRunId"] = parent_run_id
            tracker = tracking.start_run(cfg, run_dir, tracking_uri, extra_tags=tags)
        else:
            tracker.reopen()
            tracker.backfill(run_dir)
    try:
        driver = FederatedDriver(cfg, run_dir, resume=resume, tracker=tracker)
        last_eval = _last_eval(run_dir) if resume else driver.initial_evaluation()
        for _ in range(driver.completed_rounds(), cfg.federation.rounds):
            metrics = driver.run_round()
            if any(k.startswith("eval/") for k in metrics):
                last_eval = {k: v for k, v in metrics.items() if k.startswith("eval/")}
            if tracker is not None and driver.completed_rounds() == cfg.federation.rounds:
                # Before the last report: Tune may end the trial's process as soon as it has it.
                driver.save_global_weights(str(run_dir / "global_weights.npz"))
                tracker.log_artifacts(run_dir, ["global_weights.npz"], "model")
                log_run_files(tracker, run_dir, cfg.name)
                tracker.finish("FINISHED")
            tune.report(tune_report(metrics, last_eval), checkpoint=Checkpoint.from_directory(run_dir))
    except Exception:
        if tracker is not None:
            tracker.finish("FAILED")
        raise


def log_run_files(tracker, run_dir: Path, title: str) -> None:
    """A trial's config, metrics files and learning curves as artifacts of its MLflow run."""
    from fedrlhf_ray import tracking
    from fedrlhf_ray.driver import CLIENT_METRICS, METRICS

    if (run_dir / METRICS).exists():
        tracking.plot_learning_curves(run_dir, run_dir / "learning_curves.png", title)
    tracker.log_artifacts(run_dir, ["config.yaml", METRICS, CLIENT_METRICS, "learning_curves.png"])


def _last_eval(run_dir: Path) -> dict[str, float]:
    from fedrlhf_ray.driver import METRICS
    from fedrlhf_ray.tracking import read_jsonl

    rows = read_jsonl(run_dir / METRICS)
    evaluated = [r for r in rows if any(k.startswith("eval/") for k in r)]
    return {k: v for k, v in evaluated[-1].items() if k.startswith("eval/")} if evaluated else {}


# -- the sweep --------------------------------------------------------------------------------------
def _absolute_paths(raw: dict[str, Any], root: Path) -> dict[str, Any]:
    """Trials run in their own working directories: data paths must not be relative."""
    values = {}
    data = raw.get("env", {}).get("data", {}) or {}
    for key in ("path", "cache_dir"):
        value = data.get(key)
        if value and "://" not in str(value) and not Path(value).is_absolute():
            values[f"env.data.{key}"] = str((root / value).resolve())
    return with_values(raw, values) if values else raw


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
    scheduler = search_alg = None
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
    """Run (or resume) the sweep in ``sweep_dir``; returns Tune's ResultGrid."""
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
    exp = client.get_run(parent.run_id).info.experiment_id
    running = client.search_runs(
        [exp], f"tags.mlflow.parentRunId = '{parent.run_id}' and attributes.status = 'RUNNING'"
    )
    errored = set()
    if results is not None:
        prefix = f"{sweep.settings.name}_"
        errored = {Path(r.path).name.removeprefix(prefix) for r in results if r.error is not None}
    from fedrlhf_ray.tracking import RunTracker

    for run in running:
        trial = run.data.tags.get("fedrlhf.trial_id")
        status = "FAILED" if trial in errored else status_if_unknown
        tracker = RunTracker(parent.tracking_uri, run.info.run_id)
        run_dir = Path(run.data.tags.get("fedrlhf.run_dir", ""))
        if run_dir.is_dir():  # on this node: keep what the trial got to write
            log_run_files(tracker, run_dir, run.info.run_name)
        if status == "FINISHED":
            tracker.set_tags({"fedrlhf.stopped_early": "true"})
        tracker.finish(status)
    return len(running)


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
            parent.finish("FAILED")
        errors = [str(r.error).strip().splitlines()[-1] for r in results if r.error is not None]
        raise SweepError(f"sweep {s.name}: no trial reported {s.metric}" + (f"; first trial error: {errors[0]}" if errors else ""))
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
