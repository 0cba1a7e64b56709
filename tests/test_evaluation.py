"""Held-out evaluation: the metric functions on hand-built inputs, and evaluate_client on the
synthetic world against an oracle and a random policy. Pure NumPy; no Ray, no torch."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import spearmanr

from envs.synthetic import make_synthetic_clients
from envs.types import ClientData
from fedrlhf_ray.metrics import summarize
from fedrlhf_ray.tasks.rec.evaluation import (
    evaluate_client,
    fit_like_threshold,
    ndcg_at_k,
    random_score_fn,
    spearman,
)

ENV_KWARGS = {"slate_size": 10, "session_length": 10, "history_length": 10, "positives_per_slate": 3}

# ---------------------------------------------------------------------------------------------
# NDCG
# ---------------------------------------------------------------------------------------------


def test_ndcg_hand_computed():
    scores = np.array([0.9, 0.8, 0.7, 0.1])
    ratings = np.array([3.0, 1.0, 2.0, 0.0])
    # Gains 2^r - 1: ranked order 7, 1, 3, 0; ideal order 7, 3, 1, 0.
    dcg = 7 / math.log2(2) + 1 / math.log2(3) + 3 / math.log2(4) + 0 / math.log2(5)
    idcg = 7 / math.log2(2) + 3 / math.log2(3) + 1 / math.log2(4) + 0 / math.log2(5)
    assert ndcg_at_k(scores, ratings, 4) == pytest.approx(dcg / idcg, rel=1e-12)
    assert ndcg_at_k(scores, ratings, 4) == pytest.approx(9.13093 / 9.39279, abs=1e-5)
    # Cut at 2: only the first two positions count.
    dcg2 = 7 + 1 / math.log2(3)
    idcg2 = 7 + 3 / math.log2(3)
    assert ndcg_at_k(scores, ratings, 2) == pytest.approx(dcg2 / idcg2, rel=1e-12)
    # k beyond the list length is the full list.
    assert ndcg_at_k(scores, ratings, 50) == ndcg_at_k(scores, ratings, 4)


def test_ndcg_perfect_and_reversed():
    ratings = np.array([5.0, 4.0, 3.5, 2.0, 1.0, 0.5])
    perfect = ndcg_at_k(ratings.copy(), ratings, 10)
    reversed_ = ndcg_at_k(-ratings, ratings, 10)
    assert perfect == pytest.approx(1.0, abs=1e-12)
    assert reversed_ < 0.6
    # Scores only matter through their order.
    assert ndcg_at_k(np.exp(ratings), ratings, 3) == pytest.approx(1.0, abs=1e-12)
    # One swap of the top two costs less than the full reversal.
    swapped = ratings.copy()
    swapped[[0, 1]] = swapped[[1, 0]]
    assert reversed_ < ndcg_at_k(swapped, ratings, 10) < perfect


def test_ndcg_degenerate_inputs_are_nan():
    assert math.isnan(ndcg_at_k(np.array([]), np.array([]), 10))
    assert math.isnan(ndcg_at_k(np.array([1.0, 2.0]), np.array([0.0, 0.0]), 10))


# ---------------------------------------------------------------------------------------------
# Spearman, like threshold, summaries
# ---------------------------------------------------------------------------------------------


def test_spearman_matches_scipy():
    rng = np.random.default_rng(0)
    for _ in range(5):
        ratings = rng.integers(1, 6, size=30).astype(float)  # many ties
        scores = ratings + rng.normal(scale=1.5, size=30)
        expected = spearmanr(scores, ratings).statistic
        assert spearman(scores, ratings) == pytest.approx(expected, abs=1e-12)
        assert -1.0 <= spearman(scores, ratings) <= 1.0
    x = np.arange(10.0)
    assert spearman(x, x**3) == pytest.approx(1.0)
    assert spearman(-x, x) == pytest.approx(-1.0)


def test_spearman_constant_or_tiny_input_is_nan():
    assert math.isnan(spearman(np.ones(5), np.arange(5.0)))
    assert math.isnan(spearman(np.arange(5.0), np.full(5, 4.0)))
    assert math.isnan(spearman(np.array([1.0]), np.array([2.0])))


def test_fit_like_threshold_separates_a_separable_set():
    rng = np.random.default_rng(1)
    scores = rng.permutation(np.array([0.1, 0.25, 0.3, 0.45, 0.6, 0.62, 0.8, 0.95]))
    liked = scores >= 0.6
    cut = fit_like_threshold(scores, liked)
    assert np.array_equal(scores >= cut, liked)
    assert 0.45 < cut <= 0.6


def test_fit_like_threshold_all_or_none_liked():
    scores = np.array([0.2, 0.5, 0.9])
    assert (scores >= fit_like_threshold(scores, np.ones(3, bool))).all()
    assert not (scores >= fit_like_threshold(scores, np.zeros(3, bool))).any()


def test_fit_like_threshold_best_accuracy_on_overlap():
    scores = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    liked = np.array([False, False, True, False, True, True])
    cut = fit_like_threshold(scores, liked)
    assert np.mean((scores >= cut) == liked) == pytest.approx(5 / 6)


def test_summarize_worst_decile_and_nans():
    values = [float(v) for v in range(1, 11)] + [float("nan"), float("nan")]
    out = summarize(values, "eval/x")
    assert set(out) == {"eval/x/mean", "eval/x/median", "eval/x/std", "eval/x/worst_decile"}
    assert out["eval/x/mean"] == pytest.approx(5.5)
    assert out["eval/x/median"] == pytest.approx(5.5)
    assert out["eval/x/std"] == pytest.approx(np.std(np.arange(1, 11)))
    assert out["eval/x/worst_decile"] == pytest.approx(np.percentile(np.arange(1, 11), 10))
    assert out["eval/x/worst_decile"] == pytest.approx(1.9)
    nan = summarize([float("nan")], "p")
    assert all(math.isnan(v) for v in nan.values()) and len(nan) == 4


# ---------------------------------------------------------------------------------------------
# evaluate_client
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client() -> ClientData:
    return make_synthetic_clients(num_clients=2, users_per_client=4, seed=0)[1]


def oracle_score_fn(client: ClientData, history_length: int = 10):
    """Scores = the true ratings of the candidates, the user recognised by their history."""
    by_history = {}
    for user in client.users:
        hist = np.zeros(history_length, np.int64)
        recent = user.train_items[-history_length:]
        hist[: recent.size] = recent
        by_history[hist.tobytes()] = user
    assert len(by_history) == len(client.users)

    def score(obs):
        rows = []
        for hist, cands in zip(obs["history_items"], obs["candidate_items"]):
            rows.append(by_history[np.ascontiguousarray(hist).tobytes()].true_ratings[cands])
        return np.array(rows, dtype=np.float64)

    return score


def test_oracle_policy_reaches_the_oracle(client):
    out = evaluate_client(oracle_score_fn(client), client, ENV_KWARGS, episodes_per_user=5, seed=0)
    assert out["num_eval_steps"] == 4 * 5 * 10
    assert out["liked_hit_rate"] == out["oracle_hit_rate"]
    assert out["oracle_hit_rate"] > 0.9
    assert out["oracle_hit_rate"] >= out["random_hit_rate"] + 0.3
    assert out["spearman"] == pytest.approx(1.0, abs=1e-12)
    assert out["ndcg"] == pytest.approx(1.0, abs=1e-12)
    # The like threshold is fitted on training scores, so even perfect scores can misclassify
    # held-out items whose rating falls between the training classes (see fit_like_threshold).
    assert out["accuracy"] >= 0.75
    random = evaluate_client(random_score_fn(0), client, ENV_KWARGS, episodes_per_user=5, seed=0)
    assert out["accuracy"] > random["accuracy"] + 0.05
    assert out["random_hit_rate"] == random["random_hit_rate"]  # same slates for both policies
    assert 0.0 <= out["engagement_rate"] <= 1.0


def test_random_policy_matches_random_hit_rate(client):
    out = evaluate_client(random_score_fn(3), client, ENV_KWARGS, episodes_per_user=25, seed=1)
    assert out["num_eval_steps"] == 4 * 25 * 10
    # 1000 picks: the standard error of the hit rate is about 0.015.
    assert out["liked_hit_rate"] == pytest.approx(out["random_hit_rate"], abs=0.06)
    assert out["engagement_rate"] == pytest.approx(0.3, abs=0.06)
    assert out["oracle_hit_rate"] > out["liked_hit_rate"] + 0.3
    assert abs(out["spearman"]) < 0.35
    assert out["ndcg"] < 0.99


def test_evaluation_is_deterministic_in_its_seeds(client):
    a = evaluate_client(random_score_fn(3), client, ENV_KWARGS, episodes_per_user=3, seed=7)
    b = evaluate_client(random_score_fn(3), client, ENV_KWARGS, episodes_per_user=3, seed=7)
    c = evaluate_client(random_score_fn(3), client, ENV_KWARGS, episodes_per_user=3, seed=8)
    assert a == b
    assert a["random_hit_rate"] != c["random_hit_rate"]


def test_evaluation_never_scores_training_items_as_heldout(client):
    calls = []
    inner = random_score_fn(0)

    def recording(obs):
        calls.append((obs["history_items"].copy(), obs["candidate_items"].copy()))
        return inner(obs)

    out = evaluate_client(recording, client, ENV_KWARGS, episodes_per_user=2, seed=0)
    assert out["num_heldout_items"] == sum(u.n_heldout for u in client.users) == client.n_heldout
    users = {}
    for user in client.users:
        hist = np.zeros(10, np.int64)
        hist[: min(10, user.n_train)] = user.train_items[-10:]
        users[hist.tobytes()] = user
    session_calls = [c for c in calls if c[1].shape[1] == ENV_KWARGS["slate_size"]]
    assert len(session_calls) == out["num_eval_steps"]
    ranking_calls = calls[len(session_calls):]
    # One held-out ranking and one training ranking (for the like threshold) per user.
    assert len(ranking_calls) == 2 * len(client.users)
    for hist, cands in session_calls:
        user = users[hist[0].tobytes()]
        assert not np.isin(cands[0], user.train_items).any()
        assert np.isin(cands[0], user.heldout_items).sum() == ENV_KWARGS["positives_per_slate"]
    for i, user in enumerate(client.users):
        (h_held, c_held), (h_train, c_train) = ranking_calls[2 * i], ranking_calls[2 * i + 1]
        assert users[h_held[0].tobytes()] is user and users[h_train[0].tobytes()] is user
        assert np.array_equal(c_held[0], user.heldout_items)
        assert np.array_equal(c_train[0], user.train_items)


def test_evaluation_reports_human_reward_and_shaped_return(client):
    table = np.full((len(client.users), client.catalog.n_items + 1), 0.5)
    out = evaluate_client(
        random_score_fn(2), client, ENV_KWARGS, episodes_per_user=3, seed=0,
        reward_table=table, lam=2.0,
    )
    assert out["human_reward"] == pytest.approx(0.5)
    # Per session: engaged steps + λ·H summed over the 10 steps.
    assert out["shaped_return"] == pytest.approx(10 * (out["engagement_rate"] + 2.0 * 0.5))
    plain = evaluate_client(random_score_fn(2), client, ENV_KWARGS, episodes_per_user=3, seed=0)
    assert "human_reward" not in plain and "shaped_return" not in plain
