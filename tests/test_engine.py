"""The federation engine (client actors + driver) with the plain-torch MLP trainer.

Real Ray actors on the session's local Ray (``ray_session``); every test kills the actors it
made, so the next one finds the 2 CPUs free. Engine internals (exact equality with a plain
loop, stragglers, sampling) drive :class:`FederatedDriver` directly; whole runs (a resume)
go through :func:`fedrlhf_ray.experiment.run_experiment`, the lifecycle every caller uses.
Client records are inspected where they live: the client-side store under ``<run dir>/clients``.
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

from fedrlhf_ray.client_store import ClientStore
from fedrlhf_ray.config import validate_config
from fedrlhf_ray.driver import FederatedDriver, client_store_root
from fedrlhf_ray.local_trainer import ClientUpdate, RoundInstructions
from fedrlhf_ray.rundir import CLIENT_METRICS, CLIENT_STORE, METRICS, RunDir, read_jsonl
from fedrlhf_ray.strategies import RoundPlan, fedavg
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
            "tracking": {"enabled": False},  # MLflow is not under test here
        }
    )


@pytest.fixture
def new_driver(ray_session):
    """``new_driver(cfg, run_dir, **trainer_kwargs)``; kills its actors afterwards."""
    made: list[FederatedDriver] = []

    def make(cfg, run_dir, **trainer_kwargs) -> FederatedDriver:
        factory = mlp_trainer_factory(cfg.clients.num_clients, seed=cfg.seed, **trainer_kwargs)
        drv = FederatedDriver(cfg, run_dir, trainer_factory=factory)
        made.append(drv)
        return drv

    yield make
    for drv in made:
        drv.shutdown()


# A client's learning rate decays with the rounds in its record: a round's result then depends
# on that record, so a lost or stale record shows in the weights.
DECAY = 0.5


def plain_rounds(clients_per_round: dict[int, list[int]], num_clients: int, *, forget_at: int | None = None,
                 **trainer_kwargs):
    """The same rounds computed in-process, sequentially: MLPTrainer + strategies.fedavg.

    ``forget_at``: every client's record is lost before that round (what a resume that did
    not restore the records would compute)."""
    trainer = MLPTrainer(range(num_clients), seed=SEED, **trainer_kwargs)
    global_w = trainer.get_weights()
    states: dict[int, dict] = {}
    for r, clients in sorted(clients_per_round.items()):
        if r == forget_at:
            states = {}
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


def store_files(root: Path) -> dict[str, bytes]:
    """Every file of a client store, by relative path: a byte-exact snapshot."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------------------------


def test_fedavg_through_engine_equals_plain_loop(new_driver, tmp_path):
    cfg = make_cfg(6, 2, rounds=2, every=1)
    drv = new_driver(cfg, tmp_path)
    assert drv.num_hosts == 2
    initial = MLPTrainer([0], seed=SEED).get_weights()
    assert_weights(drv.global_weights, initial, exact=True)
    for r in (1, 2):
        m, rows = drv.run_round()
        assert drv.round == r
        assert m["fed/clients_aggregated"] == 6 and m["fed/stragglers"] == 0
        assert m["fed/actor_restarts"] == 0 and m["fed/retried_clients"] == 0
        # Every update's shared weights crossed: 6 copies of the model.
        assert m["fed/update_bytes"] == 6 * sum(v.nbytes for v in initial.values())
        train = [row for row in rows if row["kind"] == "train"]
        assert sorted(row["client"] for row in train) == list(range(6))
        assert all(row["store/record_bytes"] > 0 and row["store/save_ms"] >= 0 for row in train)
        assert m["store/record_bytes/mean"] > 0
    expected = plain_rounds({1: list(range(6)), 2: list(range(6))}, 6)
    assert_weights(drv.global_weights, expected)
    # The model did move, and evaluation ran on every client (every_n_rounds = 1).
    assert not np.allclose(drv.global_weights["0.weight"], initial["0.weight"])
    assert {"eval/accuracy/mean", "eval/loss/mean"} <= set(m)
    assert sorted(row["client"] for row in rows if row["kind"] == "eval") == list(range(6))
    # run_round writes nothing: files and checkpoints are the caller's (the lifecycle's).
    assert not (tmp_path / METRICS).exists() and RunDir(tmp_path).checkpoint_rounds() == []


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


