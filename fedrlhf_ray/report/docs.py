"""Tables in the docs that a report makes: a marker names the report folder (relative to the
project root), the table and optionally the metrics to keep,

    <!-- report results/paper_on_par paired eval/ndcg/mean eval/spearman/mean -->
    | group | metric | … |
    <!-- /report -->

and ``fedrlhf report --from results/ --docs`` rewrites what lies between the marker and its end
from the folder's ``runs.json``; :func:`stale_tables` says where the docs differ from it."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from fedrlhf_ray.errors import UserError
from fedrlhf_ray.report.pages import KINDS, Tables, markdown, table
from fedrlhf_ray.report.runs import RUNS_FILE, read_summaries
from fedrlhf_ray.rundir import atomic_write

MARKER = re.compile(
    r"(?P<open><!-- report (?P<folder>\S+) (?P<kind>\S+)(?P<metrics>(?: \S+)*) -->\n)"
    r"(?P<body>.*?)(?P<close><!-- /report -->)",
    re.S,
)


def documents(root: Path) -> list[Path]:
    """The files whose tables a report may make: the README and the pages of ``docs/``."""
    return [p for p in [root / "README.md", *sorted((root / "docs").glob("*.md"))] if p.is_file()]


def _renderer(root: Path) -> Callable[[re.Match[str]], str]:
    cache: dict[str, Tables] = {}

    def render(match: re.Match[str]) -> str:
        folder, kind = match["folder"], match["kind"]
        if kind not in KINDS:
            raise UserError(f"report --docs: a marker names table {kind!r}; the tables are {', '.join(KINDS)}")
        if folder not in cache:
            path = root / folder
            if not (path / RUNS_FILE).is_file():
                raise UserError(f"report --docs: a marker names {folder}, which holds no {RUNS_FILE}; make it "
                                f"with fedrlhf report SOURCE… --out {folder}")
            summaries = read_summaries(path)
            cache[folder] = Tables.of(summaries.to_runs(str(path / RUNS_FILE)), summaries.reference)
        rows = cache[folder].rows(kind)
        metrics = match["metrics"].split()
        if metrics:
            rows = [r for r in rows if r["metric"] in metrics]
        return f"{match['open']}{markdown(table(rows, kind))}\n{match['close']}"

    return render


def made_tables(text: str, root: Path) -> str:
    """``text`` with every marked table made from its report folder."""
    return MARKER.sub(_renderer(root), text)


def stale_tables(root: Path) -> list[str]:
    """The documents whose marked tables differ from what their report folders make."""
    return [str(p.relative_to(root)) for p in documents(root) if made_tables(p.read_text(), root) != p.read_text()]


def rewrite_tables(root: Path) -> list[Path]:
    """Makes every marked table of the documents again; returns the documents that changed."""
    changed = []
    for path in documents(root):
        text = path.read_text()
        new = made_tables(text, root)
        if new != text:
            atomic_write(path, new.encode())
            changed.append(path)
    return changed
