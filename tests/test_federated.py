"""Federated RLHF with real client actors running RLlib PPO.

Whole runs (a resume, the learning check) go through :func:`fedrlhf_ray.experiment.run_experiment`;
a client's record is read where the client actor keeps it, its client-side store.
"""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

from fedrlhf_ray import rllib_edge
from fedrlhf_ray.client import ClientHost
from fedrlhf_ray.client_store import ClientStore
from fedrlhf_ray.config import validate_config
from fedrlhf_ray.driver import TaskTrainerFactory
from fedrlhf_ray.experiment import run_experiment
from fedrlhf_ray.local_trainer import ClientUpdate, RoundInstructions
from fedrlhf_ray.rundir import CLIENT_STORE, METRICS, RunDir
from fedrlhf_ray.strategies import RoundPlan, make_strategy
from fedrlhf_ray.tasks.rec.feedback import FeedbackLog

TINY = {
    "seed": 3,
    "env": {"name": "synthetic"},
    "clients": {"num_clients": 3, "formation": "group", "users_per_client": 2},
    "feedback": {"budget_per_round": 40},
    "ppo": {"train_batch_size": 400, "minibatch_size": 200, "num_epochs": 2, "local_iterations": 1},
    "federation": {"rounds": 4},
    "evaluation": {"episodes_per_user": 2},
    "ray": {"num_workers": 2},
    "tracking": {"enabled": False},  # MLflow is not under test here
}


@pytest.fixture(scope="module")
def host(ray_session, tmp_path_factory):
    """A client host in this process (the same class the actors run) serving 3 clients."""
    cfg = validate_config(TINY)
    return ClientHost(TaskTrainerFactory(cfg.to_dict(), 0, 1), str(tmp_path_factory.mktemp("store")))


def _perturbed(weights, seed):
    rng = np.random.default_rng(seed)
    return {k: (v + rng.normal(scale=0.05, size=v.shape)).astype(v.dtype) for k, v in weights.items()}


def test_broadcast_reaches_learner_and_acting_env_runner(host):
    global_weights = _perturbed(host.initial_weights(), 0)
    for client_id in (0, 2):
        host._swap_in(client_id, global_weights, 0)
        learner = rllib_edge.get_weights(host.trainer.algo)
        acting = rllib_edge.acting_weights(host.trainer.algo)
        for name, value in global_weights.items():
            np.testing.assert_array_equal(learner[name], value, err_msg=f"learner {name}")
            np.testing.assert_array_equal(acting[name], value, err_msg=f"env runner {name}")


def test_update_carries_only_weights_counts_and_scalars(host):
    global_weights = host.initial_weights()
    update = host.train_client(1, 1, global_weights, RoundInstructions(), 0)
    assert isinstance(update, ClientUpdate)
    assert isinstance(update.client_id, int) and isinstance(update.num_samples, int)
    assert update.num_samples == TINY["ppo"]["train_batch_size"]
    assert update.weights.keys() == global_weights.keys()
    for name, value in update.weights.items():
        assert value.shape == global_weights[name].shape
    assert all(isinstance(k, str) and type(v) is float for k, v in update.metrics.items())

    # What crossed is the weights plus a few hundred bytes: no data, feedback or reward model.
    payload = pickle.dumps(update)
    weight_bytes = sum(v.nbytes for v in update.weights.values())
    assert len(payload) < weight_bytes + 8_000
    # The client's record stayed with its host, in the client-side store.
    assert host.store.versions(1) == [1]
    record = ClientStore(host.store.root).load(1, upto=1)["trainer"]
    feedback = FeedbackLog(**record["feedback"])
    assert feedback.num_pairs == TINY["feedback"]["budget_per_round"]
    private = [
        feedback.pair_a.tobytes(),
        host.trainer.clients[1].users[0].train_ratings.tobytes(),
        next(iter(v for v in record["reward_model"]["net"].values())).numpy().tobytes(),
    ]
    for blob in private:
        assert blob not in payload


class Crash(RuntimeError):
    """The process running the experiment died."""


def _crash_after(rounds: int):
    def hook(progress) -> None:
        if progress.completed_rounds == rounds:
            raise Crash(f"killed after round {rounds}")

    return hook


def _final_weights(run_dir) -> dict[str, np.ndarray]:
    rd = RunDir(run_dir)
    return rd.load_checkpoint(rd.checkpoint_rounds()[0])["global_weights"]


