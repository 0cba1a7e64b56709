"""Sweep files: the schema of a sweep and its validation against the experiment schema.

A sweep file names a base experiment and a search space over its dotted fields::

    name: lambda_sweep
    experiment: quickstart.yaml            # relative to the sweep file
    overrides: {federation.rounds: 4}      # fixed for every trial
    search_space:
      shaping.lambda: {grid: [0.0, 1.0, 2.0]}
      ppo.lr: {loguniform: [3.0e-4, 3.0e-3]}
    metric: eval/liked_hit_rate/mean      # default: the task's headline metric
    mode: max
    num_samples: 1
    max_concurrent: 2
    scheduler: {type: asha, grace_period: 2}
    search_alg: {type: optuna}

Every searched value (both ends of a range) is validated as a trial's config would be, so a
mistake is one line before any trial starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fedrlhf_ray.config import ConfigError, parse_override, read_yaml, validate_config, with_values
from fedrlhf_ray.schema import ExperimentConfig
from fedrlhf_ray.tasks import task_for

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
        assert self.randint is not None  # _one_kind: exactly one distribution is given
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

    name: str = Field(
        ..., min_length=1, pattern=r"^[A-Za-z0-9_.-]+$", description="Sweep name (directory and MLflow parent run)."
    )
    experiment: str = Field(..., description="Base experiment YAML, relative to the sweep file.")
    overrides: dict[str, Any] = Field(default_factory=dict, description="Dotted fields fixed for every trial.")
    search_space: dict[str, Dimension] = Field(..., min_length=1, description="Dotted field → distribution.")
    # Unset: the task's headline metric (fedrlhf_ray.tasks.Task.headline_metric), filled in by load_sweep.
    metric: str = Field(  # type: ignore[assignment]
        None, description="Reported metric that ranks trials (default: the task's headline metric)."
    )
    mode: Literal["max", "min"] = Field("max", description="Maximise or minimise the metric.")
    num_samples: int = Field(1, ge=1, description="Samples of the space (a grid is repeated this many times).")
    max_concurrent: int | None = Field(None, ge=1, description="Trials at once (default: as many as the CPUs fit).")
    scheduler: ASHASettings | None = Field(None, description="Early stopping (ASHA), or none.")
    search_alg: OptunaSettings | None = Field(None, description="Optuna, or none (Tune's grid/random variants).")
    mlflow_experiment: str | None = Field(
        None, description="MLflow experiment of the trials (default: the sweep's name)."
    )

    @model_validator(mode="after")
    def _checks(self) -> SweepConfig:
        if self.metric is None:
            return self
        if not self.metric.startswith(METRIC_NAMESPACES):
            raise ValueError(f"metric: got {self.metric!r} — must start with one of {', '.join(METRIC_NAMESPACES)}")
        if self.metric.startswith("eval/") and self.metric.rsplit("/", 1)[-1] not in EVAL_STATS:
            raise ValueError(
                f"metric: got {self.metric!r} — an eval metric is summarised over clients: "
                f"end it with /{', /'.join(EVAL_STATS)}"
            )
        if self.search_alg is not None:
            grids = [k for k, d in self.search_space.items() if d.kind == "grid"]
            if grids:
                raise ValueError(f"search_space.{grids[0]}: optuna cannot search a grid — use choice")
        return self


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
        key_path, value = parse_override(text)
        raw.setdefault("overrides", {})
        if not isinstance(raw["overrides"], dict):
            break  # reported by the validation below
        raw["overrides"][".".join(key_path)] = value
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
    if settings.metric is None:
        settings = settings.model_copy(update={"metric": task_for(validate_config(base).env.name).headline_metric})
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


