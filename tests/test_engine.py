"""The federation engine (client actors + driver) with the plain-torch MLP trainer.

Real Ray actors on the session's local Ray (``ray_session``); every test kills the actors it
made, so the next one finds the 2 CPUs free.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import time
import types
from pathlib import Path

import numpy as np
import pytest

from fedrlhf_ray.config import validate_config
from fedrlhf_ray.driver import CHECKPOINT, CLIENT_METRICS, METRICS, FederatedDriver
from fedrlhf_ray.local_trainer import ClientUpdate
from fedrlhf_ray.strategies import fedavg
from fedrlhf_ray.torch_trainer import MLPTrainer, MLPTrainerFactory, mlp_trainer_factory

SEED = 3


def make_cfg(num_clients: int, workers: int, *, rounds: int = 2, every: int = 1000, **federation):
    return validate_config(
        {
            "seed": SEED,
            "clients": {"num_clients": num_clients},
            "federation": {"rounds": rounds, "clients_per_round": 1.0, "strategy": "fedavg", **federation},
            "evaluation": {"every_n_rounds": every},
            "ray": {"num_workers": workers},
        }
    )


@pytest.fixture
def new_driver(ray_session):
    """``new_driver(cfg, run_dir, resume=False, **trainer_kwargs)``; kills its actors afterwards."""
    made: list[FederatedDriver] = []

    def make(cfg, run_dir, *, resume: bool = False, **trainer_kwargs) -> FederatedDriver:
        factory = mlp_trainer_factory(cfg.clients.num_clients, seed=cfg.seed, **trainer_kwargs)
        drv = FederatedDriver(cfg, run_dir, resume=resume, trainer_factory=factory)
        made.append(drv)
        return drv

    yield make
    for drv in made:
        kill(drv)


def kill(drv: FederatedDriver) -> None:
    import ray

    for h in drv.hosts:
        ray.kill(h)


def plain_rounds(clients_per_round: dict[int, list[int]], num_clients: int):
    """The same rounds computed in-process, sequentially: MLPTrainer + strategies.fedavg."""
    trainer = MLPTrainer(range(num_clients), seed=SEED)
    global_w = trainer.get_weights()
    states: dict[int, dict] = {}
    for r, clients in sorted(clients_per_round.items()):
        updates, samples = [], []
        for c in clients:
            trainer.load_client(c, states.get(c))
            trainer.set_weights(global_w)
            n, _ = trainer.train(r, None)
            updates.append(trainer.get_weights())
            samples.append(n)
            states[c] = trainer.save_client()
        global_w = fedavg(updates, samples)
    return global_w


def assert_weights(actual, expected, exact: bool = False) -> None:
    assert list(actual) == list(expected)
    for k in expected:
        if exact:
            np.testing.assert_array_equal(actual[k], expected[k], err_msg=k)
        else:
            np.testing.assert_allclose(actual[k], expected[k], rtol=0, atol=1e-6, err_msg=k)


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


# --------------------------------------------------------------------------------------------


def test_fedavg_through_engine_equals_plain_loop(new_driver, tmp_path):
    cfg = make_cfg(6, 2, rounds=2, every=1)
    drv = new_driver(cfg, tmp_path)
    assert drv.num_hosts == 2
    initial = MLPTrainer([0], seed=SEED).get_weights()
    assert_weights(drv.global_weights, initial, exact=True)
    for _ in range(2):
        m = drv.run_round()
        assert m["fed/clients_aggregated"] == 6 and m["fed/stragglers"] == 0
    expected = plain_rounds({1: list(range(6)), 2: list(range(6))}, 6)
    assert_weights(drv.final_weights(), expected)
    # The model did move, and evaluation ran on every client (every_n_rounds = 1).
    assert not np.allclose(drv.final_weights()["0.weight"], initial["0.weight"])
    assert {"eval/accuracy/mean", "eval/loss/mean"} <= set(m)


def _arrays_in(obj, seen=None) -> list[np.ndarray]:
    """Every numpy array reachable from obj (dataclasses, mappings, sequences)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if isinstance(obj, np.ndarray):
        return [obj]
    if dataclasses.is_dataclass(obj):
        return [a for f in dataclasses.fields(obj) for a in _arrays_in(getattr(obj, f.name), seen)]
    if isinstance(obj, dict):
        return [a for kv in obj.items() for x in kv for a in _arrays_in(x, seen)]
    if isinstance(obj, (list, tuple, set)):
        return [a for x in obj for a in _arrays_in(x, seen)]
    return []


