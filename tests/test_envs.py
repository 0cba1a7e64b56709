"""The Gymnasium slate environments, the synthetic world and the MovieLens client partition.

Synthetic tests are offline; MovieLens tests read ml-latest-small from the shared data folder
(``shared_data`` fixture) and keep their parsed-data cache in a temporary folder. No Ray.
"""

from __future__ import annotations

import warnings

import gymnasium as gym
import gymnasium.utils.env_checker as env_checker
import numpy as np
import pandas as pd
import pytest

import envs
from envs import MOVIELENS_ENV_ID, SYNTHETIC_ENV_ID
from envs.data import load_movielens
from envs.data.partition import form_clients, temporal_split
from envs.rec_env import UNKNOWN_RATING, ShapedRewardWrapper, SlateRecEnv
from envs.synthetic import make_synthetic_clients

MODES = ("train", "heldout")


# ---------------------------------------------------------------------------------------------
# fixtures and helpers
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ml_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("movielens-cache")


@pytest.fixture(scope="module")
def ml_kwargs(shared_data, ml_cache):
    """gym.make kwargs of the MovieLens env on the shared ml-latest-small copy."""
    return {
        "dataset": "ml-latest-small",
        "path": str(shared_data / "ml-latest-small"),
        "cache_dir": str(ml_cache),
    }


@pytest.fixture(scope="module")
def ml_data(ml_kwargs):
    return load_movielens(ml_kwargs["dataset"], ml_kwargs["path"], cache_dir=ml_kwargs["cache_dir"])


@pytest.fixture(scope="module")
def ml_clients(ml_data):
    """Eight one-user MovieLens clients."""
    return form_clients(
        ml_data.ratings, ml_data.movies, ml_data.genre_names, num_clients=8, seed=3
    )


@pytest.fixture(scope="module")
def syn_clients():
    return make_synthetic_clients(num_clients=2, users_per_client=3, seed=0)


def equal(a, b) -> bool:
    """Exact structural equality where NaN equals NaN (unknown ratings are NaN)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b))
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and bool(
            np.array_equal(a, b, equal_nan=a.dtype.kind == "f")
        )
    if isinstance(a, float) and np.isnan(a):
        return np.isnan(b)
    return a == b


def rollout(env: gym.Env, seed: int | None, actions: list[int], episodes: int = 3) -> list:
    """(obs, reward, terminated, info) of ``episodes`` sessions under a fixed action sequence."""
    out = []
    for ep in range(episodes):
        obs, info = env.reset(seed=seed if ep == 0 else None)
        out.append((obs, info))
        done, t = False, 0
        while not done:
            obs, reward, done, truncated, info = env.step(actions[t % len(actions)])
            assert not truncated
            out.append((obs, reward, done, info))
            t += 1
    return out


def run_checker(env: gym.Env) -> list[str]:
    """Gymnasium's own env checker; returns the warnings it raised (it raises on failures)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        env_checker.check_env(env)
    return [str(w.message) for w in caught if not issubclass(w.category, DeprecationWarning)]


# ---------------------------------------------------------------------------------------------
# Gymnasium's env checker on both registered ids
# ---------------------------------------------------------------------------------------------


def test_both_ids_are_registered():
    assert SYNTHETIC_ENV_ID in gym.registry and MOVIELENS_ENV_ID in gym.registry
    assert envs.SYNTHETIC_ENV_ID == "fedrlhf/SyntheticRec-v0"
    assert envs.MOVIELENS_ENV_ID == "fedrlhf/MovieLensRec-v0"


@pytest.mark.parametrize("mode", MODES)
def test_check_env_synthetic(mode):
    env = gym.make(SYNTHETIC_ENV_ID, client=1, num_clients=2, users_per_client=2, seed=0, mode=mode)
    assert isinstance(env.unwrapped, SlateRecEnv) and env.unwrapped.mode == mode
    assert run_checker(env.unwrapped) == []


