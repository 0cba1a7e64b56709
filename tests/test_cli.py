"""The ``fedrlhf`` command line, run as a subprocess exactly as a user would.

No test here reaches Ray: every ``train`` call fails validation before a run starts.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fedrlhf_ray.config import load_config

REPO_ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = REPO_ROOT / "tune_configs" / "quickstart.yaml"


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.update(
        {
            "RAY_AUTH_MODE": "disabled",
            "FEDRLHF_CACHE": str(cwd / "cache"),  # never write into the user's home cache
            "COLUMNS": "200",  # rich must not wrap the statistics table
        }
    )
    return subprocess.run(
        [sys.executable, "-m", "fedrlhf_ray.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def assert_user_error(proc: subprocess.CompletedProcess) -> str:
    """Exit 2 and exactly one ``fedrlhf: error:`` line on stderr, no traceback; returns it."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, f"stderr is not one line: {proc.stderr!r}"
    line = lines[0]
    assert line.startswith("fedrlhf: error: ") and line[len("fedrlhf: error: "):].strip()
    return line


@pytest.fixture
def run_main(tmp_path, monkeypatch, capsys):
    """``main(argv)`` in this process (what ``python -m fedrlhf_ray.cli`` runs), as a CompletedProcess."""
    from fedrlhf_ray.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FEDRLHF_CACHE", str(tmp_path / "cache"))

    def run(*args: str) -> subprocess.CompletedProcess:
        code = main(list(args))
        captured = capsys.readouterr()
        return subprocess.CompletedProcess(list(args), code, captured.out, captured.err)

    return run


# ---------------------------------------------------------------------------------------------
# config show / check
# ---------------------------------------------------------------------------------------------


