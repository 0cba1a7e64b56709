"""Reports over runs: each group of runs that differ only in their seed, summarised over its seeds.

``fedrlhf report SOURCE… [--out DIR] [--reference GROUP]`` reads finished run directories (a
source is a run directory, or a folder searched for them, such as a sweep directory), groups them
by their config minus the seed and the settings that only say where or how a run ran (data
paths, tracking, Ray), and writes into ``--out``:

* ``report.json`` and ``report.csv``: every number below;
* ``report.md``: per group and final metric, the mean over seeds with its 95 % interval
  (Student t with n − 1 degrees of freedom; none with one seed), and, against the reference
  group, the paired difference (other − reference, runs paired by seed) with its interval and
  the number of pairs, and per client (where runs kept per-client rows) the share of
  (seed, client) pairs the other group wins with a two-sided sign test;
* ``report.html``: the same tables, the learning curves of the task's headline metric (the
  mean over seeds of each group with its interval as a band) and, where runs kept per-client
  rows, that metric's distribution over each group's clients, in one self-contained page
  (the figures also as ``curves.png`` and ``clients.png``).

A source that is a tracked sweep directory also gets the files as artifacts (``report/``) of
the sweep's parent MLflow run.

A group's name is what sets it apart: the settings whose values differ between the groups
(``federation.baseline=local``), or ``all runs`` when there is one group. Files are read as
text (YAML, JSON lines), never unpickled; a source holding a symbolic link is refused.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import platform
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from scipy import stats

from fedrlhf_ray.errors import UserError
from fedrlhf_ray.rundir import CONFIG, METRICS, RunDir, atomic_write, find_link
from fedrlhf_ray.sweeps.schema import SWEEP_FILE
from fedrlhf_ray.tracking import flatten, git_commit, load_tracker

# Settings that say where or how a run ran, not what it computed.
NOT_THE_EXPERIMENT = ("seed", "name", "env.data.path", "env.imdb.path", "tracking.", "ray.")
LEVEL = 0.95
TUNE_CHECKPOINT = re.compile(r"checkpoint_\d+")


@dataclass(frozen=True)
class Run:
    """One finished run: its directory, its config (flattened to dotted keys) and its rounds."""

    path: Path
    config: dict[str, Any]
    rows: list[dict[str, Any]]
    clients: dict[int, dict[str, float]]  # each client's metrics of the last evaluated round (none if private)

    @property
    def seed(self) -> int:
        return int(self.config.get("seed", 0))

    @property
    def experiment(self) -> tuple[tuple[str, str], ...]:
        """What the run computed: its config without :data:`NOT_THE_EXPERIMENT`."""
        return tuple(
            (k, json.dumps(v, sort_keys=True)) for k, v in sorted(self.config.items())
            if not any(k == skip or (skip.endswith(".") and k.startswith(skip)) for skip in NOT_THE_EXPERIMENT)
        )

    def final(self) -> dict[str, float]:
        """The last evaluated round's summary metrics (``…/mean``), and ε where there is one."""
        evaluated = [r for r in self.rows if any(k.startswith("eval") and k.endswith("/mean") for k in r)]
        if not evaluated:
            return {}
        last = evaluated[-1]
        keys = [k for k in last if (k.startswith("eval") and k.endswith("/mean")) or k == "privacy/epsilon"]
        return {k: float(last[k]) for k in keys if isinstance(last[k], (int, float))}


