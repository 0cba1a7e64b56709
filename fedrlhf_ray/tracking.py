"""MLflow tracking: one MLflow run per federated run (and per Tune trial).

Everything goes through ``MlflowClient`` with an explicit run id, never through MLflow's
process-global "active run": a Tune worker may hold several trials, and the federated driver
logs from a Ray actor while the CLI owns the run's start and end.

Where runs go: ``--tracking-uri`` > ``tracking.tracking_uri`` > ``$MLFLOW_TRACKING_URI`` >
``sqlite:///mlflow.db`` in the working directory, with artifacts in ``mlartifacts/`` beside the
database, so ``mlflow ui`` (or ``fedrlhf ui``) in that folder shows them.

Per round, the driver logs one batch: the global aggregates under their own names
(``eval/liked_hit_rate/mean``, ``fed/round_seconds``, ...) and, when ``tracking.per_client`` is
on, every client's series as ``client/<id>/<metric>``, all with ``step`` = round.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fedrlhf_ray.errors import UserError
from fedrlhf_ray.rundir import (
    CLIENT_METRICS,
    CONFIG,
    CURVES,
    METRICS,
    MLFLOW_RUN,
    STATUS,
    SUMMARY,
    atomic_write,
    read_jsonl,
)
from fedrlhf_ray.schema import ExperimentConfig
from fedrlhf_ray.tasks import CurvePanel, task_for

DEFAULT_DB = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
# Without it, MLflow 3's UI opens an experiment on its GenAI (traces) pages, not on its runs.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"

# MLflow's per-request limits for log_batch.
MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_PER_BATCH = 100
MAX_PARAM_LENGTH = 6000

# Round-metric keys that are bookkeeping, not series.
_NOT_METRICS = {"round", "client", "kind"}
ROUND_METRIC = "fed/round"  # logged with every round (0 = the initial evaluation)


_DATABASE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
_TRACKING_SCHEMES = ("file", "http", "https", "databricks", "databricks-uc", "uc", *_DATABASE_SCHEMES)
_TRACKING_ALLOWED = "a path, file://, sqlite:///, http(s)://, postgresql://, mysql://, mssql:// or databricks://"


def tracking_uri_problem(uri: str) -> str | None:
    """What is wrong with an MLflow tracking URI (and what is allowed), or None if MLflow can use it."""
    if not uri.strip():
        return f"must be {_TRACKING_ALLOWED} (leave it unset for the default)"
    try:
        parts = urlsplit(uri)
    except ValueError:
        return f"is not a valid URI; use {_TRACKING_ALLOWED}"
    scheme = parts.scheme.lower()
    if len(scheme) <= 1:  # a plain path; a one-letter scheme is a Windows drive
        return None
    base = scheme.split("+", 1)[0]
    if base not in _TRACKING_SCHEMES:
        return f"{scheme}:// is not an MLflow tracking store; use {_TRACKING_ALLOWED}"
    if base in ("http", "https") and not parts.netloc:
        return f"{scheme}:// needs a host, e.g. http://127.0.0.1:5000"
    if base == "sqlite" and not (uri.partition(":")[2].startswith("///") and len(parts.path) > 1):
        return "a SQLite store is sqlite:///<file>, e.g. sqlite:///mlflow.db"
    return None


def check_config(cfg: ExperimentConfig) -> None:
    """A configured tracking URI names a store MLflow has (raises ValueError naming the field)."""
    uri = cfg.tracking.tracking_uri
    problem = None if uri is None else tracking_uri_problem(uri)
    if problem:
        raise ValueError(f"tracking.tracking_uri: got {uri!r} — {problem}")


def resolve_tracking_uri(cfg: ExperimentConfig, cli_uri: str | None = None) -> str:
    """Where this run is tracked; a relative SQLite path is made absolute now, so actors that
    run in another working directory write to the same store."""
    uri = cli_uri or cfg.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{DEFAULT_DB}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    return uri


def usable_tracking_uri(cfg: ExperimentConfig, cli_uri: str | None = None) -> str:
    """:func:`resolve_tracking_uri`, checked before anything is created: a known scheme, a
    SQLite file that can be created, a server that answers."""
    uri = resolve_tracking_uri(cfg, cli_uri)
    problem = tracking_uri_problem(uri)
    if problem:
        raise UserError(
            f"tracking URI {uri!r} (--tracking-uri, tracking.tracking_uri or $MLFLOW_TRACKING_URI): {problem}"
        )
    if uri.startswith("sqlite:///"):
        check_sqlite_path(uri)
    check_tracking_uri(uri)
    return uri


def check_sqlite_path(uri: str) -> None:
    """A SQLite store (and ``mlartifacts/`` beside it) can be created or opened for writing."""
    db = Path(uri.removeprefix("sqlite:///"))
    folder = db.parent
    problem = None
    if db.exists() and not db.is_file():
        problem = "it is not a file"
    elif db.exists() and not os.access(db, os.W_OK):
        problem = "it is read-only"
    elif not folder.is_dir():
        problem = f"its folder {folder} does not exist" if not folder.exists() else f"{folder} is not a folder"
    elif not os.access(folder, os.W_OK):
        problem = f"its folder {folder} is read-only"
    elif db.exists():
        with db.open("rb") as f:
            head = f.read(16)
        if head and head != b"SQLite format 3\x00":
            problem = "it is not a SQLite database"
    if problem:
        raise UserError(
            f"tracking URI {uri}: cannot use {db} as the MLflow store ({problem}); give another --tracking-uri"
        )




def local_artifact_root(tracking_uri: str) -> str | None:
    """``mlartifacts/`` beside a SQLite store (None for a server, which chooses its own)."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    return (Path(tracking_uri.removeprefix("sqlite:///")).parent / ARTIFACTS_DIR).as_uri()


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config → ``{"ppo.lr": 0.001, ...}``."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def config_params(cfg: ExperimentConfig) -> dict[str, str]:
    """MLflow params: the flattened resolved config, values as strings (lists as JSON)."""
    params = {}
    for key, value in flatten(cfg.to_dict()).items():
        text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
        params[key] = text[:MAX_PARAM_LENGTH]
    return params


