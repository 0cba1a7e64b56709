"""MLflow tracking: what a run logs, in how many requests, and how it ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedrlhf_ray.config import load_config
from fedrlhf_ray.rundir import CLIENT_METRICS, METRICS, MLFLOW_RUN
from fedrlhf_ray.tasks import task_for
from fedrlhf_ray.tracking import (
    MAX_METRICS_PER_BATCH,
    ROUND_METRIC,
    RunTracker,
    config_params,
    flatten,
    plot_learning_curves,
    resolve_tracking_uri,
    round_metrics,
    start_run,
)

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "tune_configs" / "quickstart.yaml"


def test_params_are_the_flattened_resolved_config():
    cfg = load_config(QUICKSTART, ["shaping.lambda=[0.5, 1.0, 1.5, 2.0, 2.5]"])
    params = config_params(cfg)
    assert params["ppo.lr"] == "0.001" and params["federation.strategy"] == "fedavg"
    assert params["shaping.lambda"] == "[0.5, 1.0, 1.5, 2.0, 2.5]"
    assert params["env.synthetic.n_items"] == "300"
    assert set(params) == set(flatten(cfg.to_dict()))
    assert flatten({"a": {"b": {"c": 1}, "d": None}}) == {"a.b.c": 1, "a.d": None}


def test_round_metrics_namespaces_clients():
    metrics = {"round": 3.0, "eval/liked_hit_rate/mean": 0.5, "fed/round_seconds": 2.0}
    rows = [
        {"round": 3, "client": 7, "kind": "eval", "eval/liked_hit_rate": 0.25},
        {"round": 3, "client": 12, "kind": "train", "train/env_steps": 1000, "reward_model/loss": 0.3},
    ]
    out = round_metrics(metrics, rows, per_client=True)
    assert out == {
        "eval/liked_hit_rate/mean": 0.5, "fed/round_seconds": 2.0, ROUND_METRIC: 3.0,
        "client/007/eval/liked_hit_rate": 0.25, "client/012/train/env_steps": 1000.0,
        "client/012/reward_model/loss": 0.3,
    }
    assert round_metrics(metrics, rows, per_client=False) == {
        "eval/liked_hit_rate/mean": 0.5, "fed/round_seconds": 2.0, ROUND_METRIC: 3.0,
    }


def test_tracking_uri_precedence(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config(QUICKSTART)
    assert resolve_tracking_uri(cfg) == f"sqlite:///{tmp_path / 'mlflow.db'}"  # absolute: actors may chdir
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert resolve_tracking_uri(cfg) == "http://env:5000"
    cfg = load_config(QUICKSTART, ["tracking.tracking_uri=http://config:5000"])
    assert resolve_tracking_uri(cfg) == "http://config:5000"
    assert resolve_tracking_uri(cfg, "http://flag:5000") == "http://flag:5000"


class _CountingClient:
    def __init__(self):
        self.calls: list[int] = []

    def log_batch(self, run_id, metrics=(), params=(), tags=(), synchronous=True):
        self.calls.append(len(metrics))


def test_a_round_is_logged_in_batches_not_per_metric(monkeypatch):
    """K=300 clients × 4 metrics + aggregates = 1 205 metrics → 2 requests, none over the limit."""
    tracker = RunTracker("http://unused", "run")
    counting = _CountingClient()
    monkeypatch.setattr(RunTracker, "client", lambda self: counting)
    rows = [{"round": 1, "client": c, "kind": "eval", **{f"eval/m{i}": 0.1 for i in range(4)}} for c in range(300)]
    tracker.log_round(1, {"round": 1.0, **{f"fed/x{i}": 1.0 for i in range(4)}}, rows)
    assert counting.calls == [MAX_METRICS_PER_BATCH, 205]


def test_local_store_round_trip_backfill_and_plot(tmp_path):
    """Default SQLite store: artifacts beside it; a resume logs only the rounds MLflow lacks."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(QUICKSTART, ["tracking.experiment=unit"])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    tracker = start_run(cfg, run_dir, uri)
    rows = [{"round": r, "eval/liked_hit_rate/mean": 0.3 + 0.1 * r, "eval/liked_hit_rate/worst_decile": 0.2,
             "fed/round_seconds": 1.0} for r in range(3)]
    clients = [{"round": r, "client": 0, "kind": "eval", "eval/liked_hit_rate": 0.5} for r in range(3)]
    (run_dir / METRICS).write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run_dir / CLIENT_METRICS).write_text("".join(json.dumps(r) + "\n" for r in clients))
    tracker.log_round(0, rows[0], clients[:1])  # the process died after round 0's batch
    assert tracker.backfill(run_dir) == 2
    assert tracker.backfill(run_dir) == 0
    client = MlflowClient(uri)
    history = client.get_metric_history(tracker.run_id, "eval/liked_hit_rate/mean")
    assert sorted((m.step, round(m.value, 6)) for m in history) == [(0, 0.3), (1, 0.4), (2, 0.5)]
    png = plot_learning_curves(run_dir, run_dir / "curves.png", "unit", task_for(cfg.env.name).curve_panels)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    tracker.log_artifacts(run_dir, ["curves.png"])
    tracker.finish("FINISHED")
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.artifact_uri.startswith((tmp_path / "mlartifacts").as_uri())
    assert (tmp_path / "mlartifacts" / "unit" / tracker.run_id / "artifacts" / "curves.png").is_file()