def _assert_same_tree(a, b, where: str) -> None:
    """Two records (dicts, lists, scalars, arrays, tensors) hold the same values."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            _assert_same_tree(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_tree(x, y, f"{where}/{i}")
    elif hasattr(a, "shape"):  # a NumPy array or a torch tensor
        assert type(a) is type(b), where
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=where)
    else:
        assert a == b or (a != a and b != b), where


def _eval_rows(run_dir):
    return [r for r in RunDir(run_dir).client_metrics() if r["kind"] == "eval"]


@pytest.mark.slow
def test_resume_repeats_an_uninterrupted_run(ray_session, tmp_path):
    cfg = validate_config(TINY)
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert run_experiment(cfg, run_dir=full).status == "completed"
    expected = _final_weights(full)
    with pytest.raises(Crash):
        run_experiment(cfg, run_dir=cut, on_round=_crash_after(2))
    assert RunDir(cut).checkpoint_rounds()[0] == 2
    # A round that crashed after logging but before its checkpoint must not be kept.
    with (cut / METRICS).open("a") as f:
        f.write(json.dumps({"round": 3, "stale": True}) + "\n")
    result = run_experiment(cfg, run_dir=cut, resume=True)
    assert result.status == "completed" and result.rounds == 4
    resumed = _final_weights(cut)
    for name in expected:
        np.testing.assert_array_equal(resumed[name], expected[name], err_msg=name)
    assert _eval_rows(cut) == _eval_rows(full)
    assert [r["round"] for r in RunDir(cut).metrics()] == [0, 1, 2, 3, 4]
    # Every client's RLHF state (feedback, reward model, optimizer) came back from its store:
    # the resumed clients hold exactly the records of the uninterrupted run's.
    store_full, store_cut = ClientStore(full / CLIENT_STORE), ClientStore(cut / CLIENT_STORE)
    for c in range(cfg.clients.num_clients):
        assert store_cut.versions(c)[0] == store_full.versions(c)[0] == 4
        _assert_same_tree(store_cut.load(c, upto=4), store_full.load(c, upto=4), f"client {c}")


@pytest.mark.slow
def test_federated_rlhf_closes_half_the_gap(quickstart_runs):
    """The quickstart (5 clients of 4 users, 8 rounds of FedAvg); its run is shared with
    ``test_robust_learning``'s clean FedAvg run."""
    result = quickstart_runs("federation.strategy=fedavg")
    first, last = result.initial, result.final
    rand, oracle = last["eval/random_hit_rate/mean"], last["eval/oracle_hit_rate/mean"]
    closed = (last["eval/liked_hit_rate/mean"] - rand) / (oracle - rand)
    assert result.summary["gap_closed"] == pytest.approx(closed)
    # Measured (seed 0): random 0.29, round 0 0.29, round 8 0.72, oracle 0.97 → 63% closed.
    assert closed >= 0.5
    assert last["eval/liked_hit_rate/mean"] >= first["eval/liked_hit_rate/mean"] + 0.3
    assert result.run_dir.metrics()[-1]["fed/clients_aggregated"] == 5


def test_fedprox_term_pulls_local_training_towards_the_global_model(ray_session):
    """With a large μ the local round ends much closer to the anchor than plain PPO does.

    μ is the strategy's instruction for the round (``configure_train``), as the client host
    passes it to the trainer."""
    from fedrlhf_ray.tasks.rec.clients import build_clients
    from fedrlhf_ray.tasks.rec.trainer import RLHFTrainer

    def distance_after_round(mu: float) -> float:
        cfg = validate_config({**TINY, "federation": {"strategy": "fedprox", "fedprox_mu": mu}})
        client = build_clients(cfg)[0]
        trainer = RLHFTrainer(cfg, [client], [1.0])
        trainer.load_client(0, None)
        anchor = trainer.get_weights()
        mu = make_strategy(cfg.federation).configure_train(RoundPlan(1, (0,), 1, 1)).proximal_mu
        trainer.train(1, anchor=anchor, proximal_mu=mu)
        after = trainer.get_weights()
        trainer.stop()
        return float(sum(((after[k] - anchor[k]) ** 2).sum() for k in anchor))

    plain, proximal = distance_after_round(0.0), distance_after_round(100.0)
    assert proximal < 0.5 * plain


def test_a_clients_round_does_not_depend_on_what_its_host_ran_before(ray_session, tmp_path):
    """Swapping virtual clients leaks nothing: not Adam state, not RLlib's weight numbering.

    Regression: restoring a client's learner state once also restored RLlib's
    ``weights_seq_no``, so from the second PPO iteration on the env runner rejected the new
    weights and sampled with stale ones — only when another client had trained in between.
    """
    cfg = validate_config({**TINY, "ppo": {**TINY["ppo"], "local_iterations": 2}})

    def client0_round2(other_client_between: bool):
        host = ClientHost(TaskTrainerFactory(cfg.to_dict(), 0, 1), str(tmp_path / f"store-{other_client_between}"))
        start = host.initial_weights()
        plain = RoundInstructions()
        host.train_client(1, 0, start, plain, 0)
        if other_client_between:
            host.train_client(1, 1, start, plain, 0)
        update = host.train_client(2, 0, start, plain, 0)
        algo = host.trainer.algo
        in_sync = all(
            np.array_equal(a, b)
            for a, b in zip(rllib_edge.get_weights(algo).values(), rllib_edge.acting_weights(algo).values())
        )
        host.trainer.stop()
        return update.weights, in_sync

    alone, synced_alone = client0_round2(False)
    shared, synced_shared = client0_round2(True)
    assert synced_alone and synced_shared
    for name in alone:
        np.testing.assert_array_equal(shared[name], alone[name], err_msg=name)
