"""The figures of a report (matplotlib, drawn off screen to PNG bytes). Each takes the groups (or
rows) and returns the PNG, or None when the runs hold nothing it could draw."""

from __future__ import annotations

import io
import math
import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedrlhf_ray.report.runs import Run
from fedrlhf_ray.report.statistics import GLOBAL_PREFIX, Interval


def _figure(panels: int = 1) -> tuple[Any, list[Any]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(panels, 2)
    rows = math.ceil(panels / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(6.5 * columns, 4 * rows), dpi=100, squeeze=False)
    flat = list(axes.flat)
    for ax in flat[panels:]:
        ax.set_visible(False)
    return fig, flat[:panels]


def _png(fig: Any, caption: str) -> bytes:
    """The figure as PNG, with ``caption`` (what made its runs) along its foot."""
    import matplotlib.pyplot as plt


    # 5-point text: about 24 characters an inch, 12 lines an inch.
    lines = textwrap.wrap(caption, width=int(fig.get_figwidth() * 24)) or [""]
    foot = (len(lines) / 12 + 0.05) / fig.get_figheight()
    fig.tight_layout(rect=(0, foot, 1, 1))
    fig.text(0.005, 0.005, "\n".join(lines), fontsize=5, color="dimgrey", ha="left", va="bottom")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    plt.close(fig)
    return buffer.getvalue()


def _at_round(run: Run, key: str, round_index: int) -> float:
    return next((float(r[key]) for r in run.rows if int(r["round"]) == round_index and key in r), math.nan)


def _band(ax: Any, x: Sequence[float], ivs: Sequence[Interval], label: str) -> None:
    line = ax.plot(x, [iv.mean for iv in ivs], marker="o", markersize=3, label=label)[0]
    ax.fill_between(x, [iv.low for iv in ivs], [iv.high for iv in ivs], color=line.get_color(), alpha=0.2)


def curves_png(groups: Mapping[str, list[Run]], metrics: Sequence[str], *, caption: str = "") -> bytes | None:
    """Each metric's round mean (``…/mean``) against the round: per group the mean over seeds,
    its interval as a band."""
    from matplotlib.ticker import MaxNLocator

    shown = [m for m in metrics if any(f"{m}/mean" in r for ms in groups.values() for run in ms for r in run.rows)]
    if not shown:
        return None
    fig, axes = _figure(len(shown))
    for ax, metric in zip(axes, shown, strict=True):
        key = f"{metric}/mean"
        for name, members in groups.items():
            rounds = sorted({int(r["round"]) for run in members for r in run.rows if key in r})
            ivs = [Interval.of([_at_round(run, key, t) for run in members]) for t in rounds]
            _band(ax, rounds, ivs, f"{name} (n={max((iv.n for iv in ivs), default=0)})")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set(xlabel="round", ylabel=key)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    return _png(fig, caption)


def clients_png(groups: Mapping[str, list[Run]], metrics: Sequence[str], *, caption: str = "") -> bytes | None:
    """Per metric, each group's distribution over its clients after the last evaluated round
    (every seed's clients together) as violins, with the global model's beside the
    personalized one's where clients evaluated both."""
    panels = []
    for metric in metrics:
        global_key = GLOBAL_PREFIX + metric.removeprefix("eval/")
        boxes: list[tuple[str, list[float]]] = []
        for name, members in groups.items():
            for key, label in ((global_key, f"{name}\n(global model)"), (metric, name)):
                values = [c[key] for run in members for c in run.clients.values()
                          if math.isfinite(c.get(key, math.nan))]
                if values:
                    boxes.append((label, values))
        if boxes:
            panels.append((metric, boxes))
    if not panels:
        return None
    fig, axes = _figure(len(panels))
    for ax, (metric, boxes) in zip(axes, panels, strict=True):
        ax.violinplot([v for _, v in boxes], showmeans=True, showextrema=False)
        ax.boxplot([v for _, v in boxes], widths=0.15, showfliers=False)
        ax.set_xticks(range(1, len(boxes) + 1), [f"{label}\n({len(v)})" for label, v in boxes], fontsize=6)
        ax.set_ylabel(f"{metric} per client")
        ax.grid(alpha=0.3, axis="y")
    return _png(fig, caption)


def wins_png(rows: Sequence[dict[str, Any]], metrics: Sequence[str], *, caption: str = "") -> bytes | None:
    """The share of (seed, client) pairs each comparison wins, per metric, against the even 50 %
    (a star where the sign test's p < 0.05)."""
    shown = [r for r in rows if "client_wins" in r and r["metric"].removesuffix("/mean") in metrics]
    if not shown:
        return None
    fig, (ax,) = _figure()
    labels = [f"{r['group']} vs {r['reference']}\n{r['metric'].removesuffix('/mean')}" for r in shown]
    y = np.arange(len(shown))
    ax.barh(y, [r["client_wins"] for r in shown], color=["tab:blue" if r["client_wins"] >= 0.5 else "tab:red"
                                                         for r in shown])
    for i, r in enumerate(shown):
        ax.text(r["client_wins"] + 0.01, i, f"{r['client_wins']:.0%} of {r['client_pairs']}"
                + (" *" if r["sign_p"] < 0.05 else ""), va="center", fontsize=6)
    ax.axvline(0.5, color="black", linewidth=0.8)
    ax.set_yticks(y, labels, fontsize=6)
    ax.set(xlim=(0, 1), xlabel="share of (seed, client) pairs won")
    fig.set_size_inches(9.5, max(3.0, 0.35 * len(shown) + 1))
    return _png(fig, caption)


def _final_interval(members: Sequence[Run], key: str) -> Interval:
    return Interval.of([run.final().get(key, math.nan) for run in members])


def _errorbar(ax: Any, x: Interval, y: Interval, label: str) -> None:
    def half(iv: Interval) -> list[list[float]] | None:
        return None if math.isnan(iv.low) else [[iv.mean - iv.low], [iv.high - iv.mean]]

    ax.errorbar([x.mean], [y.mean], xerr=half(x), yerr=half(y), marker="o", capsize=3, label=label)


def trade_off_png(groups: Mapping[str, list[Run]], x_metric: str, y_metric: str, *, caption: str = "") -> bytes | None:
    """Each group's final ``y`` against its final ``x`` (means over seeds, intervals as bars)."""
    points = [(name, _final_interval(m, f"{x_metric}/mean"), _final_interval(m, f"{y_metric}/mean"))
              for name, m in groups.items()]
    points = [(name, x, y) for name, x, y in points if x.n and y.n]
    if len(points) < 2:
        return None
    fig, (ax,) = _figure()
    for name, x, y in points:
        _errorbar(ax, x, y, name)
    ax.set(xlabel=f"{x_metric} (final)", ylabel=f"{y_metric} (final)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _png(fig, caption)


def epsilon_png(groups: Mapping[str, list[Run]], metric: str, *, caption: str = "") -> bytes | None:
    """Utility against privacy: each group's final ``metric`` against its final ε (means over
    seeds, intervals as bars), where at least two groups spent a privacy budget."""
    points = [(name, _final_interval(m, "privacy/epsilon"), _final_interval(m, f"{metric}/mean"))
              for name, m in groups.items()]
    points = [(name, eps, y) for name, eps, y in points if eps.n and y.n and math.isfinite(eps.mean)]
    if len(points) < 2:
        return None
    fig, (ax,) = _figure()
    for name, eps, y in sorted(points, key=lambda p: p[1].mean):
        _errorbar(ax, eps, y, name)
    ax.set_xscale("log")
    ax.set(xlabel="ε spent (final)", ylabel=f"{metric} (final)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _png(fig, caption)


def against_setting_png(groups: Mapping[str, list[Run]], setting: str, values: Mapping[str, float],
                        metrics: Sequence[str], *, caption: str = "") -> bytes | None:
    """Where the groups differ in one numeric setting (λ, K): each metric's final mean against
    it, and the run's wall time (its rounds' ``fed/round_seconds``)."""
    order = sorted(values, key=lambda name: values[name])
    panels = [m for m in metrics if any(_final_interval(groups[n], f"{m}/mean").n for n in order)]
    fig, axes = _figure(len(panels) + 1)
    x = [values[name] for name in order]
    for ax, metric in zip(axes, panels, strict=False):
        _band(ax, x, [_final_interval(groups[n], f"{metric}/mean") for n in order], "mean over seeds")
        ax.set(xlabel=setting, ylabel=f"{metric} (final)")
        ax.grid(alpha=0.3)
    seconds = [Interval.of([run.total("fed/round_seconds") for run in groups[n]]) for n in order]
    _band(axes[-1], x, seconds, "mean over seeds")
    axes[-1].set(xlabel=setting, ylabel="wall time of the rounds (s)")
    axes[-1].grid(alpha=0.3)
    return _png(fig, caption)


def _cumulative(run: Run, key: str, times: str | None = None) -> list[tuple[int, float]]:
    """(round, ``key`` summed up to that round), each round's value times ``times``'s if given."""
    total, out = 0.0, []
    for r in run.rows:
        value = float(r.get(key, 0.0)) * (float(r.get(times, 0.0)) if times else 1.0)
        total += value if math.isfinite(value) else 0.0
        out.append((int(r["round"]), total))
    return out


def sample_complexity_png(groups: Mapping[str, list[Run]], metric: str, *, caption: str = "") -> bytes | None:
    """``metric`` against the env steps and the feedback queries spent so far (all clients
    together), per group the mean over seeds with its band."""
    key = f"{metric}/mean"
    axes_spec = [("fed/env_steps", None, "env steps, all clients"),
                 ("feedback/new_queries/mean", "fed/clients_aggregated", "feedback queries, all clients")]
    axes_spec = [a for a in axes_spec if any(a[0] in r for ms in groups.values() for run in ms for r in run.rows)]
    if not axes_spec:
        return None
    fig, axes = _figure(len(axes_spec))
    for ax, (counter, times, label) in zip(axes, axes_spec, strict=True):
        for name, members in groups.items():
            rounds = sorted({int(r["round"]) for run in members for r in run.rows if key in r})
            spent = [dict(_cumulative(run, counter, times)) for run in members]
            x = [float(np.mean([s.get(t, math.nan) for s in spent])) for t in rounds]
            _band(ax, x, [Interval.of([_at_round(run, key, t) for run in members]) for t in rounds], name)
        ax.set(xlabel=label, ylabel=key)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    return _png(fig, caption)