def test_client_update_is_the_privacy_boundary(ray_session, tmp_path):
    ray = ray_session
    from fedrlhf_ray.client import ClientActor

    root = tmp_path / CLIENT_STORE
    actor = ClientActor.options(num_cpus=1).remote(MLPTrainerFactory(4, 0, 1, seed=SEED), str(root), ())
    try:
        global_w = ray.get(actor.initial_weights.remote())
        global_ref = ray.put(global_w)
        updates = ray.get([actor.train_client.remote(1, c, global_ref, RoundInstructions(), 0) for c in (1, 2)])
        eval_metrics = ray.get(actor.evaluate_client.remote(1, 2, global_ref, 1))
    finally:
        ray.kill(actor)

    local = MLPTrainer([1, 2], seed=SEED)
    params = {name: tuple(p.shape) for name, p in local.model.named_parameters()}
    store = ClientStore(root)
    for cid, update in zip((1, 2), updates, strict=True):
        assert type(update) is ClientUpdate
        assert [f.name for f in dataclasses.fields(update)] == ["client_id", "weights", "num_samples", "metrics"]
        assert type(update.client_id) is int and update.client_id == cid
        assert type(update.num_samples) is int and update.num_samples == 200
        assert list(update.weights) == list(params)
        assert {k: v.shape for k, v in update.weights.items()} == params
        assert all(type(k) is str and type(v) is float for k, v in update.metrics.items())
        assert set(update.metrics) == {"train/loss", "train/seconds", "store/record_bytes", "store/save_ms"}
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
        # The client's record stayed on the client's side, in its store.
        assert store.versions(cid) == [1]
        record = store.load(cid, upto=1)
        assert len(record.pop("input")) == 64  # the digest of what the round started from
        assert record == {"trainer": {"rounds_done": 1}, "personal": {}}
        assert update.metrics["store/record_bytes"] == (root / f"client-{cid:06d}" / "round-000001.npz").stat().st_size
    assert all(type(k) is str and type(v) is float for k, v in eval_metrics.items())
    # Evaluating (with fine-tuning) wrote no record.
    assert store.versions(0) == [] and store.versions(2) == [1]


def test_straggler_is_dropped_and_aggregate_uses_the_rest(new_driver, tmp_path):
    cfg = make_cfg(4, 2, rounds=3, straggler_timeout_s=1.5)
    drv = new_driver(cfg, tmp_path, sleep_s={3: 5.0})
    start = time.perf_counter()
    m, rows = drv.run_round()
    wall = time.perf_counter() - start
    assert m["fed/clients_sampled"] == 4
    assert m["fed/stragglers"] == 1
    assert m["fed/clients_aggregated"] == 3
    assert m["fed/train_seconds"] < 4.0  # the driver stopped waiting at the timeout
    assert sorted(r["client"] for r in rows if r["kind"] == "train") == [0, 1, 2]
    expected = plain_rounds({1: [0, 1, 2]}, 4)
    assert_weights(drv.global_weights, expected)
    # The round ends at the deadline, and its checkpoint needs nothing from the client actors
    # (the straggler's host is still busy): neither waits for the straggler.
    assert wall < 4.0, wall
    start = time.perf_counter()
    drv.checkpoint()
    assert time.perf_counter() - start < 4.0  # not behind the straggler's 5 s
    assert RunDir(tmp_path).checkpoint_rounds() == [1]
    # The straggler's host still finishes its round: its record advances, as a real client's
    # local state would, although its update was left out of the aggregate.
    store = ClientStore(drv.store_root)
    deadline = time.monotonic() + 30
    while store.versions(3) != [1] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert store.versions(3) == [1]
    assert store.load(3, upto=1)["trainer"] == {"rounds_done": 1}


