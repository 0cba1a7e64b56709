"""A real two-node Ray cluster on this machine: `fedrlhf run --address` places client actors
on both nodes, finishes, and tracks the run in MLflow."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT, TINY_OVERRIDES, fedrlhf_cli

# In its own process: ``Cluster.shutdown`` resets the internal-KV client of the process it runs
# in, which would cut this test session's Ray off its function and env registry.
CLUSTER = """
import json, sys
from ray.cluster_utils import Cluster

store = 150 * 1024 * 1024
cluster = Cluster(initialize_head=True, connect=False,
                  head_node_args={"num_cpus": 1, "object_store_memory": store, "include_dashboard": False})
cluster.add_node(num_cpus=1, object_store_memory=store)
cluster.wait_for_nodes()
print(json.dumps({"address": cluster.address, "nodes": [n.node_id for n in cluster.list_all_nodes()]}), flush=True)
sys.stdin.read()  # until the test closes stdin
cluster.shutdown()
"""


@pytest.fixture
def two_node_cluster():
    """A real two-node Ray cluster (one CPU per node) on this machine: its address and node ids."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, "-c", CLUSTER], env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line:
        proc.kill()
        pytest.fail("the two-node cluster did not start")
    yield json.loads(line)
    proc.stdin.close()
    proc.wait(timeout=120)


@pytest.mark.slow
def test_client_actors_on_two_nodes(two_node_cluster, mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    overrides = {**TINY_OVERRIDES, "ray.num_workers": 2, "ray.cpus_per_worker": 1, "federation.rounds": 2,
                 "tracking.experiment": "multinode"}
    sets = [a for k, v in overrides.items() for a in ("--set", f"{k}={v}")]
    proc = fedrlhf_cli(
        "run", str(REPO_ROOT / "tune_configs" / "quickstart.yaml"), *sets, "--address", two_node_cluster["address"],
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
    nodes = set(two_node_cluster["nodes"])
    # placement was recorded while running; the completed status keeps it
    placement = json.loads((run_dir / "status.json").read_text()).get("placement")
    assert placement is not None, "status.json lost the client placement"
    assert {p["node_id"] for p in placement} == nodes  # one client actor on each node
    assert sorted(c for p in placement for c in p["clients"]) == [0, 1]
    # Each client actor kept its client's record in the client store (here on storage both
    # nodes share); the driver's checkpoints hold no record.
    assert sorted(p.name for p in (run_dir / "clients").iterdir()) == ["client-000000", "client-000001"]
    assert sorted(p.name for p in run_dir.glob("checkpoint*")) == ["checkpoint-000001.npz", "checkpoint-000002.npz"]
