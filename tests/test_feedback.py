"""Tests of the simulated human, the query selectors and the per-round feedback loop.

Pure NumPy, hand-built clients plus the synthetic world; no Ray, no torch.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from envs.synthetic import make_synthetic_clients
from envs.types import ClientData, ItemCatalog, UserRecord
from fedrlhf_ray.tasks.rec.feedback import (
    FeedbackLog,
    RandomQueries,
    SimulatedHuman,
    UncertaintyQueries,
    collect_feedback,
    random_pairs,
)

N_ITEMS = 60


def make_client(n_users: int = 3, seed: int = 0) -> ClientData:
    """Users with 30 training items rated on the integers 1..5 and 10 held-out items.

    Integer ratings: every non-tied pair differs by at least 1 on the 1–5 scale.
    """
    rng = np.random.default_rng(seed)
    features = np.zeros((N_ITEMS + 1, 2), np.float32)
    features[1:] = rng.normal(size=(N_ITEMS, 2))
    catalog = ItemCatalog(features, ("f0", "popularity"), np.arange(N_ITEMS + 1))
    users = []
    for u in range(n_users):
        items = rng.permutation(np.arange(1, N_ITEMS + 1))[:40]
        ratings = rng.integers(1, 6, size=40).astype(np.float32)
        users.append(
            UserRecord(
                user_id=100 + u,
                train_items=items[:30],
                train_ratings=ratings[:30],
                heldout_items=items[30:],
                heldout_ratings=ratings[30:],
            )
        )
    return ClientData(client_id=7, users=tuple(users), catalog=catalog, rating_scale=(1.0, 5.0))


@pytest.fixture(scope="module")
def client() -> ClientData:
    return make_client()


@pytest.fixture(scope="module")
def synthetic_client() -> ClientData:
    return make_synthetic_clients(num_clients=1, users_per_client=4, items_per_user=60, seed=3)[0]


def agreement(human: SimulatedHuman, n: int, seed: int) -> tuple[float, float]:
    """Observed agreement of answers with the true order, and its Bradley–Terry expectation."""
    users, a, b = random_pairs(human, n, np.random.default_rng(seed))
    labels = human.answer_pairs(users, a, b)
    r_a, r_b = human.true_rating(users, a), human.true_rating(users, b)
    observed = float(np.mean((labels == 1.0) == (r_a > r_b)))
    expected = float(np.mean(1.0 / (1.0 + np.exp(-human.beta * np.abs(r_a - r_b)))))
    return observed, expected


# --- Bradley–Terry answers ---------------------------------------------------------------


def test_answers_agree_with_true_preferences_as_beta_grows(client):
    n = 6000
    results = {beta: agreement(SimulatedHuman(client, beta=beta, seed=11), n, seed=5)
               for beta in (0.0, 0.3, 1.0, 3.0, 20.0)}
    observed = [results[b][0] for b in sorted(results)]
    # Near-rational human: on an integer 1–5 scale every disagreement has probability
    # sigmoid(-20) ≈ 2e-9, so answers match the ratings.
    assert results[20.0][0] >= 0.97
    # beta = 0: coin flips (binomial std at n=6000 is 0.0065; ±0.03 is > 4 std).
    assert abs(results[0.0][0] - 0.5) <= 0.03
    assert all(lo < hi for lo, hi in zip(observed, observed[1:])), observed
    # And each matches the Bradley–Terry expectation within 4 binomial std.
    for beta, (obs, exp) in results.items():
        assert abs(obs - exp) <= 4 * np.sqrt(0.25 / n) + 1e-9, (beta, obs, exp)


def test_preference_probability_is_sigmoid_of_beta_times_rating_gap(client):
    user = client.users[0]
    ratings = user.train_ratings
    i_hi = int(np.argmax(ratings))
    i_lo = int(np.argmin(ratings))
    a, b = user.train_items[i_hi], user.train_items[i_lo]
    gap = float(ratings[i_hi] - ratings[i_lo])
    assert gap > 0
    n = 20_000
    for beta in (0.2, 0.5):
        human = SimulatedHuman(client, beta=beta, seed=3)
        p = 1.0 / (1.0 + np.exp(-beta * gap))
        assert human.preference_probability(0, [a], [b])[0] == pytest.approx(p)
        labels = human.answer_pairs(0, np.full(n, a), np.full(n, b))
        assert set(np.unique(labels)) <= {0.0, 1.0}
        tol = 4.0 * np.sqrt(p * (1 - p) / n)
        assert abs(labels.mean() - p) <= tol, (beta, labels.mean(), p)
        # Asking the other way round flips the probability.
        flipped = human.answer_pairs(0, np.full(n, b), np.full(n, a))
        assert abs(flipped.mean() - (1 - p)) <= tol


def test_direct_ratings_have_configured_noise_and_stay_in_scale(client):
    user = client.users[0]
    n = 20_000
    mid = user.train_items[np.flatnonzero(user.train_ratings == 3.0)[0]]
    human = SimulatedHuman(client, rating_noise=0.4, seed=9)
    values = human.rate(0, np.full(n, mid))
    # Clipping at 1 and 5 is 5 std away: the noise is untouched. std of the sample std
    # is σ/√(2n) ≈ 0.002.
    assert values.mean() == pytest.approx(3.0, abs=0.02)
    assert values.std() == pytest.approx(0.4, abs=0.015)
    top = user.train_items[np.flatnonzero(user.train_ratings == 5.0)[0]]
    noisy = SimulatedHuman(client, rating_noise=2.0, seed=9).rate(0, np.full(n, top))
    assert noisy.min() >= 1.0 and noisy.max() <= 5.0
    assert (noisy == 5.0).mean() > 0.4  # half of the noise is clipped to the top
    exact = SimulatedHuman(client, rating_noise=0.0, seed=9).rate(0, user.train_items)
    np.testing.assert_array_equal(exact, user.train_ratings)


def test_invalid_settings_are_rejected(client):
    with pytest.raises(ValueError, match="beta"):
        SimulatedHuman(client, beta=-1.0)
    with pytest.raises(ValueError, match="rating_noise"):
        SimulatedHuman(client, rating_noise=-0.1)
    human = SimulatedHuman(client, seed=0)
    with pytest.raises(ValueError, match="kind"):
        collect_feedback(human, RandomQueries(), budget=4, kind="votes")
    with pytest.raises(ValueError, match="budget"):
        collect_feedback(human, RandomQueries(), budget=-1)
    with pytest.raises(ValueError, match="pool_factor"):
        UncertaintyQueries(pool_factor=0)


# --- collect_feedback --------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind, budget, pairs, ratings",
    [("pairwise", 37, 37, 0), ("rating", 37, 0, 37), ("both", 37, 19, 18), ("both", 0, 0, 0)],
)
def test_budget_is_respected(client, kind, budget, pairs, ratings):
    human = SimulatedHuman(client, seed=1)
    log = collect_feedback(human, RandomQueries(), budget=budget, kind=kind)
    assert (log.num_pairs, log.num_ratings, len(log)) == (pairs, ratings, budget)


def test_only_training_items_are_queried(synthetic_client):
    c = synthetic_client
    human = SimulatedHuman(c, seed=4)
    log = FeedbackLog.empty()
    for _ in range(3):
        log = log.extend(collect_feedback(human, RandomQueries(), budget=400, kind="both"))
    for u, user in enumerate(c.users):
        train = set(user.train_items.tolist())
        held = set(user.heldout_items.tolist())
        asked = set(log.pair_a[log.pair_user == u].tolist())
        asked |= set(log.pair_b[log.pair_user == u].tolist())
        asked |= set(log.rating_item[log.rating_user == u].tolist())
        assert asked and asked <= train
        assert not asked & held
    # Pairs are never ties in the user's ratings (and never an item against itself).
    r_a = human.true_rating(log.pair_user, log.pair_a)
    r_b = human.true_rating(log.pair_user, log.pair_b)
    assert np.all(r_a != r_b)
    # The human refuses to answer about a held-out item.
    with pytest.raises(ValueError, match="training"):
        human.answer_pairs(0, c.users[0].heldout_items[:1], c.users[0].train_items[:1])
    with pytest.raises(ValueError, match="training"):
        human.rate(0, c.users[0].heldout_items[:1])


def test_queries_are_spread_over_users(client):
    human = SimulatedHuman(client, seed=2)
    log = collect_feedback(human, RandomQueries(), budget=101, kind="both")
    for users in (log.pair_user, log.rating_user):
        counts = np.bincount(users, minlength=len(client.users))
        assert counts.max() - counts.min() <= 1


def test_users_without_a_preference_are_skipped(client):
    flat = UserRecord(0, np.array([1, 2, 3]), np.full(3, 4.0, np.float32),
                      np.array([4]), np.array([3.0], np.float32))
    c = ClientData(0, (flat,) + client.users[:1], client.catalog, rating_scale=(1.0, 5.0))
    log = collect_feedback(SimulatedHuman(c, seed=0), RandomQueries(), budget=20)
    assert np.all(log.pair_user == 1)
    only_flat = ClientData(1, (flat,), client.catalog, rating_scale=(1.0, 5.0))
    with pytest.raises(ValueError, match="no user with two different"):
        collect_feedback(SimulatedHuman(only_flat, seed=0), RandomQueries(), budget=5)


def test_same_seed_same_logs_different_seed_different(synthetic_client):
    def run(seed):
        human = SimulatedHuman(synthetic_client, beta=2.0, seed=seed)
        return [collect_feedback(human, RandomQueries(), budget=50, kind="both") for _ in range(2)]

    first, again, other = run(123), run(123), run(124)
    assert first == again
    assert first[0] != first[1]  # the generator moves on between rounds
    assert first[0] != other[0]
    assert not np.array_equal(first[0].pair_a, other[0].pair_a)


def test_pickle_round_trip_keeps_behaviour(synthetic_client):
    human = SimulatedHuman(synthetic_client, beta=3.0, rating_noise=0.3, seed=8)
    collect_feedback(human, RandomQueries(), budget=30, kind="both")  # advance the generator
    clone = pickle.loads(pickle.dumps(human))
    for selector in (RandomQueries(), pickle.loads(pickle.dumps(UncertaintyQueries(3)))):
        a = collect_feedback(human, selector, budget=40, kind="both")
        b = collect_feedback(clone, selector, budget=40, kind="both")
        assert a == b and len(a) == 40


def test_state_and_set_state_reproduce_next_answers(synthetic_client):
    human = SimulatedHuman(synthetic_client, beta=1.0, rating_noise=0.5, seed=21)
    collect_feedback(human, RandomQueries(), budget=10)
    snapshot = human.state()
    first = collect_feedback(human, RandomQueries(), budget=60, kind="both")
    user = synthetic_client.users[0]
    answers = human.answer_pairs(0, user.train_items[:20], user.train_items[20:40])
    human.set_state(snapshot)
    assert collect_feedback(human, RandomQueries(), budget=60, kind="both") == first
    np.testing.assert_array_equal(
        human.answer_pairs(0, user.train_items[:20], user.train_items[20:40]), answers
    )
    # The snapshot restores any human of the same client, whatever its own seed.
    fresh = SimulatedHuman(synthetic_client, beta=1.0, rating_noise=0.5, seed=999)
    fresh.set_state(snapshot)
    assert collect_feedback(fresh, RandomQueries(), budget=60, kind="both") == first


# --- active queries ----------------------------------------------------------------------


class FeatureScorer:
    """A stand-in reward model: a fixed linear score of the catalogue features."""

    is_fitted = True

    def __init__(self, weights):
        self.weights = np.asarray(weights, np.float64)

    def score(self, client, user_idx, items):
        return client.catalog.features[np.asarray(items)] @ self.weights


def mean_margin(scorer, client, log):
    feats = client.catalog.features.astype(np.float64)
    return float(np.mean(np.abs((feats[log.pair_a] - feats[log.pair_b]) @ scorer.weights)))


def test_uncertainty_queries_pick_pairs_with_smaller_margins(synthetic_client):
    c = synthetic_client
    scorer = FeatureScorer(np.linspace(-1.0, 1.0, c.catalog.n_features))
    random_log = collect_feedback(SimulatedHuman(c, seed=6), RandomQueries(), budget=200,
                                  reward_model=scorer)
    active_log = collect_feedback(SimulatedHuman(c, seed=6), UncertaintyQueries(pool_factor=5),
                                  budget=200, reward_model=scorer)
    assert active_log.num_pairs == random_log.num_pairs == 200
    m_random, m_active = mean_margin(scorer, c, random_log), mean_margin(scorer, c, active_log)
    # Keeping the smallest fifth of a random pool: the mean margin drops several-fold.
    assert m_active < 0.5 * m_random, (m_active, m_random)
    r_a = synthetic_client.users[0].true_ratings  # still only non-tied training pairs
    assert np.all(r_a[active_log.pair_a[active_log.pair_user == 0]]
                  != r_a[active_log.pair_b[active_log.pair_user == 0]])


def test_uncertainty_queries_fall_back_to_random_without_a_model(synthetic_client):
    c = synthetic_client
    random_log = collect_feedback(SimulatedHuman(c, seed=6), RandomQueries(), budget=50)
    for model in (None, type("Unfitted", (FeatureScorer,), {"is_fitted": False})([1.0] * 9)):
        active_log = collect_feedback(SimulatedHuman(c, seed=6), UncertaintyQueries(),
                                      budget=50, reward_model=model)
        assert active_log == random_log


# --- FeedbackLog -------------------------------------------------------------------------


def test_feedback_log_empty_extend_and_lengths():
    empty = FeedbackLog.empty()
    assert (len(empty), empty.num_pairs, empty.num_ratings) == (0, 0, 0)
    pairs = FeedbackLog.from_pairs([0, 1], [3, 4], [5, 6], [1.0, 0.0])
    ratings = FeedbackLog.from_ratings([1], [7], [4.5])
    both = empty.extend(pairs).extend(ratings).extend(pairs)
    assert (both.num_pairs, both.num_ratings, len(both)) == (4, 1, 5)
    np.testing.assert_array_equal(both.pair_a, [3, 4, 3, 4])
    assert both.pair_a.dtype == np.int64 and both.pair_label.dtype == np.float32
    assert len(pairs) == 2  # extend returns a new log
    with pytest.raises(ValueError, match="differ in length"):
        FeedbackLog.from_pairs([0], [1, 2], [3], [1.0])
    with pytest.raises(AttributeError):
        pairs.pair_a = np.zeros(2)  # frozen