def test_resume_repeats_an_uninterrupted_run(ray_session, tmp_path):
    """A run that crashed after round 2's checkpoint (and a round 3 that logged but never
    checkpointed), resumed, ends exactly as an uninterrupted run: weights, clients' records
    (from the client store) and metrics files."""
    from fedrlhf_ray.experiment import run_experiment

    cfg = make_cfg(4, 2, rounds=4, every=2)
    factory = mlp_trainer_factory(4, seed=SEED, lr_decay=DECAY)
    dir_a, dir_b = tmp_path / "a", tmp_path / "b"

    full = run_experiment(cfg, run_dir=dir_a, trainer_factory=factory)
    assert full.status == "completed" and full.rounds == 4 and full.tracker is None

    class Crash(RuntimeError):
        pass

    def crash_after_round_2(progress):
        if progress.completed_rounds == 2:
            raise Crash("the process died")

    with pytest.raises(Crash):
        run_experiment(cfg, run_dir=dir_b, trainer_factory=factory, on_round=crash_after_round_2)
    cut = RunDir(dir_b)
    assert cut.status() == "failed" and cut.checkpoint_rounds() == [2, 1]
    # A round that crashed after logging but before its checkpoint must not be kept.
    with (dir_b / METRICS).open("a") as f:
        f.write(json.dumps({"round": 3, "stale": True}) + "\n")

    resumed = run_experiment(cfg, run_dir=dir_b, resume=True, trainer_factory=factory)
    assert resumed.status == "completed" and resumed.rounds == 4
    assert cut.status() == "completed"
    assert resumed.initial == full.initial and resumed.final == full.final

    ckpt_a, ckpt_b = RunDir(dir_a).load_checkpoint(4), cut.load_checkpoint(4)
    assert ckpt_b["round"] == 4
    assert_weights(ckpt_b["global_weights"], ckpt_a["global_weights"], exact=True)
    assert cut.checkpoint_rounds() == [4, 3]  # the last two are kept

    # The clients' records came back from the client store: every client trained 4 rounds.
    store_a, store_b = ClientStore(dir_a / CLIENT_STORE), ClientStore(dir_b / CLIENT_STORE)
    for c in range(4):
        assert store_b.load(c, upto=4) == store_a.load(c, upto=4)
        assert {k: v for k, v in store_a.load(c, upto=4).items() if k != "input"} == {
            "trainer": {"rounds_done": 4}, "personal": {}
        }
        assert store_b.versions(c)[0] == 4

    def eval_rows(run_dir: Path, name: str) -> list[dict]:
        return [
            {k: v for k, v in row.items() if k in ("round", "client", "kind") or k.startswith("eval")}
            for row in read_jsonl(run_dir / name)
            if any(k.startswith("eval") for k in row)
        ]

    main_a, main_b = eval_rows(dir_a, METRICS), eval_rows(dir_b, METRICS)
    assert [r["round"] for r in main_a] == [0, 2, 4]
    assert main_a == main_b
    assert eval_rows(dir_a, CLIENT_METRICS) == eval_rows(dir_b, CLIENT_METRICS)
    assert [r["round"] for r in cut.metrics()] == [0, 1, 2, 3, 4]
    assert not any(r.get("stale") for r in cut.metrics())


