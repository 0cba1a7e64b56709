"""Tasks: the plug-ins the engine runs, and their registry.

A task (as Flower keeps the task in the app and the framework task-agnostic) supplies what is
particular to one kind of experiment: its data check, its clients and local trainer, its metrics'
summary, its result table and curve panels, its MLflow tags, its path fields and, where it has
them, public models to prepare and a leakage audit. The engine (lifecycle, driver, client hosts,
strategies, privacy, tracking, sweeps, CLI) asks :func:`task_for` once and never names a task.

A new task is a folder ``fedrlhf_ray/tasks/<name>/`` whose ``__init__`` defines ``TASK`` (an
object with the attributes and methods of :class:`Task`, importing nothing heavy at import time),
plus one line in :data:`REGISTRY`. See ``docs/architecture.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import import_module
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import numpy as np

    from fedrlhf_ray.local_trainer import LocalTrainer, Weights
    from fedrlhf_ray.schema import ExperimentConfig

# Task name -> the package that defines its TASK. A third task is a folder plus a line here.
REGISTRY: dict[str, str] = {
    "rec": "fedrlhf_ray.tasks.rec",
    "text": "fedrlhf_ray.tasks.text",
}


@dataclass(frozen=True)
class CurvePanel:
    """One panel of a run's ``learning_curves.png``: a round metric (mean, worst decile and median
    over clients) and the ``eval/.../mean`` keys drawn as horizontal reference lines."""

    key: str
    title: str
    references: tuple[tuple[str, str, str], ...] = ()  # (metric key, label, colour)


@dataclass
class ResultTable:
    """A table the CLI prints (with rich): a title, column names, rows of cells, notes below it."""

    title: str
    columns: Sequence[str]
    rows: list[Sequence[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class RoundArtifacts(Protocol):
    """Text a task writes after each evaluated round from the global weights (IMDb: samples)."""

    def text(self, round_index: int, global_weights: Weights) -> str: ...


class Task(Protocol):
    """What a task supplies; the engine calls nothing else of it."""

    name: str
    env_names: tuple[str, ...]  # the ``env.name`` values this task runs
    # Dotted config fields that hold file paths (made absolute for Tune trials). A path field
    # that may also hold a name (a Hugging Face model) is only made absolute when it exists.
    path_fields: tuple[str, ...]
    name_or_path_fields: tuple[str, ...]
    curve_panels: tuple[CurvePanel, ...]  # four panels
    headline_metric: str  # what a sweep ranks trials by unless it says otherwise
    # Per-client metrics (``eval/...``) a report draws over rounds and over clients, and the
    # pair (x, y) it plots against each other as the task's trade-off.
    report_metrics: tuple[str, ...]
    trade_off: tuple[str, str]
    prepares: bool  # whether ``fedrlhf prepare <env>`` builds public models for it
    datasets: tuple[str, ...]  # what ``fedrlhf data info --dataset`` takes for it

    def check_config(self, cfg: ExperimentConfig) -> None:
        """The task's own cross-checks of a valid config (raise ValueError naming the field)."""

    def check_data(self, cfg: ExperimentConfig, *, announce: bool = False) -> None:
        """Raise a one-line error now when the data (or prepared models) cannot serve ``cfg``."""

    def build_trainer(self, cfg: ExperimentConfig, host_index: int, num_hosts: int) -> LocalTrainer:
        """Inside client actor ``host_index`` of ``num_hosts``: the trainer of its clients."""

    def round_artifacts(self, cfg: ExperimentConfig) -> RoundArtifacts | None:
        """What to write after each evaluated round, or None."""

    def tags(self, cfg: ExperimentConfig) -> dict[str, str]:
        """MLflow tags the UI filters by (the dataset, ...)."""

    def summary(self, final: dict[str, float]) -> dict[str, Any]:
        """Task figures for ``summary.json`` from the last evaluation."""

    def progress(self, metrics: dict[str, float], last_eval: dict[str, float]) -> str:
        """The live progress line's task part."""

    def result_table(self, initial: dict[str, float], final: dict[str, float], rounds: int,
                     num_clients: int, summary: dict[str, Any]) -> ResultTable:
        """The table ``fedrlhf run`` prints at the end."""

    def audit_problem(self, cfg: ExperimentConfig) -> str | None:
        """Why the leakage audit cannot attack this task's updates, or None."""

    def audit_members(self, cfg: ExperimentConfig, n_items: int) -> dict[int, np.ndarray]:
        """The audit's ground truth: per client, one bool per row of the policy's sparse table
        (after the padding row) saying whether the client's private data holds that item."""

    def prepare(self, cfg: ExperimentConfig) -> ResultTable:
        """Build the public models once (only where :attr:`prepares`)."""

    def data_info(self, dataset: str, options: dict[str, Any]) -> ResultTable:
        """Statistics of a local copy of ``dataset`` (one of :attr:`datasets`)."""


def all_tasks() -> list[Task]:
    """Every registered task."""
    return [import_module(package).TASK for package in REGISTRY.values()]


def task_for(env_name: str) -> Task:
    """The task that runs ``env.name`` ``env_name``."""
    for task in all_tasks():
        if env_name in task.env_names:
            return task
    known = sorted(name for task in all_tasks() for name in task.env_names)
    raise ValueError(f"env.name: got {env_name!r} — no task runs it; registered: {', '.join(known)}")


def task_for_dataset(dataset: str) -> Task | None:
    """The task whose data ``dataset`` is, or None."""
    return next((task for task in all_tasks() if dataset in task.datasets), None)


def hosted_clients(
    clients: Sequence[Any], host_index: int, num_hosts: int, centralized: bool
) -> tuple[list[Any], bool]:
    """The clients actor ``host_index`` serves (``client_id % num_hosts``), and whether it also
    serves the centralized baseline's pooled client (id K, on host K mod W)."""
    mine = [c for c in clients if c.client_id % num_hosts == host_index]
    return mine, centralized and len(clients) % num_hosts == host_index
