"""The statistics of a report: runs grouped by what they computed, each group's mean over its
seeds with a Student-t interval, and paired differences (other − reference by seed, and per
client with a sign test; personalized − global within the runs that evaluated both)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats

from fedrlhf_ray.report.runs import Run

# Settings that say where or how a run ran, not what it computed.
NOT_THE_EXPERIMENT = ("seed", "name", "env.data.path", "env.imdb.path", "tracking.", "ray.")
LEVEL = 0.95
GLOBAL_PREFIX = "eval_global/"  # the global model's metrics, where a client also evaluated its own


def experiment(run: Run) -> tuple[tuple[str, str], ...]:
    """What ``run`` computed: its config without :data:`NOT_THE_EXPERIMENT`."""
    return tuple(
        (k, json.dumps(v, sort_keys=True)) for k, v in sorted(run.config.items())
        if not any(k == skip or (skip.endswith(".") and k.startswith(skip)) for skip in NOT_THE_EXPERIMENT)
    )


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


def _differing(settings: Sequence[dict[str, str]]) -> list[str]:
    return sorted({k for s in settings for k in s if len({t.get(k) for t in settings}) > 1})


def group_runs(runs: Sequence[Run]) -> dict[str, list[Run]]:
    """Runs by experiment, each group named by the settings that set it apart, one run per seed
    (a second run of an experiment and seed repeats the first, so it would count one seed twice)."""
    by_experiment: dict[tuple[tuple[str, str], ...], dict[int, Run]] = {}
    for run in sorted(runs, key=lambda r: r.path):
        by_experiment.setdefault(experiment(run), {}).setdefault(run.seed, run)
    if len(by_experiment) == 1:
        (seeds,) = by_experiment.values()
        return {"all runs": [seeds[s] for s in sorted(seeds)]}
    differing = _differing([dict(key) for key in by_experiment])
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
            _client_wins(row, [o.clients[c][per_client] - r.clients[c][per_client] for o, r in pairs
                               for c in o.clients if c in r.clients and per_client in o.clients[c]
                               and per_client in r.clients[c]])
            rows.append(row)
    return rows


def differing_settings(groups: Mapping[str, list[Run]]) -> dict[str, dict[str, Any]]:
    """Per group, the value of each setting that differs between the groups (as in its name)."""
    settings = {name: dict(experiment(members[0])) for name, members in groups.items()}
    keys = _differing(list(settings.values()))
    return {name: {k: json.loads(s[k]) if k in s else None for k in keys} for name, s in settings.items()}


def _client_wins(row: dict[str, Any], diffs: Sequence[float]) -> None:
    """Adds to ``row`` the share of nonzero per-client differences that are positive and the
    two-sided sign test's p-value (ties and undefined values left out)."""
    diffs = [d for d in diffs if math.isfinite(d) and d != 0.0]
    if diffs:
        wins = sum(d > 0 for d in diffs)
        row.update(client_pairs=len(diffs), client_wins=wins / len(diffs),
                   sign_p=float(stats.binomtest(wins, len(diffs), 0.5).pvalue))


def personal_vs_global(groups: Mapping[str, list[Run]]) -> list[dict[str, Any]]:
    """Per group whose clients also evaluated the global model (fine-tuning), and per metric:
    personalized − global over the seeds, and per (seed, client) pair the share personalized wins."""
    rows = []
    for name, members in groups.items():
        finals = [run.final() for run in members]
        metrics = sorted({k for f in finals for k in f if k.startswith("eval/")
                          and GLOBAL_PREFIX + k.removeprefix("eval/") in f})
        for metric in metrics:
            own = GLOBAL_PREFIX + metric.removeprefix("eval/")
            differences = [f[metric] - f[own] for f in finals if metric in f and own in f]
            if not any(differences):
                continue
            iv = Interval.of(differences)
            row = {"group": name, "reference": "global model", "metric": metric, "n": iv.n, "mean": iv.mean,
                   "low": iv.low, "high": iv.high}
            key, global_key = metric.removesuffix("/mean"), own.removesuffix("/mean")
            _client_wins(row, [c[key] - c[global_key] for run in members for c in run.clients.values()
                               if key in c and global_key in c])
            rows.append(row)
    return rows