def test_records_by_client_id_let_a_resume_use_another_number_of_hosts(new_driver, tmp_path):
    """The client store is keyed by client id, not by host: a run checkpointed with W=2 client
    actors continues with W=1, and the result is the uninterrupted run's."""
    cfg2 = make_cfg(4, 2, rounds=4)
    first = new_driver(cfg2, tmp_path, lr_decay=DECAY)
    for _ in range(2):
        first.run_round()
        first.checkpoint()
    first.shutdown()
    store = ClientStore(client_store_root(cfg2, RunDir(tmp_path)))
    assert store.root == (tmp_path / CLIENT_STORE).resolve()
    assert {c: store.versions(c)[0] for c in range(4)} == {c: 2 for c in range(4)}

    cfg1 = make_cfg(4, 1, rounds=4)
    second = new_driver(cfg1, tmp_path, lr_decay=DECAY)
    assert second.num_hosts == 1
    assert second.restore() == 2 and second.round == 2
    for _ in range(2):
        second.run_round()
    assert second.round == 4
    expected = plain_rounds({r: list(range(4)) for r in range(1, 5)}, 4, lr_decay=DECAY)
    assert_weights(second.global_weights, expected)
    # The records did matter: with every client fresh after the resume, rounds 3-4 differ.
    forgetful = plain_rounds({r: list(range(4)) for r in range(1, 5)}, 4, forget_at=3, lr_decay=DECAY)
    assert not np.allclose(forgetful["0.weight"], expected["0.weight"])
    assert all(store.load(c, upto=4)["trainer"] == {"rounds_done": 4} for c in range(4))


def test_client_sampling_is_seeded_per_round(new_driver, tmp_path):
    cfg = make_cfg(10, 1, rounds=2, clients_per_round=0.5)
    drv = new_driver(cfg, tmp_path)
    picks = {r: drv.plan_round(r).sampled for r in range(1, 7)}
    for clients in picks.values():
        assert len(clients) == 5 == len(set(clients))
        assert all(0 <= c < 10 for c in clients)
    # Not the same clients every round (with seed 3 every round's pick differs from the last).
    assert all(picks[r] != picks[r + 1] for r in range(1, 6))
    # Deterministic per (seed, round): another driver with the same config picks the same.
    other = types.SimpleNamespace(cfg=cfg, training_clients=list(range(10)), strategy=drv.strategy)
    assert {r: FederatedDriver.plan_round(other, r).sampled for r in picks} == picks
    reseeded = types.SimpleNamespace(
        cfg=cfg.model_copy(update={"seed": SEED + 1}), training_clients=list(range(10)), strategy=drv.strategy
    )
    assert {r: FederatedDriver.plan_round(reseeded, r).sampled for r in picks} != picks

    trained: dict[int, list[int]] = {}
    for r in (1, 2):
        m, rows = drv.run_round()
        assert m["fed/clients_sampled"] == 5 == m["fed/clients_aggregated"]
        for row in rows:
            if row["kind"] == "train":
                trained.setdefault(row["round"], []).append(row["client"])
    assert {r: tuple(sorted(c)) for r, c in trained.items()} == {1: picks[1], 2: picks[2]}
    assert_weights(drv.global_weights, plain_rounds({1: picks[1], 2: picks[2]}, 10))
    # Only the sampled clients have a record, each as of the rounds it trained.
    store = ClientStore(drv.store_root)
    for c in range(10):
        assert store.versions(c) == sorted((r for r in (1, 2) if c in picks[r]), reverse=True)


def test_personal_head_never_leaves_the_client(new_driver, tmp_path):
    cfg = make_cfg(4, 2, personalization="personal_head", personal_layers=["4."])
    drv = new_driver(cfg, tmp_path)
    initial = {k: v.copy() for k, v in drv.global_weights.items()}
    import ray

    update = ray.get(drv.hosts[0].train_batch.remote(1, [0], ray.put(initial), RoundInstructions(), 0))[0]
    assert not any(k.startswith("4.") for k in update.weights)
    assert set(update.weights) == {k for k in initial if not k.startswith("4.")}
    # The head is in the client's own record, in the client-side store.
    record = ClientStore(drv.store_root).load(0, upto=1)
    assert set(record["personal"]) == {"4.weight", "4.bias"}
    assert not np.allclose(record["personal"]["4.weight"], initial["4.weight"])
    drv.run_round()
    # The aggregate never touches the personal head: the global copy stays at its initial value.
    np.testing.assert_array_equal(drv.global_weights["4.weight"], initial["4.weight"])
    assert not np.allclose(drv.global_weights["0.weight"], initial["0.weight"])


