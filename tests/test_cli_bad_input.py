"""Ordinary mistakes at the command line: one line naming the problem and what to do, exit
status 2, no traceback, nothing left behind, no MLflow run left RUNNING, a finished run untouched.

Each kind of the checked corpus has tests of its own here (config contents are covered field by
field in test_config_bad_input.py; data files cut short in test_movielens_loaders.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = REPO_ROOT / "tune_configs" / "quickstart.yaml"


def cli(*args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "FEDRLHF_CACHE": str(cwd / "cache"), "COLUMNS": "200"}
    env.pop("RAY_ADDRESS", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([sys.executable, "-m", "fedrlhf_ray.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr + proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("fedrlhf: error: ")]
    assert len(errors) == 1, proc.stderr
    others = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith("fedrlhf: ")]
    assert not others, proc.stderr
    return errors[0]


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@contextlib.contextmanager
def tmpfs(path: Path, size: str, read_only: bool = False):
    """A tiny filesystem at ``path`` (needs mount privileges; the test skips without them)."""
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


# -- config files that are not what they should be, through the CLI -----------------------------
@pytest.mark.parametrize(("content", "expected"), [
    (b"\x89PNG\r\n\x1a\n\x00\x00", "binary data"),
    ("name: caf\xe9\n".encode("latin-1"), "not UTF-8"),
    (b"", "holds no settings"),
    (b"federation:\n  rounds: 2\n  rounds: 3\n", "duplicate key 'rounds'"),
    (b"ppo:\n  lr: .nan\n", "finite"),
    (b"federation:\n  rounds: true\n", "not true/false"),
])
def test_config_file_mistakes(tmp_path, content, expected):
    config = tmp_path / "bad.yaml"
    config.write_bytes(content)
    line = one_line_error(cli("run", str(config), "--out", str(tmp_path / "runs"), cwd=tmp_path))
    assert expected in line and str(config) in line
    assert not (tmp_path / "runs").exists()


def test_impossible_with_the_data(tmp_path):
    line = one_line_error(cli("run", str(QUICKSTART), "--set", "env.synthetic.n_items=30", "--out",
                              str(tmp_path / "runs"), cwd=tmp_path))
    assert "env.synthetic.items_per_user" in line
    assert not (tmp_path / "runs").exists()


def test_object_store_larger_than_memory_fails_before_ray_starts(tmp_path):
    start = time.monotonic()
    line = one_line_error(cli("run", str(QUICKSTART), "--set", "ray.object_store_mb=100000000", "--out",
                              str(tmp_path / "runs"), cwd=tmp_path))
    assert "ray.object_store_mb" in line and "memory" in line
    assert time.monotonic() - start < 30
    assert not (tmp_path / "runs").exists()


@pytest.fixture
def run_main(tmp_path, monkeypatch, capsys, ray_session):
    """``main(argv)`` in this process, on the session's 2-CPU Ray."""
    from fedrlhf_ray.cli import main

    monkeypatch.chdir(tmp_path)

    def run(*args: str) -> subprocess.CompletedProcess:
        code = main(list(args))
        captured = capsys.readouterr()
        return subprocess.CompletedProcess(list(args), code, captured.out, captured.err)

    return run


@pytest.mark.parametrize(("overrides", "expected"), [
    (["ray.num_workers=3", "ray.num_cpus=null"], "3 client actors × 1 CPUs need 3, the Ray cluster has 2"),
    (["ray.cpus_per_worker=3", "ray.num_cpus=null"], "the Ray cluster has 2 CPUs in all"),
])
def test_more_than_the_cluster_has_fails_in_seconds(run_main, tmp_path, overrides, expected):
    args = ["run", str(QUICKSTART), "--out", str(tmp_path / "runs"), "--tracking-uri", f"sqlite:///{tmp_path}/m.db"]
    for o in overrides:
        args += ["--set", o]
    start = time.monotonic()
    line = one_line_error(run_main(*args))
    assert expected in line
    assert time.monotonic() - start < 30
    assert not (tmp_path / "runs").exists()