@pytest.mark.parametrize("mode", MODES)
def test_check_env_movielens(ml_kwargs, mode):
    env = gym.make(MOVIELENS_ENV_ID, **ml_kwargs, client=1, num_clients=2, seed=0, mode=mode)
    assert isinstance(env.unwrapped, SlateRecEnv) and env.unwrapped.mode == mode
    assert run_checker(env.unwrapped) == []


# ---------------------------------------------------------------------------------------------
# seeding
# ---------------------------------------------------------------------------------------------

ACTIONS = [0, 3, 9, 1, 5, 2, 7, 4, 8, 6, 0]


def test_same_seed_same_trajectories_synthetic():
    a = gym.make(SYNTHETIC_ENV_ID, client=0, num_clients=2, users_per_client=3, seed=5)
    b = gym.make(SYNTHETIC_ENV_ID, client=0, num_clients=2, users_per_client=3, seed=5)
    ta, tb = rollout(a, 11, ACTIONS), rollout(b, 11, ACTIONS)
    assert len(ta) == 3 * (1 + 10)
    assert equal(ta, tb)
    # Re-seeding the same instance replays the same sessions.
    assert equal(rollout(a, 11, ACTIONS), ta)


def test_different_seeds_different_trajectories_synthetic():
    env = gym.make(SYNTHETIC_ENV_ID, client=0, num_clients=2, users_per_client=3, seed=5)
    ta, tb = rollout(env, 11, ACTIONS), rollout(env, 12, ACTIONS)
    slates_a = np.stack([step[0]["candidate_items"] for step in ta])
    slates_b = np.stack([step[0]["candidate_items"] for step in tb])
    assert (slates_a != slates_b).mean() > 0.5


def test_world_seed_changes_the_world():
    a = make_synthetic_clients(num_clients=1, seed=0)[0]
    b = make_synthetic_clients(num_clients=1, seed=1)[0]
    assert not np.array_equal(a.catalog.features, b.catalog.features)
    again = make_synthetic_clients(num_clients=1, seed=0)[0]
    assert np.array_equal(a.catalog.features, again.catalog.features)
    assert np.array_equal(a.users[0].true_ratings, again.users[0].true_ratings, equal_nan=True)


def test_same_seed_same_trajectories_movielens(ml_kwargs):
    a = gym.make(MOVIELENS_ENV_ID, **ml_kwargs, client=2, num_clients=3, seed=1, mode="heldout")
    b = gym.make(MOVIELENS_ENV_ID, **ml_kwargs, client=2, num_clients=3, seed=1, mode="heldout")
    ta, tb = rollout(a, 4, ACTIONS), rollout(b, 4, ACTIONS)
    assert equal(ta, tb)
    tc = rollout(a, 5, ACTIONS)
    assert not equal(ta, tc)


def test_vector_env_sub_envs_get_distinct_seeds():
    kwargs = dict(client=0, num_clients=2, users_per_client=3, seed=0)
    vec = gym.make_vec(SYNTHETIC_ENV_ID, num_envs=3, vectorization_mode="sync", **kwargs)
    obs, _ = vec.reset(seed=7)
    slates = obs["candidate_items"]
    assert slates.shape == (3, 10)
    for i in range(3):
        for j in range(i + 1, 3):
            assert not np.array_equal(slates[i], slates[j])
    # Sub-env i is exactly a single env reset with seed 7 + i.
    for i in range(3):
        single = gym.make(SYNTHETIC_ENV_ID, **kwargs)
        single_obs, _ = single.reset(seed=7 + i)
        assert np.array_equal(single_obs["candidate_items"], slates[i])
    engaged = []
    for t in range(10):
        obs, reward, terminated, truncated, info = vec.step(np.array([t % 10, (t + 3) % 10, 5]))
        assert reward.shape == (3,)
        assert np.array_equal(reward, info["engaged"].astype(np.float64))
        engaged.append(info["engaged"])
    assert terminated.all() and not truncated.any()
    assert 0 < np.mean(engaged) < 1
    vec.close()