def run_tags(cfg: ExperimentConfig) -> dict[str, str]:
    """Tags the MLflow UI filters and groups by."""
    fed = cfg.federation
    tags = {
        "fedrlhf.env": cfg.env.name,
        **task_for(cfg.env.name).tags(cfg),
        "fedrlhf.strategy": fed.strategy,
        "fedrlhf.baseline": fed.baseline,
        "fedrlhf.personalization": fed.personalization,
        "fedrlhf.num_clients": str(cfg.clients.num_clients),
        "fedrlhf.rounds": str(fed.rounds),  # a tag, not a param: a resume may raise it
    }
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


def git_commit() -> str | None:
    """This project's commit when it runs from a git checkout (not from a wheel)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
            capture_output=True, text=True, timeout=10, check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def round_metrics(
    metrics: dict[str, float], client_rows: Iterable[dict[str, Any]], per_client: bool
) -> dict[str, float]:
    """One round's MLflow metrics: the aggregates and, optionally, ``client/<id>/...`` series."""
    out = {k: float(v) for k, v in metrics.items() if k not in _NOT_METRICS}
    out[ROUND_METRIC] = float(metrics["round"])
    if per_client:
        for row in client_rows:
            prefix = f"client/{int(row['client']):03d}/"
            for key, value in row.items():
                if key not in _NOT_METRICS and isinstance(value, (int, float)):
                    out[prefix + key] = float(value)
    return out