def test_finetune_evaluates_global_and_personalised_without_changing_records(new_driver, tmp_path):
    cfg = make_cfg(2, 1, personalization="finetune", finetune_iterations=3, every=1)
    drv = new_driver(cfg, tmp_path)
    drv.run_round()
    root = Path(drv.store_root)
    before = store_files(root)
    assert sorted(before) == ["client-000000/round-000001.npz", "client-000001/round-000001.npz"]
    metrics, rows = drv.evaluate(1)
    drv.evaluate(1)
    assert store_files(root) == before  # evaluation wrote no record, changed none
    assert metrics["eval/loss/mean"] < metrics["eval_global/loss/mean"]
    assert {"eval/accuracy", "eval_global/accuracy"} <= set(rows[0])
    # Nor did it change the records the host holds in memory: the next round is exactly
    # the plain loop's, which never fine-tunes.
    drv.run_round()
    assert_weights(drv.global_weights, plain_rounds({1: [0, 1], 2: [0, 1]}, 2))


def test_local_baseline_never_aggregates(new_driver, tmp_path):
    cfg = make_cfg(3, 2, baseline="local", every=1)
    drv = new_driver(cfg, tmp_path)
    assert drv.strategy.configure_train(RoundPlan(1, (0,), 1, 1)).keep_local
    initial = {k: v.copy() for k, v in drv.global_weights.items()}
    for _ in range(2):
        m, _ = drv.run_round()
        assert m["fed/update_bytes"] == 0  # nothing is shared
    for name, value in initial.items():
        np.testing.assert_array_equal(drv.global_weights[name], value)

    store = ClientStore(drv.store_root)
    records = {c: store.load(c, upto=2) for c in range(3)}
    assert all(r is not None and set(r["personal"]) == set(initial) for r in records.values())
    own = [records[c]["personal"]["0.weight"] for c in range(3)]
    assert not np.allclose(own[0], own[1]) and not np.allclose(own[1], own[2])


def test_centralized_baseline_trains_one_pooled_client_and_evaluates_all(new_driver, tmp_path):
    cfg = make_cfg(4, 2, baseline="centralized", every=1)
    drv = new_driver(cfg, tmp_path)
    assert drv.training_clients == [4]
    metrics, rows = drv.run_round()
    assert metrics["fed/clients_sampled"] == 1 and metrics["fed/clients_aggregated"] == 1
    evals = [r for r in rows if r["kind"] == "eval"]
    assert sorted(r["client"] for r in evals) == [0, 1, 2, 3]


def test_fedprox_mu_reaches_the_clients_through_the_strategy(new_driver, tmp_path):
    """μ is the strategy's instruction to the round's clients: a large one keeps the round's
    result near the global model it started from."""
    moved = {}
    for strategy in ("fedavg", "fedprox"):
        cfg = make_cfg(2, 1, rounds=1, strategy=strategy, fedprox_mu=50.0)
        drv = new_driver(cfg, tmp_path / strategy)
        assert drv.strategy.configure_train(RoundPlan(1, (0,), 1, 1)).proximal_mu == (50.0 if strategy == "fedprox" else 0.0)
        start = {k: v.copy() for k, v in drv.global_weights.items()}
        drv.run_round()
        moved[strategy] = sum(float(((drv.global_weights[k] - start[k]) ** 2).sum()) for k in start)
        drv.shutdown()
    assert moved["fedprox"] < 0.5 * moved["fedavg"]