# ---------------------------------------------------------------------------------------------
# what a slate may contain
# ---------------------------------------------------------------------------------------------


def check_slates(env: SlateRecEnv, episodes: int, positives: int) -> tuple[int, int]:
    """Walk ``episodes`` sessions picking every position in turn; returns (engaged, steps).

    Asserts: exactly ``positives`` candidates per slate are items the env knows the user rated
    (train mode knows the training split only; held-out mode both), all from the env's mode's
    split; a held-out session shows no training item; engaged ⇔ the picked item is from that
    split; the history holds only training items.
    """
    engaged_total, steps = 0, 0
    for ep in range(episodes):
        obs, info = env.reset(seed=100 + ep if ep == 0 else None)
        user = env.users[info["user_index"]]
        pool = user.train_items if env.mode == "train" else user.heldout_items
        other = user.heldout_items if env.mode == "train" else user.train_items
        history = obs["history_items"][obs["history_items"] > 0]
        assert np.isin(history, user.train_items).all()
        done, t = False, 0
        while not done:
            cands = obs["candidate_items"]
            known = user.train_items if env.mode == "train" else user.rated_items()
            rated = np.isin(cands, known)
            assert rated.sum() == min(positives, pool.size)
            assert np.isin(cands[rated], pool).all()
            if env.mode == "heldout":
                assert not np.isin(cands, other).any()
            action = (t + ep) % env.slate_size
            obs, reward, done, _, info = env.step(action)
            assert info["item"] == cands[action]
            assert info["engaged"] == bool(np.isin(info["item"], pool)) == bool(rated[action])
            assert reward == float(info["engaged"])
            engaged_total += info["engaged"]
            steps += 1
            t += 1
    return engaged_total, steps


@pytest.mark.parametrize("mode", MODES)
def test_slates_synthetic_only_show_the_modes_items(syn_clients, mode):
    env = SlateRecEnv(syn_clients[0], mode=mode, seed=0, positives_per_slate=3)
    engaged, steps = check_slates(env, episodes=30, positives=3)
    # Cycling through all positions picks a watched item about 3 times in 10.
    assert 0.2 < engaged / steps < 0.4


@pytest.mark.parametrize("mode", MODES)
def test_slates_movielens_only_show_the_modes_items(ml_clients, mode):
    for client in ml_clients[:4]:
        env = SlateRecEnv(client, mode=mode, seed=1, positives_per_slate=4, slate_size=8)
        engaged, steps = check_slates(env, episodes=5, positives=4)
        assert engaged > 0


def test_movielens_heldout_env_via_registered_id(ml_kwargs):
    env = gym.make(MOVIELENS_ENV_ID, **ml_kwargs, client=3, num_clients=4, seed=2, mode="heldout")
    inner = env.unwrapped
    assert inner.num_users == 1
    engaged, steps = check_slates(inner, episodes=5, positives=3)
    assert steps == 50 and engaged > 0


def test_slate_candidates_are_distinct(syn_clients):
    env = SlateRecEnv(syn_clients[0], mode="heldout", seed=0)
    for _ in range(20):
        obs, _ = env.reset()
        done = False
        while not done:
            cands = obs["candidate_items"]
            assert np.unique(cands).size == cands.size, cands
            obs, _, done, _, _ = env.step(0)


# ---------------------------------------------------------------------------------------------
# info fields
# ---------------------------------------------------------------------------------------------