def test_client_update_is_the_privacy_boundary(ray_session):
    ray = ray_session
    from fedrlhf_ray.client import ClientActor

    actor = ClientActor.options(num_cpus=1).remote(MLPTrainerFactory(4, 0, 1, seed=SEED), ())
    try:
        global_w = ray.get(actor.initial_weights.remote())
        global_ref = ray.put(global_w)
        updates = ray.get([actor.train_client.remote(1, c, global_ref, False) for c in (1, 2)])
        eval_metrics = ray.get(actor.evaluate_client.remote(1, 2, global_ref, 1))
    finally:
        ray.kill(actor)

    local = MLPTrainer([1, 2], seed=SEED)
    params = {name: tuple(p.shape) for name, p in local.model.named_parameters()}
    for cid, update in zip((1, 2), updates, strict=True):
        assert type(update) is ClientUpdate
        assert [f.name for f in dataclasses.fields(update)] == ["client_id", "weights", "num_samples", "metrics"]
        assert type(update.client_id) is int and update.client_id == cid
        assert type(update.num_samples) is int and update.num_samples == 200
        assert list(update.weights) == list(params)
        assert {k: v.shape for k, v in update.weights.items()} == params
        assert all(type(k) is str and type(v) is float for k, v in update.metrics.items())
        assert set(update.metrics) == {"train/loss", "train/seconds"}
        # The only arrays that cross are the parameters themselves.
        arrays = _arrays_in(update)
        assert len(arrays) == len(params)
        assert {id(a) for a in arrays} == {id(v) for v in update.weights.values()}

        x, y = local.client_data(cid)
        blob = pickle.dumps(update, protocol=pickle.HIGHEST_PROTOCOL)
        for row in (0, 1, len(x) // 2, len(x) - 1):
            assert x[row].numpy().tobytes() not in blob, f"client {cid}: sample {row} leaked"
            assert x[row].numpy().astype(np.float64).tobytes() not in blob
        assert y.numpy().tobytes() not in blob
        assert y.numpy().astype(np.int32).tobytes() not in blob
    assert all(type(k) is str and type(v) is float for k, v in eval_metrics.items())


def test_straggler_is_dropped_and_aggregate_uses_the_rest(new_driver, tmp_path):
    cfg = make_cfg(4, 2, rounds=3, straggler_timeout_s=1.5)
    drv = new_driver(cfg, tmp_path, sleep_s={3: 5.0})
    start = time.perf_counter()
    m = drv.run_round()
    wall = time.perf_counter() - start
    assert m["fed/clients_sampled"] == 4
    assert m["fed/stragglers"] == 1
    assert m["fed/clients_aggregated"] == 3
    assert m["fed/train_seconds"] < 4.0  # the driver stopped waiting at the timeout
    rows = [r for r in read_rows(tmp_path / CLIENT_METRICS) if r["kind"] == "train"]
    assert sorted(r["client"] for r in rows) == [0, 1, 2]
    expected = plain_rounds({1: [0, 1, 2]}, 4)
    assert_weights(drv.final_weights(), expected)
    # Finishes, but note: the checkpoint's get_records() queues behind the straggler's
    # train() on its (serial) actor, so the round's wall time still includes the sleep.
    assert wall < 15.0, wall


def test_resume_repeats_an_uninterrupted_run(new_driver, tmp_path):
    import ray

    cfg = make_cfg(4, 2, rounds=4, every=2)
    dir_a, dir_b = tmp_path / "a", tmp_path / "b"
    dir_a.mkdir()
    dir_b.mkdir()

    a = new_driver(cfg, dir_a)
    for _ in range(4):
        a.run_round()
    records_a = ray.get([h.get_records.remote() for h in a.hosts])
    kill(a)

    b = new_driver(cfg, dir_b)
    for _ in range(2):
        b.run_round()
    kill(b)
    del b
    b2 = new_driver(cfg, dir_b, resume=True)
    assert b2.completed_rounds() == 2
    for _ in range(2):
        b2.run_round()
    assert b2.completed_rounds() == 4
    assert_weights(b2.final_weights(), a.final_weights(), exact=True)

    # The clients' records came back from the checkpoint: every client trained 4 rounds.
    records_b = ray.get([h.get_records.remote() for h in b2.hosts])
    as_plain = lambda recs: {c: r.trainer_state for host in recs for c, r in host.items()}  # noqa: E731
    assert as_plain(records_b) == as_plain(records_a) == {c: {"rounds_done": 4} for c in range(4)}
    with (dir_b / CHECKPOINT).open("rb") as f:
        assert pickle.load(f)["round"] == 4

    def eval_rows(run_dir: Path, name: str) -> list[dict]:
        return [
            {k: v for k, v in row.items() if k in ("round", "client", "kind") or k.startswith("eval")}
            for row in read_rows(run_dir / name)
            if any(k.startswith("eval") for k in row)
        ]

    main_a, main_b = eval_rows(dir_a, METRICS), eval_rows(dir_b, METRICS)
    assert [r["round"] for r in main_a] == [2, 4]
    assert main_a == main_b
    assert eval_rows(dir_a, CLIENT_METRICS) == eval_rows(dir_b, CLIENT_METRICS)
    assert len(read_rows(dir_b / METRICS)) == 4


def test_client_sampling_is_seeded_per_round(new_driver, tmp_path):
    cfg = make_cfg(10, 1, rounds=2, clients_per_round=0.5)
    drv = new_driver(cfg, tmp_path)
    picks = {r: drv.sample_clients(r) for r in range(1, 7)}
    for clients in picks.values():
        assert len(clients) == 5 == len(set(clients))
        assert all(0 <= c < 10 for c in clients)
    # Not the same clients every round (with seed 3 every round's pick differs from the last).
    assert all(picks[r] != picks[r + 1] for r in range(1, 6))
    # Deterministic per (seed, round): another driver with the same config picks the same.
    other = types.SimpleNamespace(cfg=cfg, training_clients=list(range(10)))
    assert {r: FederatedDriver.sample_clients(other, r) for r in picks} == picks
    reseeded = types.SimpleNamespace(
        cfg=cfg.model_copy(update={"seed": SEED + 1}), training_clients=list(range(10))
    )
    assert {r: FederatedDriver.sample_clients(reseeded, r) for r in picks} != picks

    for r in (1, 2):
        m = drv.run_round()
        assert m["fed/clients_sampled"] == 5 == m["fed/clients_aggregated"]
    trained = {}
    for row in read_rows(tmp_path / CLIENT_METRICS):
        if row["kind"] == "train":
            trained.setdefault(row["round"], []).append(row["client"])
    assert {r: sorted(c) for r, c in trained.items()} == {1: picks[1], 2: picks[2]}
    assert_weights(drv.final_weights(), plain_rounds({1: picks[1], 2: picks[2]}, 10))


def test_personal_head_never_leaves_the_client(new_driver, tmp_path):
    cfg = make_cfg(4, 2, personalization="personal_head", personal_layers=["4."])
    drv = new_driver(cfg, tmp_path)
    initial = {k: v.copy() for k, v in drv.global_weights.items()}
    import ray

    update = ray.get(drv.hosts[0].train_batch.remote(1, [0], ray.put(initial)))[0]
    assert not any(k.startswith("4.") for k in update.weights)
    assert set(update.weights) == {k for k in initial if not k.startswith("4.")}
    records = ray.get(drv.hosts[0].get_records.remote())
    assert set(records[0].personal) == {"4.weight", "4.bias"}
    assert not np.allclose(records[0].personal["4.weight"], initial["4.weight"])
    drv.run_round()
    # The aggregate never touches the personal head: the global copy stays at its initial value.
    np.testing.assert_array_equal(drv.global_weights["4.weight"], initial["4.weight"])
    assert not np.allclose(drv.global_weights["0.weight"], initial["0.weight"])


def test_finetune_evaluates_global_and_personalised_without_changing_records(new_driver, tmp_path):
    cfg = make_cfg(2, 1, personalization="finetune", finetune_iterations=3, every=1)
    drv = new_driver(cfg, tmp_path)
    drv.run_round()
    import ray

    before = pickle.dumps(ray.get(drv.hosts[0].get_records.remote()))
    metrics, rows = drv.evaluate(1)
    assert pickle.dumps(ray.get(drv.hosts[0].get_records.remote())) == before
    assert metrics["eval/loss/mean"] < metrics["eval_global/loss/mean"]
    assert {"eval/accuracy", "eval_global/accuracy"} <= set(rows[0])


def test_local_baseline_never_aggregates(new_driver, tmp_path):
    cfg = make_cfg(3, 2, baseline="local", every=1)
    drv = new_driver(cfg, tmp_path)
    initial = {k: v.copy() for k, v in drv.global_weights.items()}
    drv.run_round()
    drv.run_round()
    for name, value in initial.items():
        np.testing.assert_array_equal(drv.global_weights[name], value)
    import ray

    records = {c: r for h in drv.hosts for c, r in ray.get(h.get_records.remote()).items()}
    assert set(records) == {0, 1, 2}
    own = [records[c].personal["0.weight"] for c in range(3)]
    assert not np.allclose(own[0], own[1]) and not np.allclose(own[1], own[2])


def test_centralized_baseline_trains_one_pooled_client_and_evaluates_all(new_driver, tmp_path):
    cfg = make_cfg(4, 2, baseline="centralized", every=1)
    drv = new_driver(cfg, tmp_path)
    assert drv.training_clients == [4]
    metrics = drv.run_round()
    assert metrics["fed/clients_sampled"] == 1 and metrics["fed/clients_aggregated"] == 1
    evals = [r for r in read_rows(tmp_path / CLIENT_METRICS) if r["kind"] == "eval"]
    assert sorted(r["client"] for r in evals) == [0, 1, 2, 3]
