"""`cluster.yaml` / `cluster-gcp.yaml` pass Ray's own cluster-config validator."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ["cluster.yaml", "cluster-gcp.yaml"]


def load(name: str) -> dict:
    return yaml.safe_load((ROOT / name).read_text())


@pytest.mark.parametrize("name", CONFIGS)
def test_cluster_config_is_valid_for_ray_up(name):
    # Plain validate_config on the raw YAML fails misleadingly; `ray up` prepares it first.
    prepared = prepare_config(load(name))
    validate_config(prepared)  # raises on any schema error
    assert prepared["head_node_type"] in prepared["available_node_types"]
    assert prepared["cluster_name"] and prepared["provider"]["type"] in ("aws", "gcp")


@pytest.mark.parametrize("name", CONFIGS)
def test_every_node_installs_the_pinned_project_and_gets_its_code(name):
    cfg = load(name)
    assert cfg["file_mounts"]["~/fedrlhf-ray"] == "."
    setup = "\n".join(cfg["setup_commands"])
    assert "torch==2.13.0" in setup and "-e ~/fedrlhf-ray" in setup
    assert setup.index("torch==2.13.0") < setup.index("-e ~/fedrlhf-ray")  # CPU torch first
    workers = cfg["available_node_types"]["cpu_worker"]
    assert 0 <= workers["min_workers"] <= workers["max_workers"] <= cfg["max_workers"]


@pytest.mark.parametrize("name", CONFIGS)
def test_the_head_serves_mlflow_to_the_cluster(name):
    head = "\n".join(load(name)["head_start_ray_commands"])
    assert "mlflow server" in head and "--host 0.0.0.0 --port 5000" in head


def test_the_validator_rejects_a_broken_config():
    """So that the validity test above can fail."""
    broken = copy.deepcopy(load("cluster.yaml"))
    broken["available_node_types"]["cpu_worker"]["min_workers"] = "many"
    with pytest.raises(Exception):
        validate_config(prepare_config(broken))
