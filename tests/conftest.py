"""Shared pytest fixtures."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def client_process_settings() -> None:
    """Tests that build a trainer in their own process set it up as a client actor does."""
    from fedrlhf_ray.process_setup import install_process

    install_process()


def shared_data_dir() -> Path:
    """Real test datasets: ``$FEDRLHF_TEST_DATA``, else ``<repo root>/../shared/data``."""
    env = os.environ.get("FEDRLHF_TEST_DATA", "").strip()
    return Path(env).expanduser() if env else REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path of the shared real-data folder.

    Skips the test when the folder is missing, or fails it when ``FEDRLHF_REQUIRE_DATA=1``.
    """
    path = shared_data_dir()
    if not path.is_dir():
        reason = (
            f"shared test data folder not found at {path} "
            "(set FEDRLHF_TEST_DATA to the folder holding ml-latest-small/, ml-100k/ and imdb/)"
        )
        if os.environ.get("FEDRLHF_REQUIRE_DATA", "").strip() == "1":
            pytest.fail(reason + " and FEDRLHF_REQUIRE_DATA=1")
        pytest.skip(reason)
    return path


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session: 2 CPUs, a small object store, no dashboard."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    ray.init(
        num_cpus=2,
        object_store_memory=200 * 1024 * 1024,
        include_dashboard=False,
        log_to_driver=False,
        logging_level="ERROR",
    )
    yield ray
    ray.shutdown()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_mlflow(uri: str, proc, log: Path) -> None:
    """Until the MLflow process ``proc`` answers ``/health`` (it fails the test if it dies)."""
    import time
    import urllib.request

    deadline = time.monotonic() + 180
    while True:
        try:
            with urllib.request.urlopen(uri + "/health", timeout=5) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"MLflow did not start at {uri}: {log.read_text()[-2000:]}")
        time.sleep(0.5)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real ``mlflow server`` on loopback (SQLite store, one worker) for the whole session.

    Yields its URI; it takes ~25 s to answer ``/health``, hence once per session."""
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    log = (root / "server.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        cwd=root, stdout=log, stderr=subprocess.STDOUT,
    )
    uri = f"http://127.0.0.1:{port}"
    wait_for_mlflow(uri, proc, root / "server.log")
    yield uri
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture(scope="session")
def quickstart_runs(tmp_path_factory, ray_session):
    """``run(*overrides)``: the quickstart (``tune_configs/quickstart.yaml``, tracking off,
    evaluated at round 0 and after the last round) with ``overrides``, run once per session and
    shared by the tests that check what it learns."""
    import functools

    from fedrlhf_ray.config import load_config
    from fedrlhf_ray.experiment import run_experiment

    root = tmp_path_factory.mktemp("quickstart")

    @functools.cache
    def run(*overrides: str):
        sets = ["evaluation.every_n_rounds=100", "tracking.enabled=false", *overrides]
        cfg = load_config(REPO_ROOT / "tune_configs" / "quickstart.yaml", sets)
        return run_experiment(cfg, run_dir=root / f"run-{run.cache_info().currsize}")

    return run


TINY_OVERRIDES = {
    "clients.num_clients": 2,
    "ray.num_workers": 1,
    "ppo.train_batch_size": 400,
    "ppo.minibatch_size": 200,
    "ppo.local_iterations": 1,
    "evaluation.episodes_per_user": 1,
}


def write_sweep(path: Path, **fields) -> Path:
    """A small sweep over the quickstart experiment (the base path is made absolute)."""
    import yaml

    sweep = {
        "name": "tiny",
        "experiment": str(REPO_ROOT / "tune_configs" / "quickstart.yaml"),
        "overrides": {**TINY_OVERRIDES, "federation.rounds": 3},
        "search_space": {"shaping.lambda": {"grid": [0.0, 2.0]}, "ppo.lr": {"choice": [0.001, 0.002]}},
        "metric": "eval/liked_hit_rate/mean",
        "mode": "max",
        "num_samples": 2,
        "max_concurrent": 2,
        "scheduler": {"type": "asha", "grace_period": 1},
    }
    sweep.update(fields)
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


def fedrlhf_cli(*args: str, cwd: Path, timeout: int = 600):
    """``fedrlhf`` as a user runs it, in a subprocess with its own local Ray."""
    import subprocess
    import sys

    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([sys.executable, "-m", "fedrlhf_ray.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def finished_sweep(tmp_path_factory, mlflow_server):
    """A real 4-trial sweep (λ grid × sampled lr, ASHA) tracked on the session's MLflow server."""
    root = tmp_path_factory.mktemp("sweep")
    sweep_file = write_sweep(root / "tiny.yaml")
    proc = fedrlhf_cli("tune", str(sweep_file), "--tracking-uri", mlflow_server, "--out", str(root / "sweeps"), cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sweep_dir,) = (root / "sweeps").iterdir()
    return {"dir": sweep_dir, "stdout": proc.stdout, "uri": mlflow_server}


CHROMIUM = os.environ.get("FEDRLHF_CHROMIUM", "/usr/bin/chromium")


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium through Playwright: browsers cannot be downloaded here, so it drives
    Debian's ``/usr/bin/chromium`` (``.ci/run`` installs it)."""
    if not shutil.which(CHROMIUM):
        if os.environ.get("FEDRLHF_REQUIRE_DATA", "").strip() == "1":  # CI: never skip
            pytest.fail(f"no Chromium at {CHROMIUM} (install Debian's chromium)")
        pytest.skip(f"no Chromium at {CHROMIUM}")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking"],
        )
        yield chromium
        chromium.close()