def _chunks(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


@dataclass
class RunTracker:
    """A handle on one MLflow run; picklable, so the driver actor logs with it directly."""

    tracking_uri: str
    run_id: str
    per_client: bool = True
    # Rounds MLflow had when this run was reopened: a resume from an older checkpoint repeats
    # them (identically: resumes are exact), and each is logged once.
    already_logged: frozenset[int] = frozenset()

    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(self.tracking_uri)

    # -- metrics -------------------------------------------------------------------------------
    def log_round(
        self, round_index: int, metrics: dict[str, float], client_rows: Iterable[dict[str, Any]] = ()
    ) -> None:
        """Everything of one round in as few requests as MLflow allows (≤ 1000 metrics each)."""
        if round_index in self.already_logged:
            return
        self.log_metrics(round_metrics(metrics, client_rows, self.per_client), round_index)

    def log_metrics(self, values: dict[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(key, value, now, step) for key, value in sorted(values.items())]
        client = self.client()
        for chunk in _chunks(batch, MAX_METRICS_PER_BATCH):
            client.log_batch(self.run_id, metrics=chunk, synchronous=True)

    def logged_rounds(self) -> set[int]:
        """Rounds already in MLflow, so a resume logs each round exactly once."""
        return {m.step for m in self.client().get_metric_history(self.run_id, ROUND_METRIC)}

    def backfill(self, run_dir: Path) -> int:
        """Log the rounds the run directory has and MLflow lacks (a run killed between its
        checkpoint and its MLflow batch); returns how many."""
        rows = read_jsonl(run_dir / METRICS)
        client_rows = read_jsonl(run_dir / CLIENT_METRICS)
        logged = self.logged_rounds()
        missing = sorted({int(r["round"]) for r in rows} - logged)
        for rnd in missing:
            metrics = next(r for r in rows if int(r["round"]) == rnd)
            self.log_round(rnd, metrics, [r for r in client_rows if int(r["round"]) == rnd])
        self.already_logged = frozenset(logged | set(missing))
        return len(missing)

    # -- the run's life --------------------------------------------------------------------------
    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in sorted(params.items())]
        client = self.client()
        for chunk in _chunks(items, MAX_PARAMS_PER_BATCH):
            client.log_batch(self.run_id, params=chunk, synchronous=True)

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client().log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()], synchronous=True)

    def log_artifacts(self, run_dir: Path, names: Iterable[str], artifact_path: str | None = None) -> None:
        client = self.client()
        for name in names:
            path = run_dir / name
            if path.exists():
                client.log_artifact(self.run_id, str(path), artifact_path)

    def finish(self, status: str) -> None:
        """``FINISHED``, ``FAILED`` or ``KILLED``: a tracked run never stays RUNNING."""
        self.client().set_terminated(self.run_id, status=status)

    def status(self) -> str:
        return str(self.client().get_run(self.run_id).info.status)

    def reopen(self) -> None:
        """A resumed run is RUNNING again, and remembers which rounds it already has."""
        self.client().update_run(self.run_id, status="RUNNING")
        self.already_logged = frozenset(self.logged_rounds())

    def save(self, run_dir: Path) -> None:
        record = {"tracking_uri": self.tracking_uri, "run_id": self.run_id}
        atomic_write(run_dir / MLFLOW_RUN, json.dumps(record).encode())


