"""A real two-node Ray cluster on this machine: `fedrlhf run --address` places client actors
on both nodes, finishes, and tracks the run in MLflow."""

from __future__ import annotations

import json
import os

import pytest

from tests.conftest import REPO_ROOT, TINY_OVERRIDES, fedrlhf_cli


@pytest.fixture
def two_node_cluster():
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True, connect=False,
        head_node_args={"num_cpus": 1, "object_store_memory": 150 * 1024 * 1024, "include_dashboard": False},
    )
    cluster.add_node(num_cpus=1, object_store_memory=150 * 1024 * 1024)
    cluster.wait_for_nodes()
    yield cluster
    cluster.shutdown()


@pytest.mark.slow
def test_client_actors_on_two_nodes(two_node_cluster, mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    overrides = {**TINY_OVERRIDES, "ray.num_workers": 2, "ray.cpus_per_worker": 1, "federation.rounds": 2,
                 "tracking.experiment": "multinode"}
    sets = [a for k, v in overrides.items() for a in ("--set", f"{k}={v}")]
    proc = fedrlhf_cli(
        "run", str(REPO_ROOT / "tune_configs" / "quickstart.yaml"), *sets, "--address", two_node_cluster.address,
        "--tracking-uri", mlflow_server, "--out", str(tmp_path / "runs"), cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "completed"
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2] and rows[-1]["fed/clients_aggregated"] == 2

    client = MlflowClient(mlflow_server)
    run = client.get_run(json.loads((run_dir / "mlflow_run.json").read_text())["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["fedrlhf.ray_nodes"] == "2"
    assert len(client.get_metric_history(run.info.run_id, "eval/liked_hit_rate/mean")) == 3
    nodes = {n.node_id for n in two_node_cluster.list_all_nodes()}
    # placement was recorded while running; the completed status keeps it
    placement = json.loads((run_dir / "status.json").read_text()).get("placement")
    assert placement is not None, "status.json lost the client placement"
    assert {p["node_id"] for p in placement} == nodes  # one client actor on each node
