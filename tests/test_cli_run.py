"""`fedrlhf run` end to end in a subprocess: a run, its resume, and the refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "tune_configs" / "quickstart.yaml"
SMALL = [
    "--set", "clients.num_clients=2",
    "--set", "ppo.train_batch_size=400",
    "--set", "ppo.minibatch_size=200",
    "--set", "ppo.local_iterations=1",
    "--set", "ray.num_workers=1",
    "--set", "evaluation.episodes_per_user=1",
]


def fedrlhf(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(
        [sys.executable, "-m", "fedrlhf_ray.cli", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
    )


def rounds_logged(run_dir: Path) -> list[int]:
    return [json.loads(x)["round"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_run_then_resume_with_more_rounds(tmp_path, mlflow_server):
    """One MLflow run on a real tracking server, continued by the resume."""
    out = tmp_path / "runs"
    first = fedrlhf("run", str(QUICKSTART), *SMALL, "--set", "federation.rounds=1", "--out", str(out),
                    "--tracking-uri", mlflow_server, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    (run_dir,) = list(out.iterdir())
    assert json.loads((run_dir / "status.json").read_text())["state"] == "completed"
    assert rounds_logged(run_dir) == [0, 1]
    # The driver's checkpoint (round, global weights, strategy state) and, apart from it, the
    # client actors' store of each client's record.
    assert sorted(p.name for p in run_dir.glob("checkpoint*")) == ["checkpoint-000001.npz"]
    assert sorted(p.name for p in (run_dir / "clients").iterdir()) == ["client-000000", "client-000001"]
    assert [p.name for p in (run_dir / "clients" / "client-000000").iterdir()] == ["round-000001.npz"]
    assert "closed" in first.stdout and "liked-hit rate" in first.stdout

    refused = fedrlhf("run", "--resume", str(run_dir), "--set", "seed=5", cwd=tmp_path)
    assert refused.returncode == 2
    assert refused.stderr.strip().count("\n") == 0 and "only federation.rounds" in refused.stderr

    resumed = fedrlhf("run", "--resume", str(run_dir), "--set", "federation.rounds=2", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert rounds_logged(run_dir) == [0, 1, 2]
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["federation"]["rounds"] == 2
    assert sorted(p.name for p in run_dir.glob("checkpoint*")) == ["checkpoint-000001.npz", "checkpoint-000002.npz"]
    summary = json.loads((run_dir / "summary.json").read_text())
    last_row = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert summary["rounds"] == 2 and last_row["round"] == 2
    assert summary["final"] == {k: v for k, v in last_row.items() if k.startswith("eval/")}
    assert len(list(out.iterdir())) == 1  # resuming never creates a second run directory
    assert not (tmp_path / "mlflow.db").exists()  # everything went to the server

    from mlflow.tracking import MlflowClient

    from fedrlhf_ray.config import load_config
    from fedrlhf_ray.tracking import config_params

    client = MlflowClient(mlflow_server)
    run_id = json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    exp_runs = client.search_runs([run.info.experiment_id], f"tags.`fedrlhf.run_dir` = '{run_dir.resolve()}'")
    assert [r.info.run_id for r in exp_runs] == [run_id]  # the resume continued the same run
    assert run.data.params == config_params(load_config(run_dir / "config.yaml")) | {"federation.rounds": "1"}
    assert run.data.tags["fedrlhf.strategy"] == "fedavg" and run.data.tags["fedrlhf.baseline"] == "federated"
    assert run.data.tags["fedrlhf.env"] == "synthetic" and "fedrlhf.dataset" in run.data.tags
    assert run.data.tags["fedrlhf.rounds"] == "2"
    if (ROOT / ".git").exists():  # a checkout (CI's clone included), not an installed wheel
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
        assert run.data.tags["mlflow.source.git.commit"] == head.strip()
    # step = round; each round logged once although the run was tracked by two processes
    history = client.get_metric_history(run_id, "fed/round_seconds")
    assert sorted(m.step for m in history) == [1, 2]
    assert sorted(m.step for m in client.get_metric_history(run_id, "eval/liked_hit_rate/mean")) == [0, 1, 2]
    assert [m.value for m in sorted(client.get_metric_history(run_id, "eval/liked_hit_rate/mean"), key=lambda m: m.step)] == [
        row["eval/liked_hit_rate/mean"] for row in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    ]
    for c in ("000", "001"):
        assert sorted(m.step for m in client.get_metric_history(run_id, f"client/{c}/eval/liked_hit_rate")) == [0, 1, 2]
        assert sorted(m.step for m in client.get_metric_history(run_id, f"client/{c}/reward_model/heldout_pair_accuracy")) == [1, 2]
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.yaml", "metrics.jsonl", "client_metrics.jsonl", "learning_curves.png", "summary.json", "model"} <= artifacts
    assert [a.path for a in client.list_artifacts(run_id, "model")] == ["model/global_weights.npz"]
    weights = client.download_artifacts(run_id, "model/global_weights.npz", str(tmp_path))
    import numpy as np

    with np.load(weights) as saved:
        assert len(saved.files) > 4 and all(np.isfinite(saved[k]).all() for k in saved.files)


def test_run_with_missing_data_leaves_nothing(tmp_path):
    out = tmp_path / "runs"
    proc = fedrlhf(
        "run", str(QUICKSTART), "--set", "env.name=movielens",
        "--set", f"env.data.path={tmp_path / 'nowhere'}", "--out", str(out), cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("fedrlhf: error:") and "Traceback" not in proc.stderr
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.slow
def test_train_one_client_writes_a_full_run_directory(tmp_path):
    """`fedrlhf train` is the same lifecycle with one client actor serving one client: a run
    directory like `fedrlhf run`'s, with that client's rows and record only."""
    out = tmp_path / "runs"
    proc = fedrlhf("train", str(QUICKSTART), *SMALL, "--set", "federation.rounds=1", "--set", "tracking.enabled=false",
                   "--client", "1", "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "single-client RLHF" in proc.stdout and "liked-hit rate" in proc.stdout
    (run_dir,) = list(out.iterdir())
    assert json.loads((run_dir / "status.json").read_text())["state"] == "completed"
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["federation"]["baseline"] == "federated"
    assert rounds_logged(run_dir) == [0, 1]
    assert sorted(p.name for p in run_dir.glob("checkpoint*")) == ["checkpoint-000001.npz"]
    assert [p.name for p in (run_dir / "clients").iterdir()] == ["client-000001"]
    client_rows = [json.loads(x) for x in (run_dir / "client_metrics.jsonl").read_text().splitlines()]
    assert {r["client"] for r in client_rows} == {1}
    assert sorted((r["round"], r["kind"]) for r in client_rows) == [(0, "eval"), (1, "eval"), (1, "train")]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds"] == 1
    for part in ("initial", "final"):
        # the random policy's hit rate is one of the evaluation's metrics
        assert {"eval/liked_hit_rate/mean", "eval/random_hit_rate/mean", "eval/oracle_hit_rate/mean"} <= set(summary[part])
    assert isinstance(summary["gap_closed"], float)
    assert not (run_dir / "mlflow_run.json").exists() and not (tmp_path / "mlflow.db").exists()