def check_info(env: SlateRecEnv, episodes: int, rng: np.random.Generator) -> None:
    for _ in range(episodes):
        obs, info = env.reset()
        user = env.users[info["user_index"]]
        known = {}
        if user.true_ratings is None:
            known = dict(zip(user.train_items.tolist(), user.train_ratings.tolist()))
            if env.mode == "heldout":  # a training session never sees a held-out rating
                known.update(zip(user.heldout_items.tolist(), user.heldout_ratings.tolist()))
        done = False
        while not done:
            cands = obs["candidate_items"]
            action = int(rng.integers(env.slate_size))
            obs, _, done, _, info = env.step(action)
            cr = info["candidate_ratings"]
            if user.true_ratings is not None:
                assert np.array_equal(cr, user.true_ratings[cands].astype(np.float32))
            else:
                expected = np.array([known.get(int(i), UNKNOWN_RATING) for i in cands], dtype=np.float32)
                assert np.array_equal(cr, expected)
            assert equal(info["picked_rating"], float(cr[action]))
            assert info["liked"] == bool(info["picked_rating"] >= 4.0)
            assert info["oracle_liked"] == bool(cr.max() >= 4.0)
            oa = info["oracle_action"]
            assert 0 <= oa < env.slate_size
            assert cr[oa] == cr.max()
            assert info["user_index"] == env.user_index


@pytest.mark.parametrize("mode", MODES)
def test_info_fields_consistent_synthetic(syn_clients, mode):
    check_info(SlateRecEnv(syn_clients[1], mode=mode, seed=3), 20, np.random.default_rng(0))


@pytest.mark.parametrize("mode", MODES)
def test_info_fields_consistent_movielens(ml_clients, mode):
    for client in ml_clients[:3]:
        check_info(SlateRecEnv(client, mode=mode, seed=3), 5, np.random.default_rng(1))


def test_synthetic_oracle_beats_random_by_a_wide_margin():
    client = make_synthetic_clients(num_clients=1, users_per_client=4, seed=0)[0]
    env = SlateRecEnv(client, seed=0)
    rng = np.random.default_rng(0)
    hits = {"oracle": [], "random": []}
    for policy in hits:
        env.reset(seed=1)
        for _ in range(100):
            obs, info = env.reset()
            user = env.users[info["user_index"]]
            done = False
            while not done:
                cands = obs["candidate_items"]
                if policy == "oracle":
                    action = int(np.argmax(user.true_ratings[cands]))
                else:
                    action = int(rng.integers(env.slate_size))
                obs, _, done, _, info = env.step(action)
                if policy == "oracle":
                    assert action == info["oracle_action"]
                hits[policy].append(info["liked"])
    oracle, random = np.mean(hits["oracle"]), np.mean(hits["random"])
    assert len(hits["oracle"]) == len(hits["random"]) == 1000
    assert oracle >= random + 0.3, (oracle, random)
    assert oracle > 0.9


# ---------------------------------------------------------------------------------------------
# reward shaping
# ---------------------------------------------------------------------------------------------


def test_shaped_reward_is_r0_plus_lambda_h(syn_clients):
    client = syn_clients[0]
    inner = SlateRecEnv(client, seed=0)
    table = np.random.default_rng(0).normal(size=(inner.num_users, client.catalog.n_items + 1))
    env = ShapedRewardWrapper(inner, lam=0.7, reward_table=table)
    env.reset(seed=0)
    seen_engaged = set()
    for t in range(10):
        _, reward, _, _, info = env.step(t % 10)
        r0 = float(info["engaged"])
        h = table[info["user_index"], info["item"]]
        assert info["reward_intrinsic"] == r0
        assert info["reward_human"] == pytest.approx(h, abs=0)
        assert reward == pytest.approx(r0 + 0.7 * h, rel=1e-12)
        assert info["reward_shaped"] == reward
        seen_engaged.add(info["engaged"])
    assert seen_engaged == {True, False}  # both R⁰ = 0 and R⁰ = 1 were checked
    # λ and the table can be refreshed; without a table the reward is R⁰ alone.
    env.set_reward_table(table * 0 + 2.0, lam=0.25)
    env.reset(seed=1)
    _, reward, _, _, info = env.step(0)
    assert reward == pytest.approx(float(info["engaged"]) + 0.5)
    env.set_reward_table(None)
    _, reward, _, _, info = env.step(1)
    assert env.lam == 0.25
    assert reward == float(info["engaged"]) and info["reward_human"] == 0.0


# ---------------------------------------------------------------------------------------------
# temporal split
# ---------------------------------------------------------------------------------------------