@dataclass(frozen=True)
class Interval:
    n: int
    mean: float
    low: float
    high: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Interval:
        """Mean and its :data:`LEVEL` Student-t interval (NaN bounds with fewer than 2 values)."""
        x = np.asarray([v for v in values if math.isfinite(v)], dtype=np.float64)
        if x.size == 0:
            return cls(0, math.nan, math.nan, math.nan)
        mean = float(x.mean())
        if x.size < 2:
            return cls(1, mean, math.nan, math.nan)
        half = float(stats.t.ppf(0.5 + LEVEL / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
        return cls(int(x.size), mean, mean - half, mean + half)

    def text(self) -> str:
        if self.n == 0:
            return "—"
        if math.isnan(self.low):
            return f"{self.mean:.3f}"
        return f"{self.mean:.3f} [{self.low:.3f}, {self.high:.3f}]"


def _is_round(value: Any) -> bool:
    """A round number as fedrlhf writes it (a hand-edited row may hold anything)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _read_run(path: Path) -> Run | None:
    """The run in ``path`` if it finished (None if it did not); a damaged file is a UserError."""
    rd = RunDir(path)
    if rd.status() != "completed":
        return None
    try:
        config = yaml.safe_load((path / CONFIG).read_text())
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as err:
        raise UserError(f"report: {path / CONFIG} is not readable YAML ({type(err).__name__}); "
                        "point the report at run directories fedrlhf wrote") from None
    if not isinstance(config, dict):
        raise UserError(f"report: {path / CONFIG} does not hold a config mapping; point the report at run directories")
    seed = config.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise UserError(f"report: {path / CONFIG} has seed {seed!r}, not an integer; point the report at run "
                        "directories fedrlhf wrote")
    rows = [r for r in rd.metrics() if isinstance(r, dict) and _is_round(r.get("round"))]
    evals = [r for r in rd.client_metrics() if isinstance(r, dict) and r.get("kind") == "eval"
             and _is_round(r.get("round")) and isinstance(r.get("client"), int)]
    last = max((r["round"] for r in evals), default=None)
    clients = {
        int(r["client"]): {k: float(v) for k, v in r.items() if k.startswith("eval") and isinstance(v, (int, float))}
        for r in evals if r["round"] == last
    }
    return Run(path, flatten(config), sorted(rows, key=lambda r: r["round"]), clients)


def find_runs(sources: Sequence[Path]) -> list[Run]:
    """Every finished run under ``sources`` (each a run directory or a folder holding some)."""
    runs: list[Run] = []
    for source in sources:
        if not source.is_dir():
            raise UserError(f"report: {source} is not a folder; give run directories or sweep directories")
        link = find_link(source)
        if link is not None:
            raise UserError(f"report: {link} is a link; the report reads no file through a link, so remove it")
        candidates = [source] if (source / METRICS).is_file() else sorted(
            p.parent for p in source.rglob(METRICS)
            # Tune's checkpoints of a trial hold copies of its run directory.
            if not any(TUNE_CHECKPOINT.fullmatch(part) for part in p.relative_to(source).parts)
        )
        for path in candidates:
            if (path / CONFIG).is_file():
                run = _read_run(path)
                if run is not None:
                    runs.append(run)
    if not runs:
        raise UserError(f"report: no finished run under {', '.join(map(str, sources))}; "
                        "give the run or sweep directories of completed runs")
    return runs


def group_runs(runs: Sequence[Run]) -> dict[str, list[Run]]:
    """Runs by experiment, each group named by the settings that set it apart, one run per seed
    (a second run of an experiment and seed repeats the first, so it would count one seed twice)."""
    by_experiment: dict[tuple[tuple[str, str], ...], dict[int, Run]] = {}
    for run in sorted(runs, key=lambda r: str(r.path)):
        by_experiment.setdefault(run.experiment, {}).setdefault(run.seed, run)
    if len(by_experiment) == 1:
        (seeds,) = by_experiment.values()
        return {"all runs": [seeds[s] for s in sorted(seeds)]}
    settings = [dict(key) for key in by_experiment]
    differing = sorted({k for s in settings for k in s if len({t.get(k) for t in settings}) > 1})
    groups = {}
    for key, seeds in by_experiment.items():
        values = dict(key)
        name = ", ".join(f"{k}={json.loads(values[k]) if k in values else '—'}" for k in differing)
        groups[name] = [seeds[s] for s in sorted(seeds)]
    return dict(sorted(groups.items()))


def summarise(groups: Mapping[str, list[Run]]) -> list[dict[str, Any]]:
    """Per group and final metric: n, mean and its interval."""
    rows = []
    for name, members in groups.items():
        finals = [run.final() for run in members]
        for metric in sorted({k for f in finals for k in f}):
            iv = Interval.of([f.get(metric, math.nan) for f in finals])
            rows.append({"group": name, "metric": metric, "n": iv.n, "mean": iv.mean, "low": iv.low, "high": iv.high})
    return rows


def paired_differences(groups: Mapping[str, list[Run]], reference: str) -> list[dict[str, Any]]:
    """Per other group and final metric: other − reference over the seeds both ran, and, where
    the runs kept per-client rows, per client: the share of (seed, client) pairs the other group
    wins and the two-sided sign test's p-value (ties left out)."""
    base = {run.seed: run for run in groups[reference]}
    rows = []
    for name, members in groups.items():
        if name == reference:
            continue
        pairs = [(run, base[run.seed]) for run in members if run.seed in base]
        finals = [(other.final(), ref.final()) for other, ref in pairs]
        for metric in sorted({k for other, ref in finals for k in other if k in ref}):
            differences = [o[metric] - r[metric] for o, r in finals if metric in o and metric in r]
            if not any(differences):
                continue  # the same in both (the data's own numbers, such as held-out counts)
            iv = Interval.of(differences)
            row = {"group": name, "reference": reference, "metric": metric, "n": iv.n, "mean": iv.mean,
                   "low": iv.low, "high": iv.high}
            per_client = metric.removesuffix("/mean")
            diffs = [o.clients[c][per_client] - r.clients[c][per_client] for o, r in pairs for c in o.clients
                     if c in r.clients and per_client in o.clients[c] and per_client in r.clients[c]]
            diffs = [d for d in diffs if math.isfinite(d) and d != 0.0]
            if diffs:
                wins = sum(d > 0 for d in diffs)
                row.update(client_pairs=len(diffs), client_wins=wins / len(diffs),
                           sign_p=float(stats.binomtest(wins, len(diffs), 0.5).pvalue))
            rows.append(row)
    return rows


def _figure() -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(7, 4), dpi=110)


def _png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def curves_png(groups: Mapping[str, list[Run]], metric: str) -> bytes:
    """``metric`` against the round: each group's mean over seeds, its interval as a band."""
    from matplotlib.ticker import MaxNLocator

    fig, ax = _figure()
    for name, members in groups.items():
        rounds = sorted({int(r["round"]) for run in members for r in run.rows if metric in r})
        ivs = [Interval.of([next((float(r[metric]) for r in run.rows if int(r["round"]) == t and metric in r),
                                 math.nan) for run in members]) for t in rounds]
        mean = [iv.mean for iv in ivs]
        line = ax.plot(rounds, mean, marker="o", label=f"{name} (n={max((iv.n for iv in ivs), default=0)})")[0]
        ax.fill_between(rounds, [iv.low for iv in ivs], [iv.high for iv in ivs], color=line.get_color(), alpha=0.2)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def clients_png(groups: Mapping[str, list[Run]], metric: str) -> bytes | None:
    """Per group, the distribution of ``metric`` over its clients after the last evaluated round
    (every seed's clients together), as box plots; None when no run kept per-client rows."""
    per_client = metric.removesuffix("/mean")
    values = {name: [c[per_client] for run in members for c in run.clients.values()
                     if math.isfinite(c.get(per_client, math.nan))] for name, members in groups.items()}
    values = {name: v for name, v in values.items() if v}
    if not values:
        return None
    fig, ax = _figure()
    ax.boxplot(list(values.values()), showmeans=True)
    ax.set_xticks(range(1, len(values) + 1), [f"{name}\n({len(v)} client rows)" for name, v in values.items()],
                  fontsize=7)
    ax.set_ylabel(f"{per_client} per client")
    ax.grid(alpha=0.3, axis="y")
    return _png(fig)


def provenance(command: str) -> dict[str, str]:
    """What made the report: the command, the machine and the code's commit (when in git)."""
    return {"command": command, "machine": f"{platform.node()} ({platform.platform()}, {platform.machine()})",
            "commit": (git_commit() or "unknown")[:12]}


def log_to_sweeps(sources: Sequence[Path], files: Sequence[Path]) -> list[str]:
    """The report's files as artifacts (``report/``) of each source sweep's parent MLflow run;
    returns those runs' ids. A source without a tracked sweep is left as it is."""
    ids = []
    for source in sources:
        if not (source / SWEEP_FILE).is_file():
            continue
        tracker = load_tracker(source)
        if tracker is None:
            continue
        try:
            for file in files:
                tracker.log_artifacts(file.parent, [file.name], "report")
        except Exception as err:  # noqa: BLE001 - MLflow's errors share no base class worth naming
            raise UserError(
                f"report: written, but not logged to the sweep's MLflow run {tracker.run_id} "
                f"({type(err).__name__}); check that the store {source / 'mlflow_run.json'} names is reachable"
            ) from None
        ids.append(tracker.run_id)
    return ids


def _strict(node: Any) -> Any:
    """``node`` with NaN as null, so that the JSON is strict."""
    if isinstance(node, float) and not math.isfinite(node):
        return None
    if isinstance(node, dict):
        return {k: _strict(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_strict(v) for v in node]
    return node


def _table(rows: Sequence[dict[str, Any]], paired: bool) -> list[list[str]]:
    head = ["group", "metric", "n", "other − reference [95 % CI]" if paired else "mean [95 % CI]"]
    if paired:
        head += ["clients won (of seed × client pairs)", "sign test p"]
    body = []
    for r in rows:
        cells = [r["group"], r["metric"], str(r["n"]), Interval(r["n"], r["mean"], r["low"], r["high"]).text()]
        if paired:
            won = "client_pairs" in r
            cells += [f"{r['client_wins']:.0%} of {r['client_pairs']}" if won else "—",
                      f"{r['sign_p']:.2g}" if won else "—"]
        body.append(cells)
    return [head, *body]


def _markdown(table: list[list[str]]) -> str:
    lines = ["| " + " | ".join(table[0]) + " |", "|" + "---|" * len(table[0])]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in table[1:]]
    return "\n".join(lines)


def _html_table(table: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in table[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in table[1:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def write_report(runs: Sequence[Run], out: Path, reference: str | None, headline: str, command: str) -> list[Path]:
    """The report's files in ``out`` (see the module docstring); returns their paths."""
    groups = group_runs(runs)
    repeats = len(runs) - sum(len(m) for m in groups.values())
    if reference is not None and reference not in groups:
        raise UserError(f"report: --reference {reference!r} is not a group; the groups are: {'; '.join(groups)}")
    summary = summarise(groups)
    paired = paired_differences(groups, reference) if reference is not None else []
    made = provenance(command)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"report: cannot make --out {out} ({err.strerror}); choose another folder") from None
    record = {"provenance": made, "interval": f"{LEVEL:.0%} Student t over seeds",
              "groups": {name: [str(run.path) for run in members] for name, members in groups.items()},
              "summary": summary, "paired": paired}
    csv_buffer = io.StringIO()
    writer = csv.DictWriter(csv_buffer, ["kind", "group", "reference", "metric", "n", "mean", "low", "high",
                                         "client_pairs", "client_wins", "sign_p"])
    writer.writeheader()
    for kind, rows in (("summary", summary), ("paired", paired)):
        for row in rows:
            writer.writerow({"kind": kind, "reference": "", **row})
    intro = (f"Made by `{made['command']}` on {made['machine']} at commit {made['commit']}. Each group's "
             f"runs differ only in their seed; intervals are {LEVEL:.0%} Student t over the seeds (none with one).")
    groups_md = "\n".join(f"- **{name}**: {len(m)} run(s), seeds {', '.join(str(r.seed) for r in m)}"
                          for name, m in groups.items())
    if repeats:
        groups_md += f"\n\n{repeats} more run(s) repeat an experiment and seed already counted: left out."
    md = [f"# Report\n\n{intro}\n\n## Groups\n\n{groups_md}\n\n## Final metrics\n\n{_markdown(_table(summary, False))}"]
    if reference is not None:
        md.append(f"## Paired differences against {reference}\n\nRuns paired by seed.\n\n"
                  f"{_markdown(_table(paired, True))}")
    md.append("## Learning curves\n\n![learning curves](curves.png)")
    png = curves_png(groups, headline)
    clients = clients_png(groups, headline)
    if clients is not None:
        md.append("## Per client\n\n![per client](clients.png)")
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>fedrlhf report</title><style>"
        "body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:.2em .6em}</style></head><body><h1>Report</h1>"
        f"<p>{html.escape(intro)}</p><h2>Final metrics</h2>{_html_table(_table(summary, False))}"
        + (f"<h2>Paired differences against {html.escape(reference)}</h2>{_html_table(_table(paired, True))}"
           if reference is not None else "")
        + f"<h2>Learning curves: {html.escape(headline)}</h2>"
        f"<img alt='learning curves' src='data:image/png;base64,{base64.b64encode(png).decode()}'>"
        + (f"<h2>Per client: {html.escape(headline.removesuffix('/mean'))}</h2><img alt='per client' "
           f"src='data:image/png;base64,{base64.b64encode(clients).decode()}'>" if clients is not None else "")
        + "</body></html>"
    )
    files = {
        "report.json": json.dumps(_strict(record), indent=2).encode(),
        "report.csv": csv_buffer.getvalue().encode(),
        "report.md": ("\n\n".join(md) + "\n").encode(),
        "curves.png": png,
        **({"clients.png": clients} if clients is not None else {}),
        "report.html": page.encode(),
    }
    for name, data in files.items():
        atomic_write(out / name, data)
    return [out / name for name in files]
