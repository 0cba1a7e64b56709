"""The runs a report reads: finished run directories, an MLflow experiment's finished runs, or
the small summaries a report keeps of them (``runs.json``, what ``results/`` commits).

Every file is read as text (YAML, JSON, JSON lines), never unpickled, and never through a link.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from fedrlhf_ray.errors import UserError
from fedrlhf_ray.rundir import CLIENT_METRICS, CONFIG, METRICS, STATUS, RunDir, atomic_write, find_link
from fedrlhf_ray.tracking import check_tracking_uri, flatten, load_tracker, tracking_uri_problem

RUNS_FILE = "runs.json"
MLFLOW_SOURCE = "mlflow:"
TUNE_CHECKPOINT = re.compile(r"checkpoint_\d+")
# What a summary keeps of a round row: what the report reads (the round, the evaluations' means
# over clients, ε, and what the rounds spent: env steps, feedback queries, clients, time).
_KEPT = re.compile(r"^(round|eval[^/]*/.*/mean|privacy/epsilon|fed/(env_steps|round_seconds|clients_aggregated)"
                   r"|feedback/new_queries/mean)$")


@dataclass(frozen=True)
class Run:
    """One finished run: where it came from, its config (flattened to dotted keys) and its rounds."""

    path: str
    config: dict[str, Any]
    rows: list[dict[str, Any]]
    clients: dict[int, dict[str, float]]  # each client's metrics of the last evaluated round (none if private)
    commit: str | None = None  # the code's commit that made the run, where it is known

    @property
    def seed(self) -> int:
        return int(self.config.get("seed", 0))

    def final(self) -> dict[str, float]:
        """The last evaluated round's summary metrics (``…/mean``), and ε where there is one."""
        evaluated = [r for r in self.rows if any(k.startswith("eval") and k.endswith("/mean") for k in r)]
        if not evaluated:
            return {}
        last = evaluated[-1]
        keys = [k for k in last if (k.startswith("eval") and k.endswith("/mean")) or k == "privacy/epsilon"]
        return {k: float(last[k]) for k in keys if _is_number(last[k])}

    def total(self, key: str) -> float:
        """``key`` summed over the rounds (NaN where no round has it), such as ``fed/env_steps``."""
        values = [float(r[key]) for r in self.rows if _is_number(r.get(key))]
        return math.fsum(values) if values else math.nan

    def summary(self) -> dict[str, Any]:
        """What ``runs.json`` keeps of this run."""
        return {"path": self.path, "config": self.config, "commit": self.commit,
                "rows": [{k: v for k, v in r.items() if _KEPT.match(k)} for r in self.rows],
                "clients": {str(c): m for c, m in sorted(self.clients.items())}}


