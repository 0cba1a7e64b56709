"""The README and the pages under docs/ are the user's manual: what they name must exist and be complete."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fedrlhf_ray.cli import build_parser
from fedrlhf_ray.config_reference import reference_markdown, reference_rows

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PAGES = {path: path.read_text() for path in sorted((ROOT / "docs").glob("*.md"))}
MANUAL = {ROOT / "README.md": README, **PAGES}
ALL_TEXT = "\n".join(MANUAL.values())
CONFIGURATION = (ROOT / "docs" / "configuration.md").read_text()
RESULTS = (ROOT / "docs" / "results.md").read_text()
SWEEPS = (ROOT / "docs" / "sweeps.md").read_text()

FENCE = re.compile(r"^```.*?^```", re.S | re.M)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _prose(text: str) -> str:
    """The text without fenced code blocks and inline code, where a link is only text."""
    return re.sub(r"`[^`\n]*`", "", FENCE.sub("", text))


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(text: str) -> set[str]:
    return {_anchor(h) for h in re.findall(r"^#{1,6} (.+)$", FENCE.sub("", text), re.M)}


def test_readme_is_a_front_page():
    lines = README.count("\n") + (not README.endswith("\n"))
    assert lines <= 350, f"README.md has {lines} lines; move detail to a page under docs/"


def test_every_config_field_is_documented():
    missing = [key for key, _, _ in reference_rows() if f"`{key}`" not in CONFIGURATION]
    assert missing == []


def test_config_reference_is_current():
    start = CONFIGURATION.index("<!-- config-reference")
    table = CONFIGURATION[CONFIGURATION.index("\n", start) + 1 : CONFIGURATION.index("<!-- /config-reference -->")]
    assert table.strip() == reference_markdown().strip(), "regenerate with `fedrlhf config reference`"


def test_every_named_repo_file_exists():
    pattern = r"\b((?:tune_configs|bench|envs|fedrlhf_ray|docs|tests)/[\w/]+\.(?:yaml|py|png)|cluster(?:-gcp)?\.yaml)"
    named = {(str(path.relative_to(ROOT)), p) for path, text in MANUAL.items() for p in re.findall(pattern, text)}
    assert any(page == "README.md" for page, _ in named), "the README names no project file"
    assert sorted((page, p) for page, p in named if not (ROOT / p).exists()) == []


def test_every_relative_link_points_to_a_file():
    broken = []
    for path, text in MANUAL.items():
        for target in LINK.findall(_prose(text)):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            file, _, anchor = target.partition("#")
            resolved = (path.parent / file).resolve() if file else path
            where = f"{path.relative_to(ROOT)}: ({target})"
            if not resolved.is_file():
                broken.append(f"{where}: no such file")
            elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved.read_text()):
                broken.append(f"{where}: no heading with this anchor")
    assert broken == []


def test_every_docs_page_is_in_the_index():
    index = PAGES[ROOT / "docs" / "README.md"]
    linked = {target.partition("#")[0] for target in LINK.findall(index)}
    assert sorted(p.name for p in PAGES if p.name != "README.md" and p.name not in linked) == []


def test_the_headline_results_are_those_of_the_results_page():
    """The README's results tables and their commands (each task's headline, the deviating
    server's) are copies of docs/results.md's; a table a report makes (between report markers)
    is checked against its summaries instead (tests/test_report.py)."""
    section = README[README.index("\n## Results") : README.index("\n## Documentation")]
    section = re.sub(r"<!-- report .*?<!-- /report -->", "", section, flags=re.S)
    blocks = re.findall(r"(?:^\|.*\|\n)+", section, re.M) + re.findall(r"^```bash\n.*?^```", section, re.S | re.M)
    assert len(blocks) == 5, "one command block per task and a table per hand-made result, the deviating server's"
    assert [block for block in blocks if block not in RESULTS] == []


def test_quickstart_commands_are_the_ci_commands():
    ci = (ROOT / ".ci" / "run").read_text()
    test_cmd = 'pip install torch==2.13.0 && pip install -e ".[test]" && python -m pytest'
    assert test_cmd in README and test_cmd in ci
    assert "pip install torch==2.13.0 && pip install -e . && fedrlhf run tune_configs/quickstart.yaml" in README


@pytest.mark.parametrize(
    "command", sorted(set(re.findall(r"`fedrlhf ((?:config|data) \w+|train|run|audit)\b", ALL_TEXT)))
)
def test_documented_subcommands_parse(command):
    parser = build_parser()
    words = command.split()
    extra = {"config show": ["x.yaml"], "config check": ["x.yaml"], "data info": ["--dataset", "ml-100k"],
             "train": ["x.yaml"], "run": ["x.yaml"], "audit": ["x.yaml"]}.get(command, [])
    args = parser.parse_args(words + extra)
    assert args.command == words[0]


def test_the_example_sweep_file_loads_as_written(tmp_path):
    """The annotated sweep in docs/sweeps.md is a valid sweep file, next to its base experiment."""
    import shutil

    from fedrlhf_ray.sweeps.schema import load_sweep

    (block,) = re.findall(r"```yaml\n(name: .*?)```", SWEEPS, re.S)
    shutil.copy(ROOT / "tune_configs" / "quickstart.yaml", tmp_path)
    (tmp_path / "sweep.yaml").write_text(block)
    sweep = load_sweep(tmp_path / "sweep.yaml")
    assert set(sweep.settings.search_space) == {"shaping.lambda", "ppo.lr"} and sweep.settings.scheduler is not None