# -- output locations ---------------------------------------------------------------------------
def test_out_is_a_file(tmp_path):
    (tmp_path / "afile").write_text("x")
    line = one_line_error(cli("run", str(QUICKSTART), "--out", str(tmp_path / "afile"), cwd=tmp_path))
    assert "is a file" in line
    line = one_line_error(cli("run", str(QUICKSTART), "--out", str(tmp_path / "afile" / "sub"), cwd=tmp_path))
    assert "lies under the file" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_client_state_dir_is_a_file(tmp_path):
    (tmp_path / "afile").write_text("x")
    line = one_line_error(cli("run", str(QUICKSTART), "--set", f"federation.client_state_dir={tmp_path / 'afile'}",
                              "--out", str(tmp_path / "runs"), cwd=tmp_path))
    assert "federation.client_state_dir" in line and "is a file" in line
    assert not (tmp_path / "runs").exists()


def test_config_and_resume_together(tmp_path):
    line = one_line_error(cli("run", str(QUICKSTART), "--resume", str(tmp_path), cwd=tmp_path))
    assert "not both" in line


def test_out_read_only(tmp_path):
    with tmpfs(tmp_path / "ro", "1m", read_only=True) as ro:
        line = one_line_error(cli("run", str(QUICKSTART), "--out", str(ro / "runs"), cwd=tmp_path))
        assert "read-only" in line


@pytest.mark.slow
def test_out_full_leaves_no_partial_file_and_no_running_mlflow_run(tmp_path):
    from mlflow.tracking import MlflowClient

    db = tmp_path / "mlflow.db"
    with tmpfs(tmp_path / "full", "256k") as full:
        line = one_line_error(cli(
            "run", str(QUICKSTART), "--out", str(full), "--tracking-uri", f"sqlite:///{db}",
            "--set", "ray.object_store_mb=128", cwd=tmp_path, timeout=600,
        ))
        assert "No space left on device" in line and "could not write" in line
        leftovers = [p for p in full.rglob("*")]
        assert leftovers == [], leftovers
    client = MlflowClient(f"sqlite:///{db}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert all(r.info.status != "RUNNING" for r in runs)


# -- tracking -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("uri", "expected"), [
    ("ftp://host/x", "not an MLflow tracking store"),
    ("sqlite:///{tmp}/missing/folder/m.db", "does not exist"),
    ("sqlite:///{tmp}", "it is not a file"),
    ("sqlite:///{tmp}/notes.txt", "not a SQLite database"),
])
def test_tracking_uri_mistakes(tmp_path, uri, expected):
    (tmp_path / "notes.txt").write_text("hello, not a database\n")
    uri = uri.format(tmp=tmp_path)
    line = one_line_error(cli("run", str(QUICKSTART), "--tracking-uri", uri, "--out", str(tmp_path / "runs"),
                              cwd=tmp_path))
    assert expected in line
    assert not (tmp_path / "runs").exists()