def test_temporal_split_real_data(ml_data):
    ratings = ml_data.ratings
    split = temporal_split(ratings, heldout_fraction=0.2, min_ratings=50)
    counts = ratings.groupby("user").size()
    eligible = np.sort(counts[counts >= 50].index.to_numpy())
    assert np.array_equal(split.users, eligible)
    assert 0 < eligible.size < counts.size  # some users were dropped
    last_train = split.train.groupby("user")["timestamp"].max()
    first_held = split.heldout.groupby("user")["timestamp"].min()
    assert np.array_equal(last_train.index.to_numpy(), eligible)
    assert np.array_equal(first_held.index.to_numpy(), eligible)
    assert (first_held >= last_train).all()
    n_train = split.train.groupby("user").size()
    n_held = split.heldout.groupby("user").size()
    assert (n_train >= 1).all() and (n_held >= 1).all()
    total = counts[eligible]
    expected_held = np.clip(np.round(0.2 * total), 1, total - 1)
    assert np.array_equal(n_held.to_numpy(), expected_held.to_numpy())
    # Nothing lost or duplicated.
    both = pd.concat([split.train, split.heldout])
    assert len(both) == int(total.sum())
    assert not both.duplicated(["user", "item"]).any()


def test_temporal_split_edge_cases():
    ratings = pd.DataFrame(
        {
            "user": [1, 1, 2, 2, 2, 3, 4, 4, 4, 4],
            "item": [10, 11, 12, 11, 10, 10, 13, 12, 11, 10],
            "rating": [4.0, 3.0, 5.0, 2.0, 1.0, 3.0, 1.0, 2.0, 3.0, 4.0],
            "timestamp": [200, 100, 50, 50, 50, 10, 4, 3, 2, 1],
        }
    )
    # min_ratings below 2 is raised to 2: a single-rating user cannot be split.
    split = temporal_split(ratings, heldout_fraction=0.9, min_ratings=1)
    assert split.users.tolist() == [1, 2, 4]
    held = split.heldout.groupby("user")["item"].apply(list).to_dict()
    train = split.train.groupby("user")["item"].apply(list).to_dict()
    # user 1: the later rating (item 10 at t=200) is held out, one rating each side.
    assert train[1] == [11] and held[1] == [10]
    # user 2: all at the same time; ties broken by item id, the largest ids held out.
    assert train[2] == [10] and held[2] == [11, 12]
    # user 4: 90% of 4 rounds to 4, clipped to 3 so one training rating remains.
    assert train[4] == [10] and held[4] == [11, 12, 13]
    small = temporal_split(ratings, heldout_fraction=0.01, min_ratings=2)
    assert small.heldout.groupby("user").size().tolist() == [1, 1, 1]
    with pytest.raises(ValueError, match="heldout_fraction"):
        temporal_split(ratings, heldout_fraction=1.0)


# ---------------------------------------------------------------------------------------------
# client formation
# ---------------------------------------------------------------------------------------------


def _form(ml_data, **kwargs):
    return form_clients(ml_data.ratings, ml_data.movies, ml_data.genre_names, **kwargs)


def _user_ids(clients) -> list[tuple[int, ...]]:
    return [tuple(u.user_id for u in c.users) for c in clients]


def test_form_clients_is_deterministic_in_the_seed(ml_data):
    kwargs = dict(num_clients=6, formation="group", users_per_client=3, grouping="taste")
    a, b = _form(ml_data, seed=4, **kwargs), _form(ml_data, seed=4, **kwargs)
    assert _user_ids(a) == _user_ids(b)
    for ca, cb in zip(a, b):
        for ua, ub in zip(ca.users, cb.users):
            assert np.array_equal(ua.train_items, ub.train_items)
            assert np.array_equal(ua.heldout_ratings, ub.heldout_ratings)
    c = _form(ml_data, seed=5, **kwargs)
    assert _user_ids(c) != _user_ids(a)
    one_a, one_b = _form(ml_data, num_clients=10, seed=1), _form(ml_data, num_clients=10, seed=1)
    assert _user_ids(one_a) == _user_ids(one_b)


