"""The README is the user's manual: what it names must exist and be complete."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fedrlhf_ray.cli import build_parser
from fedrlhf_ray.config import reference_markdown, reference_rows

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_every_config_field_is_documented():
    missing = [key for key, _, _ in reference_rows() if f"`{key}`" not in README]
    assert missing == []


def test_config_reference_is_current():
    start = README.index("<!-- config-reference")
    table = README[README.index("\n", start) + 1 : README.index("<!-- /config-reference -->")]
    assert table.strip() == reference_markdown().strip(), "regenerate with `fedrlhf config reference`"


def test_every_named_repo_file_exists():
    named = set(re.findall(r"\b((?:tune_configs|bench|envs|fedrlhf_ray|docs)/[\w/]+\.(?:yaml|py|png)|cluster(?:-gcp)?\.yaml)", README))
    assert named, "the README names no project file"
    assert sorted(p for p in named if not (ROOT / p).exists()) == []


def test_quickstart_commands_are_the_ci_commands():
    ci = (ROOT / ".ci" / "run").read_text()
    test_cmd = 'pip install torch==2.13.0 && pip install -e ".[test]" && python -m pytest'
    assert test_cmd in README and test_cmd in ci
    assert "pip install torch==2.13.0 && pip install -e . && fedrlhf run tune_configs/quickstart.yaml" in README


@pytest.mark.parametrize(
    "command", sorted(set(re.findall(r"`fedrlhf ((?:config|data) \w+|train|run|audit)\b", README)))
)
def test_documented_subcommands_parse(command):
    parser = build_parser()
    words = command.split()
    extra = {"config show": ["x.yaml"], "config check": ["x.yaml"], "data info": ["--dataset", "ml-100k"],
             "train": ["x.yaml"], "run": ["x.yaml"], "audit": ["x.yaml"]}.get(command, [])
    args = parser.parse_args(words + extra)
    assert args.command == words[0]


def test_the_example_sweep_file_loads_as_written(tmp_path):
    """The annotated sweep in "Ray Tune sweeps" is a valid sweep file, next to its base experiment."""
    import shutil

    from fedrlhf_ray.sweeps.schema import load_sweep

    (block,) = re.findall(r"```yaml\n(name: .*?)```", README, re.S)
    shutil.copy(ROOT / "tune_configs" / "quickstart.yaml", tmp_path)
    (tmp_path / "sweep.yaml").write_text(block)
    sweep = load_sweep(tmp_path / "sweep.yaml")
    assert set(sweep.settings.search_space) == {"shaping.lambda", "ppo.lr"} and sweep.settings.scheduler is not None