def _crafted_run_dir(tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = yaml.safe_load(QUICKSTART.read_text())
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
    (run_dir / "checkpoint-000001.npz").write_bytes(b"not really")
    (run_dir / "status.json").write_text(json.dumps({"state": "interrupted"}))
    return run_dir


def test_corrupt_mlflow_run_json_on_resume(tmp_path):
    run_dir = _crafted_run_dir(tmp_path)
    (run_dir / "mlflow_run.json").write_text('{"tracking_uri": "sqlite:///x.db", "run_')
    before = digest(run_dir)
    line = one_line_error(cli("run", "--resume", str(run_dir), cwd=tmp_path))
    assert "mlflow_run.json: damaged" in line
    assert digest(run_dir) == before


# -- Ray addresses ------------------------------------------------------------------------------
@pytest.mark.parametrize(("address", "expected"), [
    ("nonsense", "expected HOST:PORT"),
    ("host:port", "expected HOST:PORT"),
    ("127.0.0.1:1", "no Ray cluster reachable"),
    ("ray://127.0.0.1:10001", "Ray Client addresses are not supported"),
])
def test_bad_address_is_one_line_within_30s(tmp_path, address, expected):
    start = time.monotonic()
    line = one_line_error(cli("run", str(QUICKSTART), "--address", address, "--out", str(tmp_path / "runs"),
                              cwd=tmp_path, timeout=60))
    assert expected in line
    assert time.monotonic() - start < 30
    assert not (tmp_path / "runs").exists()


def test_address_where_something_else_listens(tmp_path):
    import http.server
    import threading

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        start = time.monotonic()
        line = one_line_error(cli("run", str(QUICKSTART), "--address", f"127.0.0.1:{server.server_port}",
                                  "--out", str(tmp_path / "runs"), cwd=tmp_path, timeout=60))
        assert "not a Ray cluster's GCS" in line
        assert time.monotonic() - start < 30
    finally:
        server.shutdown()
        server.server_close()


# -- fedrlhf ui -----------------------------------------------------------------------------------
@pytest.fixture
def store(tmp_path) -> Path:
    db = tmp_path / "mlflow.db"
    sqlite3.connect(db).execute("create table t (x)").connection.commit()
    return db


def test_ui_port_taken(tmp_path, store):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = one_line_error(cli("ui", "--tracking-uri", f"sqlite:///{store}", "--port", str(port), cwd=tmp_path))
    assert f"--port {port}" in line and "choose another --port" in line


@pytest.mark.parametrize("port", ["0", "70000", "abc", "-1"])
def test_ui_port_invalid(tmp_path, store, port):
    line = one_line_error(cli("ui", "--tracking-uri", f"sqlite:///{store}", "--port", port, cwd=tmp_path))
    assert "port" in line


def test_ui_host_invalid(tmp_path, store):
    line = one_line_error(cli("ui", "--tracking-uri", f"sqlite:///{store}", "--host", "no.such.host.invalid",
                              cwd=tmp_path))
    assert "--host" in line


# -- a finished run stays untouched -------------------------------------------------------------
def test_failed_resume_leaves_a_completed_run_as_it_was(ray_session, tmp_path):
    from mlflow.tracking import MlflowClient

    from fedrlhf_ray.config import validate_config
    from fedrlhf_ray.driver import RoundFailed
    from fedrlhf_ray.experiment import run_experiment
    from fedrlhf_ray.torch_trainer import mlp_trainer_factory

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    raw = {"seed": 1, "clients": {"num_clients": 4}, "federation": {"rounds": 2, "min_results": 4},
           "ray": {"num_workers": 2}}
    done = run_experiment(validate_config(raw), run_dir=tmp_path / "run", tracking_uri=uri,
                          trainer_factory=mlp_trainer_factory(4, seed=1))
    assert done.status == "completed"
    before = digest(done.run_dir.path)
    # Extend it, but round 3 loses client 1's actor twice: too few results, the resume fails.
    crash = {"round": 3, "client": 1, "times": 2, "marker": str(tmp_path / "n")}
    more = validate_config({**raw, "federation": {**raw["federation"], "rounds": 3}})
    with pytest.raises(RoundFailed):
        run_experiment(more, run_dir=done.run_dir.path, resume=True, tracking_uri=uri,
                       trainer_factory=mlp_trainer_factory(4, seed=1, crash=crash))
    after = digest(done.run_dir.path)
    for name in ("status.json", "config.yaml", "summary.json", "metrics.jsonl", "checkpoint-000002.npz"):
        assert after[name] == before[name], name
    assert MlflowClient(uri).get_run(done.tracker.run_id).info.status == "FINISHED"


# -- sweeps ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_sweep_whose_metric_no_trial_reports(tmp_path):
    from mlflow.tracking import MlflowClient

    from conftest import write_sweep

    sweep = write_sweep(tmp_path / "s.yaml", metric="eval/no_such_metric/mean", num_samples=1,
                        search_space={"shaping.lambda": {"grid": [1.0]}}, scheduler=None,
                        overrides={"clients.num_clients": 2, "ray.num_workers": 1, "ppo.train_batch_size": 400,
                                   "ppo.minibatch_size": 200, "ppo.local_iterations": 1,
                                   "evaluation.episodes_per_user": 1, "federation.rounds": 1})
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = cli("tune", str(sweep), "--tracking-uri", uri, "--out", str(tmp_path / "sweeps"), cwd=tmp_path, timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("fedrlhf: error: ")]
    assert len(errors) == 1 and "no trial reported eval/no_such_metric/mean" in errors[0]
    assert "resume with" not in proc.stderr + proc.stdout
    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert runs and all(r.info.status == "FAILED" for r in runs)