def _fedrlhf(*args: str, cwd: Path, **kw):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.Popen([sys.executable, "-m", "fedrlhf_ray.cli", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_unreachable_tracking_server_is_one_line_and_leaves_nothing(tmp_path):
    from tests.conftest import free_port

    uri = f"http://127.0.0.1:{free_port()}"
    proc = _fedrlhf("run", str(QUICKSTART), "--tracking-uri", uri, "--out", str(tmp_path / "runs"), cwd=tmp_path)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    # The URI may come from the flag, the config or $MLFLOW_TRACKING_URI: the line names the URI.
    assert err.startswith(f"fedrlhf: error: tracking URI {uri}: ") and err.count("\n") == 1
    assert "no MLflow server answers" in err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


@pytest.mark.slow
def test_sigterm_marks_the_mlflow_run_killed(tmp_path, mlflow_server):
    """SIGTERM mid-run (after round 1 reached MLflow): KILLED, never left RUNNING; resumable."""
    from mlflow.tracking import MlflowClient

    out = tmp_path / "runs"
    proc = _fedrlhf(
        "run", str(QUICKSTART), "--set", "clients.num_clients=2", "--set", "ray.num_workers=1",
        "--set", "federation.rounds=50", "--set", "evaluation.episodes_per_user=1",
        "--tracking-uri", mlflow_server, "--out", str(out), cwd=tmp_path,
    )
    client = MlflowClient(mlflow_server)
    try:
        deadline = time.monotonic() + 240
        run_id = None
        while time.monotonic() < deadline and proc.poll() is None:
            files = list(out.glob(f"*/{MLFLOW_RUN}"))
            if files:
                run_id = json.loads(files[0].read_text())["run_id"]
                if client.get_metric_history(run_id, "fed/round_seconds"):
                    break
            time.sleep(0.5)
        assert proc.poll() is None and run_id, "the run never logged a round"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()  # whatever failed above, no 50-round run outlives the test
    assert proc.returncode == 143, err[-2000:]
    assert "resume with: fedrlhf run --resume" in err
    assert client.get_run(run_id).info.status == "KILLED"
    (run_dir,) = out.iterdir()
    assert json.loads((run_dir / "status.json").read_text())["state"] == "interrupted"
    assert "metrics.jsonl" in {a.path for a in client.list_artifacts(run_id)}


def test_cluster_tracking_uri(monkeypatch):
    """On a joined or multi-node cluster: SQLite is refused, a loopback server gets this node's
    address and must answer there; a local one-node Ray keeps the URI."""
    import ray

    from fedrlhf_ray import tracking
    from fedrlhf_ray.errors import UserError
    from fedrlhf_ray.tracking import cluster_tracking_uri

    answering = {"http://10.0.0.7:5000"}

    def check(uri):
        if uri not in answering:
            raise UserError(f"--tracking-uri {uri}: no MLflow server answers")

    monkeypatch.setattr(tracking, "check_tracking_uri", check)
    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda: "10.0.0.7")
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True}])
    # a laptop's own Ray: as given
    assert cluster_tracking_uri("sqlite:////tmp/mlflow.db", joined=False) == "sqlite:////tmp/mlflow.db"
    assert cluster_tracking_uri("http://127.0.0.1:5000", joined=False) == "http://127.0.0.1:5000"
    # a joined cluster, even while it has only its head (the autoscaler adds workers later)
    assert cluster_tracking_uri("http://127.0.0.1:5000", joined=True) == "http://10.0.0.7:5000"
    assert cluster_tracking_uri("http://mlflow.internal:5000", joined=True) == "http://mlflow.internal:5000"
    with pytest.raises(UserError, match="SQLite store is local to this node"):
        cluster_tracking_uri("sqlite:////tmp/mlflow.db", joined=True)
    with pytest.raises(UserError, match=r"reach it as http://10.0.0.7:5001.*--host 0.0.0.0"):
        cluster_tracking_uri("http://localhost:5001", joined=True)
    # several nodes of a local Ray
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True}, {"Alive": True}])
    with pytest.raises(UserError, match="SQLite store is local to this node"):
        cluster_tracking_uri("sqlite:////tmp/mlflow.db", joined=False)


@pytest.mark.parametrize(
    ("env", "dataset"),
    [({"name": "synthetic"}, "synthetic"), ({"name": "movielens", "data": {"dataset": "ml-100k"}}, "ml-100k"),
     ({"name": "imdb"}, "imdb")],
)
def test_run_tags_are_the_tasks(env, dataset):
    from fedrlhf_ray.config import validate_config
    from fedrlhf_ray.tracking import run_tags

    tags = run_tags(validate_config({"env": env}))
    assert tags["fedrlhf.env"] == env["name"] and tags["fedrlhf.dataset"] == dataset
