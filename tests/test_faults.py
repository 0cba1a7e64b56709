"""Faults: a client actor killed mid-round, a retry that fails too, a SIGKILLed CLI.

A client's round is a function of (seed, round, client, record), and a restarted client actor
restores its clients' records from the client store, so a run that lost an actor mid-round
ends exactly as an uninterrupted one. The MLP trainer's ``lr_decay`` makes each round depend on
the client's record, so a lost or stale record would show in the final weights.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fedrlhf_ray.config import validate_config
from fedrlhf_ray.experiment import run_experiment
from fedrlhf_ray.rundir import RunDir
from fedrlhf_ray.torch_trainer import mlp_trainer_factory

K, W, ROUNDS = 6, 2, 4
UNSTABLE = ("fed/", "train/seconds", "store/save_ms")  # timing and fault bookkeeping


def cfg_for(**federation):
    return validate_config({
        "seed": 5,
        "clients": {"num_clients": K},
        "federation": {"rounds": ROUNDS, "clients_per_round": 1.0, **federation},
        "ray": {"num_workers": W},
        "tracking": {"enabled": False},
    })


def run(tmp: Path, name: str, crash=None, **federation):
    factory = mlp_trainer_factory(K, seed=5, lr_decay=0.7, crash=crash)
    return run_experiment(cfg_for(**federation), run_dir=tmp / name, trainer_factory=factory)


def stable(rows):
    return [{k: v for k, v in r.items() if not k.startswith(UNSTABLE) and not k.endswith("seconds/mean")
             and not k.startswith("store/save_ms")} for r in rows]


def final_weights(result):
    with np.load(result.run_dir / "checkpoint-000004.npz", allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def reference(ray_session, tmp_path_factory):
    """The uninterrupted run."""
    return run(tmp_path_factory.mktemp("ref"), "run")


@pytest.mark.parametrize(("how", "streamed"), [("sigkill", False), ("ray_kill", False), ("sigkill", True)])
def test_actor_killed_mid_round_ends_as_uninterrupted(reference, tmp_path, how, streamed):
    crash = {"round": 2, "client": 3, "times": 1, "marker": str(tmp_path / "attempts"), "how": how}
    # A straggler deadline makes the driver stream updates host by host: the other code path.
    result = run(tmp_path, "run", crash=crash, **({"straggler_timeout_s": 600.0} if streamed else {}))
    assert (tmp_path / "attempts").read_text() == "1"  # the fault did happen, once
    rows = result.run_dir.metrics()
    by_round = {int(r["round"]): r for r in rows}
    assert by_round[2]["fed/actor_restarts"] == 1
    # Client 3's host serves clients 1, 3, 5; streamed, client 1's update had already arrived.
    assert by_round[2]["fed/retried_clients"] == (2 if streamed else 3)
    assert by_round[2]["fed/clients_aggregated"] == K
    assert all(by_round[r]["fed/actor_restarts"] == 0 for r in (1, 3, 4))
    assert stable(rows) == stable(reference.run_dir.metrics())
    assert stable(result.run_dir.client_metrics()) == stable(reference.run_dir.client_metrics())
    ref_w = reference.run_dir.load_checkpoint(ROUNDS)["global_weights"]
    got_w = result.run_dir.load_checkpoint(ROUNDS)["global_weights"]
    for k in ref_w:
        np.testing.assert_array_equal(got_w[k], ref_w[k], err_msg=k)


def test_retry_that_fails_too_aggregates_what_arrived(ray_session, tmp_path):
    crash = {"round": 2, "client": 3, "times": 2, "marker": str(tmp_path / "attempts"), "how": "sigkill"}
    result = run(tmp_path, "run", crash=crash, min_results=3)
    by_round = {int(r["round"]): r for r in result.run_dir.metrics()}
    assert by_round[2]["fed/clients_aggregated"] == 3  # host 0's clients 0, 2, 4 only
    assert by_round[2]["fed/stragglers"] == 3
    assert by_round[2]["fed/actor_restarts"] == 2 and by_round[2]["fed/retried_clients"] == 3
    assert all(by_round[r]["fed/actor_restarts"] == 0 for r in (1, 3, 4))
    assert result.status == "completed" and by_round[4]["fed/clients_aggregated"] == K


def test_retry_that_fails_with_too_few_results_fails_the_run_resumably(ray_session, tmp_path):
    from fedrlhf_ray.driver import RoundFailed

    crash = {"round": 2, "client": 3, "times": 2, "marker": str(tmp_path / "attempts"), "how": "sigkill"}
    with pytest.raises(RoundFailed, match="fewer than federation.min_results"):
        run(tmp_path, "run", crash=crash, min_results=4)
    rd = RunDir(tmp_path / "run")
    assert rd.status() == "failed" and rd.checkpoint_rounds() == [1]
    # The resume retries round 2 (the fault is spent) and ends as the uninterrupted run would.
    factory = mlp_trainer_factory(K, seed=5, lr_decay=0.7)
    result = run_experiment(cfg_for(min_results=4), run_dir=rd.path, resume=True, trainer_factory=factory)
    assert result.status == "completed" and rd.checkpoint_rounds() == [4, 3]


# -- the CLI, SIGKILLed ---------------------------------------------------------------------------
TINY_RUN = {
    "name": "sigkill", "seed": 1,
    "env": {"name": "synthetic", "synthetic": {"n_items": 60, "items_per_user": 20}},
    "clients": {"num_clients": 2, "formation": "group", "users_per_client": 2},
    "feedback": {"budget_per_round": 20},
    "ppo": {"train_batch_size": 200, "minibatch_size": 100, "num_epochs": 1, "local_iterations": 1, "num_envs": 2},
    "federation": {"rounds": 3},
    "evaluation": {"episodes_per_user": 1},
    "ray": {"num_workers": 1, "num_cpus": 1, "object_store_mb": 128},
}


def _alive(record: dict) -> list[int]:
    import psutil

    alive = []
    for entry in record["processes"]:
        try:
            if abs(psutil.Process(entry["pid"]).create_time() - entry["started"]) < 1e-3:
                alive.append(entry["pid"])
        except psutil.Error:
            pass
    return alive


@pytest.mark.slow
def test_sigkilled_cli_leaves_no_ray_process_after_resume_and_its_mlflow_run_finishes(tmp_path):
    import yaml
    from mlflow.tracking import MlflowClient

    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY_RUN))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    cmd = [sys.executable, "-m", "fedrlhf_ray.cli", "run", str(config), "--out", str(tmp_path / "runs"),
           "--tracking-uri", uri]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        # SIGKILL once round 1 is checkpointed (the file appears only after the checkpoint is committed).
        deadline = time.monotonic() + 300
        while not list((tmp_path / "runs").glob("sigkill-*/checkpoint-000001.npz")):
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "round 1 never finished"
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    run_dir = next((tmp_path / "runs").glob("sigkill-*"))
    killed_ray = json.loads((run_dir / "ray_processes.json").read_text())
    assert _alive(killed_ray), "the killed run's Ray should have left processes behind"
    run_id = json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]
    assert MlflowClient(uri).get_run(run_id).info.status == "RUNNING"  # nobody closed it
    resumed = subprocess.run(
        [sys.executable, "-m", "fedrlhf_ray.cli", "run", "--resume", str(run_dir)],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((run_dir / "status.json").read_text())["state"] == "completed"
    run = MlflowClient(uri).get_run(run_id)
    assert run.info.status == "FINISHED"
    assert sorted(m.step for m in MlflowClient(uri).get_metric_history(run_id, "fed/round")) == [0, 1, 2, 3]
    # Neither the killed run's local Ray nor the resume's is left running.
    assert _alive(killed_ray) == []
    assert _alive(json.loads((run_dir / "ray_processes.json").read_text())) == []