def test_config_show_round_trips(tmp_path):
    proc = run_cli("config", "show", str(QUICKSTART), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    shown = tmp_path / "shown.yaml"
    shown.write_text(proc.stdout)
    assert load_config(shown) == load_config(QUICKSTART)


def test_config_show_applies_set(tmp_path):
    proc = run_cli(
        "config", "show", str(QUICKSTART),
        "--set", "federation.rounds=3", "--set", "shaping.lambda={low: 0.1, high: 0.9}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    shown = tmp_path / "shown.yaml"
    shown.write_text(proc.stdout)
    cfg = load_config(shown)
    assert cfg.federation.rounds == 3
    assert cfg.client_lambdas() == pytest.approx([0.1, 0.3, 0.5, 0.7, 0.9])
    # Everything not overridden is the file's value.
    base = load_config(QUICKSTART)
    assert cfg.model_copy(update={"federation": base.federation, "shaping": base.shaping}) == base
    assert base.federation.rounds != 3  # the override really changed something


def test_config_check_ok(tmp_path):
    proc = run_cli("config", "check", str(QUICKSTART), "--set", "seed=4", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"{QUICKSTART}: OK"
    assert proc.stderr == ""


# ---------------------------------------------------------------------------------------------
# user errors: exit 2, one line, no traceback
# ---------------------------------------------------------------------------------------------


def _bad_files(tmp_path: Path) -> dict[str, Path]:
    invalid_yaml = tmp_path / "invalid.yaml"
    invalid_yaml.write_text("federation:\n  rounds: [1\n")
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("federation:\n  roundz: 3\n")
    return {"invalid": invalid_yaml, "unknown": unknown}


# Every kind of mistake once as a real process (exit status, stderr, no traceback) ...
SUBPROCESS_CASES = [
    (["config", "check", "{tmp}/missing.yaml"], "config file not found"),
    (["config", "check", "{invalid}"], "invalid YAML"),
    (["config", "show", "{unknown}"], "federation.roundz: unknown field — allowed: "),
    (["config", "check", "{quickstart}", "--set", "federation.rounds=zero"],
     "federation.rounds: got 'zero'"),
    (["config", "check", "{quickstart}", "--set", "federation.rounds"], "expected key=value"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["data", "info", "--dataset", "ml-100k", "--path", "/nonexistent"], "/nonexistent"),
]
# ... and more variants in-process through ``main(argv)``, which is what the process runs.
INPROCESS_CASES = [
    (["config", "check", "{quickstart}", "--set", "=3"], "dotted field path"),
    (["config", "check", "{quickstart}", "--set", "federation.rounds.max=3"],
     "is a value, not a section"),
    (["config", "check", "{quickstart}", "--set", "shaping.lambda=[0.1,0.2]"],
     "shaping.lambda lists 2 values but clients.num_clients is 5"),
    (["config", "check", "{quickstart}", "--set", "env.name=atari"],
     "env.name: got 'atari' — must be one of synthetic, movielens, imdb"),
    (["config", "frobnicate", "{quickstart}"], "invalid choice: 'frobnicate'"),
    ([], "required"),
    (["config", "show"], "required"),
    (["data", "info", "--dataset", "ml-100k", "--path", "/nonexistent", "--heldout-fraction", "1.5"],
     "--heldout-fraction"),
    (["train", "{quickstart}", "--client", "x"], "invalid int value: 'x'"),
]


def _fill(args: list[str], tmp_path: Path) -> list[str]:
    files = _bad_files(tmp_path)
    return [
        a.format(tmp=tmp_path, quickstart=QUICKSTART, invalid=files["invalid"], unknown=files["unknown"])
        for a in args
    ]


@pytest.mark.parametrize("args, expected", SUBPROCESS_CASES)
def test_user_errors_are_one_line(tmp_path, args, expected):
    line = assert_user_error(run_cli(*_fill(args, tmp_path), cwd=tmp_path))
    assert expected in line


@pytest.mark.parametrize("args, expected", INPROCESS_CASES)
def test_user_errors_are_one_line_in_process(tmp_path, run_main, args, expected):
    line = assert_user_error(run_main(*_fill(args, tmp_path)))
    assert expected in line


def test_unknown_dataset_lists_the_allowed_ones(tmp_path):
    line = assert_user_error(run_cli("data", "info", "--dataset", "ml-10m", cwd=tmp_path))
    assert "--dataset: got 'ml-10m'" in line
    for name in ("ml-latest-small", "ml-100k", "ml-1m", "ml-25m"):
        assert name in line


def test_missing_data_path_names_it_and_writes_no_cache(tmp_path, run_main):
    line = assert_user_error(
        run_main("data", "info", "--dataset", "ml-100k", "--path", "/nonexistent",
                 "--cache-dir", str(tmp_path / "c"))
    )
    assert "/nonexistent" in line and "ml-100k" in line
    assert not (tmp_path / "c" / "parsed").exists()


def test_train_client_out_of_range_leaves_no_run_directory(tmp_path):
    out = tmp_path / "runs"
    line = assert_user_error(
        run_cli("train", str(QUICKSTART), "--out", str(out), "--client", "5", cwd=tmp_path)
    )
    assert "--client: got 5 — must lie in [0, 4]" in line
    assert not out.exists() or not any(out.iterdir()), list(out.iterdir())


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--client", "-1"], "--client: got -1 — must lie in [0, 4]"),
        (["--set", "clients.num_clients=2", "--client", "2"], "--client: got 2 — must lie in [0, 1]"),
        (["--set", "federation.rounds=0"], "federation.rounds: got 0"),
        (["--set", "env.name=movielens", "--set", "env.data.path=/nonexistent"], "/nonexistent"),
    ],
)
def test_train_user_errors_leave_no_run_directory_in_process(tmp_path, run_main, extra, expected):
    out = tmp_path / "runs"
    line = assert_user_error(run_main("train", str(QUICKSTART), "--out", str(out), *extra))
    assert expected in line
    assert not out.exists() or not any(out.iterdir()), list(out.iterdir())


def test_train_missing_config_leaves_no_run_directory(tmp_path, run_main):
    out = tmp_path / "runs"
    line = assert_user_error(run_main("train", str(tmp_path / "nope.yaml"), "--out", str(out)))
    assert "nope.yaml: config file not found" in line
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# data info on the real ml-100k
# ---------------------------------------------------------------------------------------------


def _stat(stdout: str, name: str) -> int:
    """The integer value of row ``name`` in the statistics table (any thousands separator)."""
    for line in stdout.splitlines():
        m = re.search(rf"(?<![\w]){re.escape(name)}(?![\w])\W+([\d][\d,. _]*\d|\d)", line)
        if m:
            return int(re.sub(r"[^\d]", "", m.group(1)))
    raise AssertionError(f"no row {name!r} in:\n{stdout}")


def test_data_info_ml_100k(tmp_path, shared_data):
    proc = run_cli(
        "data", "info", "--dataset", "ml-100k", "--path", str(shared_data / "ml-100k"),
        "--cache-dir", str(tmp_path / "cache"), cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert _stat(proc.stdout, "users") == 943
    assert _stat(proc.stdout, "ratings") == 100_000
    assert _stat(proc.stdout, "items") == 1682
    # The default 0.2 temporal split of every (>= 20 ratings) user.
    train, held = _stat(proc.stdout, "train_ratings"), _stat(proc.stdout, "heldout_ratings")
    assert train + held == 100_000
    assert 19_000 <= held <= 21_000