def test_one_user_formation_gives_distinct_users(ml_data):
    clients = _form(ml_data, num_clients=50, seed=0)
    assert [c.client_id for c in clients] == list(range(50))
    assert all(len(c.users) == 1 for c in clients)
    ids = [c.users[0].user_id for c in clients]
    assert len(set(ids)) == 50
    assert all(c.users[0].n_train >= 1 and c.users[0].n_heldout >= 1 for c in clients)
    assert all(c.rating_scale == (0.5, 5.0) for c in clients)


def test_group_formation_uses_disjoint_users(ml_data):
    clients = _form(ml_data, num_clients=12, formation="group", users_per_client=5, seed=2)
    ids = [u for group in _user_ids(clients) for u in group]
    assert len(ids) == 60 and len(set(ids)) == 60
    assert all(len(c.users) == 5 for c in clients)


def test_form_clients_rejects_too_many_users(ml_data):
    with pytest.raises(ValueError, match="need 700 users"):
        _form(ml_data, num_clients=700, seed=0)


def _genre_profile(user, features: np.ndarray, n_genres: int) -> np.ndarray:
    """Genre share of the user's liked training items minus that of all their training items."""
    genres = features[user.train_items, :n_genres]
    liked = user.train_ratings >= 4.0
    vec = genres[liked].mean(axis=0) - genres.mean(axis=0) if liked.any() else np.zeros(n_genres)
    return vec / max(np.linalg.norm(vec), 1e-8)


def _within_group_similarity(clients, n_genres: int) -> float:
    sims = []
    for client in clients:
        p = np.array([_genre_profile(u, client.catalog.features, n_genres) for u in client.users])
        s = p @ p.T
        n = len(p)
        sims.append((s.sum() - np.trace(s)) / (n * (n - 1)))
    return float(np.mean(sims))


def test_taste_grouping_is_more_homogeneous_than_random(ml_data):
    n_genres = len(ml_data.genre_names)
    kwargs = dict(num_clients=10, formation="group", users_per_client=10, seed=0)
    taste = _form(ml_data, grouping="taste", **kwargs)
    random = _form(ml_data, grouping="random", **kwargs)
    # Same users, only grouped differently.
    assert sorted(u for g in _user_ids(taste) for u in g) == sorted(u for g in _user_ids(random) for u in g)
    s_taste = _within_group_similarity(taste, n_genres)
    s_random = _within_group_similarity(random, n_genres)
    assert s_taste >= s_random + 0.1, (s_taste, s_random)


def test_catalogue_features_hold_no_heldout_information(ml_data):
    ratings = ml_data.ratings
    split = temporal_split(ratings)
    base = _form(ml_data, num_clients=5, seed=0)

    def modified(which: pd.DataFrame) -> pd.DataFrame:
        # Flip every rating of ``which`` (matched on user and item) to the other end of the scale.
        key = ratings.set_index(["user", "item"]).index
        mask = key.isin(which.set_index(["user", "item"]).index)
        out = ratings.copy()
        out.loc[mask, "rating"] = np.where(out.loc[mask, "rating"] >= 3.0, 0.5, 5.0).astype(np.float32)
        return out

    held_changed = form_clients(
        modified(split.heldout), ml_data.movies, ml_data.genre_names, num_clients=5, seed=0
    )
    assert np.array_equal(held_changed[0].catalog.features, base[0].catalog.features)
    # The change did reach the clients' held-out ratings ...
    assert not np.array_equal(held_changed[0].users[0].heldout_ratings, base[0].users[0].heldout_ratings)
    assert np.array_equal(held_changed[0].users[0].train_ratings, base[0].users[0].train_ratings)
    # ... while changing training ratings does change the features (so the check has teeth).
    train_changed = form_clients(
        modified(split.train.iloc[:500]), ml_data.movies, ml_data.genre_names, num_clients=5, seed=0
    )
    assert not np.array_equal(train_changed[0].catalog.features, base[0].catalog.features)