def _is_number(value: Any) -> bool:
    """A finite number as fedrlhf writes it (a hand-edited row may hold anything)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def strict_json(node: Any) -> Any:
    """``node`` with NaN and infinities as null, so that the JSON is strict."""
    if isinstance(node, float) and not math.isfinite(node):
        return None
    if isinstance(node, dict):
        return {k: strict_json(v) for k, v in node.items()}
    if isinstance(node, list):
        return [strict_json(v) for v in node]
    return node


def _read_run(path: Path, label: str) -> Run | None:
    """The run in ``path`` if it finished (None if it did not); a damaged file is a UserError."""
    rd = RunDir(path)
    if rd.status() != "completed":
        return None
    try:
        config = yaml.safe_load((path / CONFIG).read_text())
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as err:
        raise UserError(f"report: {label}'s {CONFIG} is not readable YAML ({type(err).__name__}); "
                        "point the report at runs fedrlhf wrote") from None
    if not isinstance(config, dict):
        raise UserError(f"report: {label}'s {CONFIG} does not hold a config mapping; point the report at runs")
    seed = config.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise UserError(f"report: {label}'s {CONFIG} has seed {seed!r}, not an integer; point the report at runs "
                        "fedrlhf wrote")
    rows = [r for r in rd.metrics() if isinstance(r, dict) and _is_number(r.get("round"))]
    evals = [r for r in rd.client_metrics() if isinstance(r, dict) and r.get("kind") == "eval"
             and _is_number(r.get("round")) and isinstance(r.get("client"), int)]
    last = max((r["round"] for r in evals), default=None)
    clients = {
        int(r["client"]): {k: float(v) for k, v in r.items() if k.startswith("eval") and _is_number(v)}
        for r in evals if r["round"] == last
    }
    return Run(label, flatten(config), sorted(rows, key=lambda r: r["round"]), clients, _commit(rd))


def _commit(rd: RunDir) -> str | None:
    """The commit a finished run recorded, or, for a run finished before runs recorded it, its
    local (SQLite) MLflow run's source-commit tag; None when neither says."""
    recorded = (rd.read_json(STATUS) or {}).get("commit")
    if isinstance(recorded, str):
        return recorded
    try:
        tracker = load_tracker(rd.path)
        if tracker is None or not tracker.tracking_uri.startswith("sqlite:"):
            return None  # a server is not asked: a report must not wait on one
        tag = tracker.client().get_run(tracker.run_id).data.tags.get("mlflow.source.git.commit")
    except Exception:  # noqa: BLE001 - a store that cannot say leaves the commit unknown
        return None
    return tag if isinstance(tag, str) else None