def check_tracking_uri(uri: str) -> None:
    """Fail in one line, at once, on a tracking server that does not answer (MLflow's own
    client would retry for minutes)."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=10) as reply:
            if reply.status == 200:
                return
            problem = f"HTTP {reply.status}"
    except (urllib.error.URLError, OSError) as err:
        problem = str(getattr(err, "reason", err))
    raise UserError(f"tracking URI {uri}: no MLflow server answers ({problem})")


def cluster_tracking_uri(uri: str | None, joined: bool) -> str | None:
    """The tracking URI as trials on any node must see it.

    On a cluster that was joined (``--address``; an autoscaler may add nodes at any time) or
    that has several nodes, a SQLite file exists on this node only and a server on loopback is
    this node's: the first is refused, the second is given this node's cluster address, where
    it must answer too."""
    import ray

    if uri is None or (not joined and sum(1 for n in ray.nodes() if n["Alive"]) < 2):
        return uri
    if uri.startswith("sqlite:"):
        raise UserError(
            f"--tracking-uri {uri}: a SQLite store is local to this node; on a Ray cluster give an "
            "MLflow server, e.g. --tracking-uri http://127.0.0.1:5000 on the head of cluster.yaml"
        )
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    if parts.hostname not in ("127.0.0.1", "localhost"):
        return uri
    netloc = ray.util.get_node_ip_address() + (f":{parts.port}" if parts.port else "")
    shared = urlunsplit(parts._replace(netloc=netloc))
    try:
        check_tracking_uri(shared)
    except UserError:
        raise UserError(
            f"--tracking-uri {uri}: trials on other nodes would reach it as {shared}, where no MLflow "
            "server answers; start it with --host 0.0.0.0 (as cluster.yaml's head does)"
        ) from None
    return shared


def experiment_id(tracking_uri: str, name: str) -> str:
    """The experiment's id, created if missing (with local artifacts beside a SQLite store).

    Two trials may race to create it; the loser reads the winner's."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(name)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            client.restore_experiment(found.experiment_id)
        return found.experiment_id
    root = local_artifact_root(tracking_uri)
    try:
        return client.create_experiment(
            name, artifact_location=f"{root}/{name}" if root else None,
            tags={EXPERIMENT_KIND_TAG: "custom_model_development"},
        )
    except MlflowException:
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def start_run(
    cfg: ExperimentConfig,
    run_dir: Path,
    tracking_uri: str,
    *,
    extra_tags: dict[str, str] | None = None,
) -> RunTracker:
    """Create the MLflow run of ``run_dir`` with its params and tags, and remember it there."""
    from mlflow.tracking import MlflowClient

    exp = experiment_id(tracking_uri, cfg.tracking.experiment)
    tags = {**run_tags(cfg), "fedrlhf.run_dir": str(run_dir), **(extra_tags or {})}
    run = MlflowClient(tracking_uri).create_run(exp, run_name=cfg.name, tags=tags)
    tracker = RunTracker(tracking_uri, run.info.run_id, cfg.tracking.per_client)
    tracker.log_params(config_params(cfg))
    tracker.save(run_dir)
    return tracker


def log_run_files(tracker: RunTracker, run_dir: Path, title: str, panels: Sequence[CurvePanel]) -> None:
    """A run directory's config, metrics, status, summary and learning curves (the task's
    ``panels``) as artifacts."""
    names = [CONFIG, METRICS, CLIENT_METRICS, SUMMARY, STATUS]
    if (run_dir / METRICS).exists():
        plot_learning_curves(run_dir, run_dir / CURVES, title, panels)
        names.append(CURVES)
    tracker.log_artifacts(run_dir, names)


def load_tracker(run_dir: Path, per_client: bool = True) -> RunTracker | None:
    """The MLflow run a run directory belongs to, if it was tracked."""
    file = run_dir / MLFLOW_RUN
    if not file.exists():
        return None
    try:
        data = json.loads(file.read_text())
        return RunTracker(str(data["tracking_uri"]), str(data["run_id"]), per_client)
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(
            f"{file}: damaged (not the JSON fedrlhf wrote); restore it, or delete it to track the rest of the run "
            "as a new MLflow run"
        ) from None


# -- plots ----------------------------------------------------------------------------------------
def plot_learning_curves(run_dir: Path, out: Path, title: str, panels: Sequence[CurvePanel]) -> Path:
    """Mean and worst-decile learning curves from ``metrics.jsonl`` (one PNG, the task's four panels)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rows = read_jsonl(run_dir / METRICS)
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), constrained_layout=True)
    for ax, panel in zip(axes.flat, panels, strict=True):
        key = panel.key
        for suffix, style in (("mean", "-o"), ("worst_decile", "--s"), ("median", ":")):
            pts = [(r["round"], r[f"{key}/{suffix}"]) for r in rows
                   if f"{key}/{suffix}" in r and not math.isnan(r[f"{key}/{suffix}"])]
            if pts:
                ax.plot(*zip(*pts, strict=True), style, label=suffix.replace("_", " "), markersize=4)
        for ref, ref_label, colour in panel.references:
            vals = [r[ref] for r in rows if ref in r]
            if vals:
                ax.axhline(vals[-1], color=colour, linewidth=0.8, label=ref_label)
        ax.set_title(panel.title)
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
