"""A report's files: ``report.md``, the self-contained ``report.html``, ``report.csv`` and
``report.json``, the figures as PNG, and ``runs.json`` (the runs' small summaries, from which
``fedrlhf report --from`` makes it all again)."""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import platform
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedrlhf_ray.errors import UserError
from fedrlhf_ray.report import figures
from fedrlhf_ray.report.runs import Run, strict_json, write_summaries
from fedrlhf_ray.report.statistics import (
    LEVEL,
    Interval,
    differing_settings,
    group_runs,
    paired_differences,
    personal_vs_global,
    summarise,
)
from fedrlhf_ray.rundir import atomic_write
from fedrlhf_ray.tracking import git_commit

KINDS = ("summary", "paired", "personal")  # the report's tables, as the docs' markers name them
FIGURES = ("curves.png", "clients.png", "wins.png", "trade_off.png", "sample_complexity.png", "epsilon.png",
           "against_setting.png")


@dataclass(frozen=True)
class TaskView:
    """What the report draws for the runs' task: the metrics of its curves and per-client
    figures, and the trade-off it plots (x, y)."""

    headline: str
    metrics: tuple[str, ...]
    trade_off: tuple[str, str]


@dataclass(frozen=True)
class Tables:
    groups: dict[str, list[Run]]
    summary: list[dict[str, Any]]
    paired: list[dict[str, Any]]
    personal: list[dict[str, Any]]

    @classmethod
    def of(cls, runs: Sequence[Run], reference: str | None) -> Tables:
        groups = group_runs(runs)
        if reference is not None and reference not in groups:
            raise UserError(f"report: --reference {reference!r} is not a group; the groups are: {'; '.join(groups)}")
        paired = paired_differences(groups, reference) if reference is not None else []
        return cls(groups, summarise(groups), paired, personal_vs_global(groups))

    def rows(self, kind: str) -> list[dict[str, Any]]:
        return {"summary": self.summary, "paired": self.paired, "personal": self.personal}[kind]


def provenance(command: str) -> dict[str, str]:
    """What made the report: the command, the machine and the code's commit (when in git)."""
    return {"command": command, "machine": f"{platform.node()} ({platform.platform()}, {platform.machine()})",
            "commit": (git_commit() or "unknown")[:12]}


def table(rows: Sequence[dict[str, Any]], kind: str) -> list[list[str]]:
    """A table's cells: header first."""
    difference = {"summary": "mean [95 % CI]", "paired": "other − reference [95 % CI]",
                  "personal": "personalized − global [95 % CI]"}[kind]
    head = ["group", "metric", "n", difference]
    if kind != "summary":
        head += ["clients won (of seed × client pairs)", "sign test p"]
    body = []
    for r in rows:
        cells = [r["group"], r["metric"], str(r["n"]), Interval(r["n"], r["mean"], r["low"], r["high"]).text()]
        if kind != "summary":
            won = "client_pairs" in r
            cells += [f"{r['client_wins']:.0%} of {r['client_pairs']}" if won else "—",
                      f"{r['sign_p']:.2g}" if won else "—"]
        body.append(cells)
    return [head, *body]


def markdown(cells: list[list[str]]) -> str:
    lines = ["| " + " | ".join(cells[0]) + " |", "|" + "---|" * len(cells[0])]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in cells[1:]]
    return "\n".join(lines)


