"""One Tune trial: one whole experiment through the shared lifecycle.

The trial's hook reports every round to Tune (the round's metrics with the latest evaluation
carried forward, so a scheduler always finds its metric) together with a checkpoint of the run
directory, which Tune's restore hands back to continue the trial. A trial's run directory and
MLflow run therefore hold exactly what ``fedrlhf run``'s do. Its driver runs in the trial's
process and its client actors in the trial's placement group (``{}`` for the driver + one
``{"CPU": cpus_per_worker}`` bundle per client actor), so concurrent trials never wait on each
other's CPUs.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

from fedrlhf_ray.config import validate_config, with_values
from fedrlhf_ray.experiment import Progress, run_experiment
from fedrlhf_ray.schema import ExperimentConfig

RUN_SUBDIR = "run"


def trial_workers(cfg: ExperimentConfig) -> int:
    """Client actors of one trial: as configured, else one (trials share the cluster)."""
    return min(cfg.ray.num_workers or 1, cfg.clients.num_clients)


def trial_resources(cfg: ExperimentConfig) -> Any:
    """The trial's placement group: an empty bundle for the driver, one per client actor."""
    from ray import tune

    return tune.PlacementGroupFactory([{}] + [{"CPU": cfg.ray.cpus_per_worker}] * trial_workers(cfg))


def tune_report(metrics: dict[str, float], last_eval: dict[str, float]) -> dict[str, float]:
    """A round's report with the latest evaluation carried forward (rounds without one still
    carry the metric the scheduler ranks by)."""
    out = {**last_eval, **metrics}
    return {
        k: v for k, v in out.items() if isinstance(v, (int, float)) and not (isinstance(v, float) and math.isinf(v))
    }


def _drop_unfinished_attempts(tracking_uri: str, parent_run_id: str, trial_id: str) -> None:
    """A trial restarted without a checkpoint was killed before its first round (a sweep
    interrupted early): its attempt's MLflow run is removed, as a run's would be."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_run(parent_run_id).info.experiment_id
    query = f"tags.mlflow.parentRunId = '{parent_run_id}' and tags.`fedrlhf.trial_id` = '{trial_id}'"
    for run in client.search_runs([exp], query):
        client.delete_run(run.info.run_id)


def run_trial(config: dict[str, Any], *, base: dict[str, Any], sweep_name: str, tracking_uri: str | None,
              parent_run_id: str | None, mlflow_experiment: str) -> None:
    """The trainable Tune runs: the trial's config is the base experiment plus ``config``."""
    from ray import tune
    from ray.tune import Checkpoint

    ctx = tune.get_context()
    trial_id = ctx.get_trial_id()
    raw = with_values(base, config)
    raw["name"] = ctx.get_trial_name()
    cfg = validate_config(raw)
    cfg = cfg.model_copy(update={
        "ray": cfg.ray.model_copy(update={"num_workers": trial_workers(cfg)}),
        "tracking": cfg.tracking.model_copy(
            update={"experiment": mlflow_experiment, "enabled": tracking_uri is not None}
        ),
    })
    run_dir = Path(ctx.get_trial_dir()) / RUN_SUBDIR
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        shutil.rmtree(run_dir, ignore_errors=True)
        with checkpoint.as_directory() as saved:
            shutil.copytree(saved, run_dir)
    tags = {"fedrlhf.sweep": sweep_name, "fedrlhf.trial_id": trial_id,
            **{f"fedrlhf.search.{k}": str(v) for k, v in config.items()}}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
        if checkpoint is None and tracking_uri is not None:
            _drop_unfinished_attempts(tracking_uri, parent_run_id, trial_id)

    def report(progress: Progress) -> None:
        tune.report(tune_report(progress.metrics, progress.last_eval),
                    checkpoint=Checkpoint.from_directory(str(progress.run_dir.path)))

    run_experiment(
        cfg, run_dir=run_dir, resume=checkpoint is not None, tracking_uri=tracking_uri,
        extra_tags=tags, on_round=report, check_resources=False,
    )