class _RunSummary(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    path: str
    config: dict[str, Any]
    rows: list[dict[str, float | int | None]]  # null: a metric undefined that round (NaN)
    clients: dict[str, dict[str, float | None]]
    commit: str | None = None


class Summaries(BaseModel):
    """``runs.json``: the runs of one report, and how that report was asked for."""

    model_config = ConfigDict(extra="forbid", strict=True)

    provenance: dict[str, str]  # the command, machine and commit that made the summaries
    reference: str | None
    runs: list[_RunSummary]

    def to_runs(self, label: str) -> list[Run]:
        runs = []
        for r in self.runs:
            seed = r.config.get("seed", 0)
            if not isinstance(seed, int) or isinstance(seed, bool) or not all(_is_number(row.get("round"))
                                                                                  for row in r.rows):
                raise UserError(f"report: {label} holds run {r.path!r} with a non-integer seed or round; "
                                "make the file again with fedrlhf report --out")
            clients = {int(c): {k: math.nan if v is None else v for k, v in m.items()}
                       for c, m in r.clients.items() if c.isdigit()}
            rows = [{k: math.nan if v is None else v for k, v in row.items()} for row in r.rows]
            runs.append(Run(r.path, r.config, sorted(rows, key=lambda row: row["round"]), clients, r.commit))
        return runs


def read_summaries(folder: Path) -> Summaries:
    """The ``runs.json`` of a report folder (a UserError naming the file if it is not one)."""
    file = folder / RUNS_FILE
    link = find_link(folder)
    if link is not None:
        raise UserError(f"report: {link} is a link; the report reads no file through a link, so remove it")
    try:
        return Summaries.model_validate(json.loads(file.read_text()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, ValidationError, RecursionError) as err:
        raise UserError(f"report: {file} is not a run summary file ({type(err).__name__}); make it again with "
                        "fedrlhf report SOURCE… --out " + str(folder)) from None


def write_summaries(folder: Path, runs: Sequence[Run], provenance: dict[str, str], reference: str | None) -> Path:
    record = {"provenance": provenance, "reference": reference, "runs": [run.summary() for run in runs]}
    atomic_write(folder / RUNS_FILE, (json.dumps(strict_json(record), sort_keys=True) + "\n").encode())
    return folder / RUNS_FILE


def _run_dirs(source: Path) -> list[Path]:
    if (source / METRICS).is_file():
        return [source]
    return sorted(
        p.parent for p in source.rglob(METRICS)
        # Tune's checkpoints of a trial hold copies of its run directory.
        if not any(TUNE_CHECKPOINT.fullmatch(part) for part in p.relative_to(source).parts)
    )


def _mlflow_runs(experiment: str, tracking_uri: str) -> list[Run]:
    """The finished runs of an MLflow experiment, read from the run files each logged as
    artifacts (a sweep's parent run, which has none, is not a run)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    problem = tracking_uri_problem(tracking_uri)
    if problem:
        raise UserError(f"report: tracking URI {tracking_uri!r} (--tracking-uri or $MLFLOW_TRACKING_URI): {problem}")
    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri.removeprefix("sqlite:///")).is_file():
        # MLflow would create an empty store there: a report only reads.
        raise UserError(f"report: no MLflow store at {tracking_uri}; give --tracking-uri the store the runs were "
                        "tracked in")
    check_tracking_uri(tracking_uri)  # a server that does not answer is one line, not minutes of retries
    try:
        client = MlflowClient(tracking_uri)
        found = client.get_experiment_by_name(experiment)
        if found is None:
            names = [e.name for e in client.search_experiments()]
            raise UserError(f"report: MLflow experiment {experiment!r} is not in {tracking_uri}; it has: "
                            f"{', '.join(names) or 'none'}")
        finished = client.search_runs([found.experiment_id], "attributes.status = 'FINISHED'", max_results=50_000)
        runs = []
        with tempfile.TemporaryDirectory() as scratch:
            for i, info in enumerate(finished):
                artifacts = {a.path for a in client.list_artifacts(info.info.run_id)}
                if not {CONFIG, METRICS, STATUS} <= artifacts:
                    continue
                folder = Path(scratch) / str(i)
                folder.mkdir()
                for name in (CONFIG, METRICS, STATUS, CLIENT_METRICS):
                    if name in artifacts:
                        client.download_artifacts(info.info.run_id, name, str(folder))
                link = find_link(folder)
                if link is not None:
                    raise UserError(f"report: MLflow run {info.info.run_id}'s {link.name} came back as a link; "
                                    "the report reads no file through a link")
                run = _read_run(folder, f"MLflow run {info.info.run_id} ({info.info.run_name})")
                if run is not None:
                    runs.append(replace(run, commit=run.commit or info.data.tags.get("mlflow.source.git.commit")))
        return runs
    except MlflowException as err:
        raise UserError(f"report: cannot read MLflow experiment {experiment!r} from {tracking_uri} "
                        f"({type(err).__name__}); check --tracking-uri") from None


def find_runs(sources: Sequence[str], tracking_uri: str) -> list[Run]:
    """Every finished run of ``sources``: each a run directory, a folder holding some (a sweep
    directory), a report folder holding ``runs.json``, or ``mlflow:EXPERIMENT`` (in ``tracking_uri``)."""
    runs: list[Run] = []
    for source in sources:
        if source.startswith(MLFLOW_SOURCE):
            runs += _mlflow_runs(source.removeprefix(MLFLOW_SOURCE), tracking_uri)
            continue
        folder = Path(source)
        if not folder.is_dir():
            raise UserError(f"report: {source} is not a folder; give run directories, sweep directories, report "
                            "folders or mlflow:EXPERIMENT")
        link = find_link(folder)
        if link is not None:
            raise UserError(f"report: {link} is a link; the report reads no file through a link, so remove it")
        if (folder / RUNS_FILE).is_file() and not (folder / METRICS).is_file():
            runs += read_summaries(folder).to_runs(str(folder / RUNS_FILE))
            continue
        for path in _run_dirs(folder):
            if (path / CONFIG).is_file():
                run = _read_run(path, str(path))
                if run is not None:
                    runs.append(run)
    if not runs:
        raise UserError(f"report: no finished run in {', '.join(sources)}; give the run or sweep directories of "
                        "completed runs")
    return runs