def _html_table(cells: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cells[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in cells[1:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _figures(tables: Tables, view: TaskView, caption: str) -> dict[str, tuple[str, bytes]]:
    """The report's figures by file name: (title, PNG), each captioned with what made its runs."""
    groups, headline = tables.groups, view.headline.removesuffix("/mean")
    made: dict[str, tuple[str, bytes | None]] = {
        "curves.png": ("Learning curves (mean over seeds, 95 % band)",
                       figures.curves_png(groups, view.metrics, caption=caption)),
        "clients.png": ("Per client, after the last evaluated round",
                        figures.clients_png(groups, view.metrics, caption=caption)),
        "wins.png": ("Per-client win rates",
                     figures.wins_png(tables.paired + tables.personal, view.metrics, caption=caption)),
        "trade_off.png": (f"Trade-off: {view.trade_off[1]} against {view.trade_off[0]}",
                          figures.trade_off_png(groups, *view.trade_off, caption=caption)),
        "sample_complexity.png": (f"{view.headline} against what the clients spent",
                                  figures.sample_complexity_png(groups, headline, caption=caption)),
        "epsilon.png": (f"{view.headline} against the privacy spent (ε)",
                        figures.epsilon_png(groups, headline, caption=caption)),
    }
    settings = differing_settings(groups) if len(groups) > 1 else {}
    keys = {k for values in settings.values() for k in values}
    if len(keys) == 1:
        (setting,) = keys
        values = {name: v[setting] for name, v in settings.items()}
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values.values()):
            made["against_setting.png"] = (
                f"Final metrics and wall time against {setting}",
                figures.against_setting_png(groups, setting, values, view.metrics, caption=caption),
            )
    return {name: (title, png) for name, (title, png) in made.items() if png is not None}


def write_report(runs: Sequence[Run], out: Path, reference: str | None, view: TaskView,
                 made: Mapping[str, str], regenerated_by: str | None = None) -> list[Path]:
    """The report's files in ``out`` (the ``runs.json`` too unless ``regenerated_by`` says the
    runs came from it); returns their paths."""
    tables = Tables.of(runs, reference)
    groups = tables.groups
    repeats = len(runs) - sum(len(m) for m in groups.values())
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"report: cannot make --out {out} ({err.strerror}); choose another folder") from None
    record = {"provenance": dict(made), "interval": f"{LEVEL:.0%} Student t over seeds",
              "groups": {name: [run.path for run in members] for name, members in groups.items()},
              "summary": tables.summary, "paired": tables.paired, "personal": tables.personal}
    csv_buffer = io.StringIO()
    writer = csv.DictWriter(csv_buffer, ["kind", "group", "reference", "metric", "n", "mean", "low", "high",
                                         "client_pairs", "client_wins", "sign_p"])
    writer.writeheader()
    for kind in KINDS:
        for row in tables.rows(kind):
            writer.writerow({"kind": kind, "reference": "", **row})
    commits = sorted({(run.commit or "unknown")[:12] for members in groups.values() for run in members})
    intro = (f"Runs made at commit {', '.join(commits)}; summarised by `{made['command']}` on {made['machine']} "
             f"at commit {made['commit']}"
             + (f"; made again from their summaries by `{regenerated_by}`" if regenerated_by else "")
             + f". Each group's runs differ only in their seed; intervals are {LEVEL:.0%} Student t over the "
             "seeds (none with one).")
    groups_md = "\n".join(f"- **{name}**: {len(m)} run(s), seeds {', '.join(str(r.seed) for r in m)}"
                          for name, m in groups.items())
    if repeats:
        groups_md += f"\n\n{repeats} more run(s) repeat an experiment and seed already counted: left out."
    sections = [("Final metrics", table(tables.summary, "summary"))]
    if reference is not None:
        sections.append((f"Paired differences against {reference} (runs paired by seed)",
                         table(tables.paired, "paired")))
    if tables.personal:
        sections.append(("Personalized against the global model (in the same runs)",
                         table(tables.personal, "personal")))
    pictures = _figures(tables, view, f"runs at commit {', '.join(commits)} · {made['command']} · {made['machine']}")
    md = [f"# Report\n\n{intro}\n\n## Groups\n\n{groups_md}"]
    md += [f"## {title}\n\n{markdown(cells)}" for title, cells in sections]
    md += [f"## {title}\n\n![{title}]({name})" for name, (title, _) in pictures.items()]
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>fedrlhf report</title><style>"
        "body{font-family:sans-serif;max-width:70em;margin:2em auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:.2em .6em}img{max-width:100%}</style></head><body><h1>Report</h1>"
        f"<p>{html.escape(intro)}</p>"
        + "".join(f"<h2>{html.escape(title)}</h2>{_html_table(cells)}" for title, cells in sections)
        + "".join(f"<h2>{html.escape(title)}</h2><img alt='{html.escape(title)}' "
                  f"src='data:image/png;base64,{base64.b64encode(png).decode()}'>" for title, png in pictures.values())
        + "</body></html>"
    )
    files = {
        "report.json": json.dumps(strict_json(record), indent=1).encode(),
        "report.csv": csv_buffer.getvalue().encode(),
        "report.md": ("\n\n".join(md) + "\n").encode(),
        **{name: png for name, (_, png) in pictures.items()},
        "report.html": page.encode(),
    }
    for name, data in files.items():
        atomic_write(out / name, data)
    for name in set(FIGURES) - set(pictures):
        (out / name).unlink(missing_ok=True)  # an earlier report's figure these runs cannot draw
    written = [out / name for name in files]
    if regenerated_by is None:
        written.append(write_summaries(out, runs, dict(made), reference))
    return written
