"""The driver actor: the FederatedDriver runs in a Ray actor of its own; the lifecycle's process
gets metrics and rows, never a client's update or the global weights."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from fedrlhf_ray.config import validate_config
from fedrlhf_ray.driver import FederatedDriver, driver_actor_options
from fedrlhf_ray.errors import UserError
from fedrlhf_ray.experiment import run_experiment
from fedrlhf_ray.rundir import STATUS
from fedrlhf_ray.torch_trainer import mlp_trainer_factory

K = 4


def cfg(**ray_section):
    return validate_config({
        "seed": 5, "clients": {"num_clients": K}, "federation": {"rounds": 2},
        "ray": {"num_workers": 2, **ray_section}, "tracking": {"enabled": False},
    })


def run(tmp_path, name, **kw):
    return run_experiment(cfg(), run_dir=tmp_path / name, trainer_factory=mlp_trainer_factory(K, seed=5), **kw)


def test_the_driver_runs_in_its_own_actor_and_nothing_it_receives_reaches_this_process(
    ray_session, tmp_path, monkeypatch
):
    seen: list = []
    original = FederatedDriver._received
    # A driver in this process would record here; the driver actor's process does not see the patch.
    monkeypatch.setattr(FederatedDriver, "_received", lambda self, obj: seen.append(obj) or original(self, obj))
    result = run(tmp_path, "actor")
    assert result.status == "completed" and result.rounds == 2 and seen == []
    status = json.loads((result.run_dir / STATUS).read_text())
    assert status["driver"]["pid"] != os.getpid()
    assert status["driver"]["node_id"] == ray_session.get_runtime_context().get_node_id()
    # The same run with the driver in this process receives exactly as much and ends the same.
    local = run(tmp_path, "in-process", in_process_driver=True)
    assert seen, "the in-process driver records what it receives"
    a, b = result.run_dir.load_checkpoint(2), local.run_dir.load_checkpoint(2)
    assert all(np.array_equal(a["global_weights"][k], b["global_weights"][k]) for k in a["global_weights"])
    drop = ("fed/round_seconds", "fed/train_seconds", "store/save_ms/mean")
    strip = lambda rows: [{k: v for k, v in r.items() if k not in drop and "seconds" not in k} for r in rows]  # noqa: E731
    assert strip(result.run_dir.metrics()) == strip(local.run_dir.metrics())


def test_a_driver_error_comes_back_as_itself(ray_session, tmp_path):
    """A one-line error raised inside the driver actor is the same error here (the CLI prints it)."""
    done = run(tmp_path, "done")
    for r in done.run_dir.checkpoint_rounds():
        done.run_dir.checkpoint_path(r).write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match=r"checkpoint\(s\), none usable; start the run again"):
        run_experiment(cfg(), run_dir=done.run_dir.path, resume=True, trainer_factory=mlp_trainer_factory(K, seed=5))


def test_driver_placement_options(ray_session):
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = driver_actor_options(cfg())
    assert here["num_cpus"] == 0 and isinstance(here["scheduling_strategy"], NodeAffinitySchedulingStrategy)
    assert here["scheduling_strategy"].node_id == ray_session.get_runtime_context().get_node_id()
    pinned = driver_actor_options(cfg(driver_resources={"CPU": 0.5, "driver_node": 1}))
    assert pinned["num_cpus"] == 0.5 and pinned["resources"] == {"driver_node": 1.0}
    assert "scheduling_strategy" not in pinned


def test_driver_resources_no_node_has_are_one_line_before_anything_starts(ray_session, tmp_path):
    from fedrlhf_ray.ray_runtime import check_fits

    with pytest.raises(UserError, match=r"ray.driver_resources: driver_node=1 — the Ray cluster has 0") as info:
        check_fits(cfg(driver_resources={"driver_node": 1}), 2)
    assert "\n" not in str(info.value)
    with pytest.raises(UserError, match="and the driver actor 1"):
        check_fits(cfg(driver_resources={"CPU": 1}), 2)
