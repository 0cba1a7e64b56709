"""Held-out evaluation of a slate policy on one client.

Two views, both on held-out interactions only:

* **Sessions**: the policy acts greedily (argmax score) in held-out sessions of every user;
  liked-hit rate, engagement and the human-reward part of the shaped return, next to the
  expected hit rate of a random pick and of the oracle on the very same slates.
* **Ranking**: the policy scores each user's held-out items (given the user's training
  history); NDCG@k and Spearman's ρ against the true ratings, and the paper's accuracy (an
  item is predicted liked when its score clears a per-user threshold fitted on the user's
  *training* items).

The metric functions are pure; the policy enters as a ``score_fn(obs_batch) -> (B, M)``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy.stats import spearmanr

from envs.rec_env import SlateRecEnv
from envs.types import ClientData

ScoreFn = Callable[[dict[str, np.ndarray]], np.ndarray]


def ndcg_at_k(scores: np.ndarray, ratings: np.ndarray, k: int) -> float:
    """NDCG@k of the ranking by ``scores`` with gains ``2^rating − 1``."""
    if scores.size == 0:
        return float("nan")
    k = min(k, scores.size)
    gains = np.exp2(ratings) - 1.0
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    dcg = gains[np.argsort(-scores, kind="stable")[:k]] @ discounts
    ideal = np.sort(gains)[::-1][:k] @ discounts
    return float(dcg / ideal) if ideal > 0 else float("nan")


def spearman(scores: np.ndarray, ratings: np.ndarray) -> float:
    """Spearman's ρ between scores and ratings (NaN when either is constant)."""
    if scores.size < 2 or np.ptp(ratings) == 0 or np.ptp(scores) == 0:
        return float("nan")
    return float(spearmanr(scores, ratings).statistic)


def fit_like_threshold(scores: np.ndarray, liked: np.ndarray) -> float:
    """The score threshold that best separates liked from not-liked training items.

    Candidates are the midpoints between adjacent distinct scores (and ±inf), so a threshold
    that separates the training items sits halfway between the classes, not on one of them.
    """
    distinct = np.unique(scores)
    candidates = np.concatenate([[-np.inf], (distinct[1:] + distinct[:-1]) / 2, [np.inf]])
    accuracy = (scores[None, :] >= candidates[:, None]) == liked[None, :]
    return float(candidates[int(np.argmax(accuracy.mean(axis=1)))])


def evaluate_client(
    score_fn: ScoreFn,
    client: ClientData,
    env_kwargs: dict,
    *,
    episodes_per_user: int = 5,
    ndcg_k: int = 10,
    seed: int = 0,
    reward_table: np.ndarray | None = None,
    lam: float = 0.0,
) -> dict[str, float]:
    """All held-out metrics of one client for one policy."""
    env = SlateRecEnv(client, mode="heldout", seed=seed, **env_kwargs)
    threshold = env.like_threshold
    liked, engaged, human, random_hit, oracle_hit, steps = 0.0, 0.0, 0.0, 0.0, 0.0, 0
    for user_index in range(env.num_users):
        for _ in range(episodes_per_user):
            obs, _ = env.reset(options={"user_index": user_index})
            done = False
            while not done:
                scores = score_fn({k: v[None] for k, v in obs.items()})[0]
                action = int(np.argmax(scores))
                obs, _, done, _, info = env.step(action)
                liked += info["liked"]
                engaged += info["engaged"]
                random_hit += float(np.mean(info["candidate_ratings"] >= threshold))
                oracle_hit += info["oracle_liked"]
                if reward_table is not None:
                    human += float(reward_table[user_index, info["item"]])
                steps += 1

    ndcgs, rhos, accuracies = [], [], []
    n_scored = 0
    for user_index, user in enumerate(env.users):
        held = score_fn(env.user_observation(user_index, user.heldout_items))[0]
        ndcgs.append(ndcg_at_k(held, user.heldout_ratings, ndcg_k))
        rhos.append(spearman(held, user.heldout_ratings))
        train = score_fn(env.user_observation(user_index, user.train_items))[0]
        cut = fit_like_threshold(train, user.train_ratings >= threshold)
        accuracies.append(float(np.mean((held >= cut) == (user.heldout_ratings >= threshold))))
        n_scored += user.n_heldout

    out = {
        "liked_hit_rate": liked / steps,
        "engagement_rate": engaged / steps,
        "random_hit_rate": random_hit / steps,
        "oracle_hit_rate": oracle_hit / steps,
        "ndcg": float(np.nanmean(ndcgs)) if not np.all(np.isnan(ndcgs)) else float("nan"),
        "spearman": float(np.nanmean(rhos)) if not np.all(np.isnan(rhos)) else float("nan"),
        "accuracy": float(np.mean(accuracies)),
        "num_heldout_items": float(n_scored),
        "num_eval_steps": float(steps),
    }
    if reward_table is not None:
        out["human_reward"] = human / steps
        out["shaped_return"] = (engaged + lam * human) / (steps / env.session_length)
    return out


def random_score_fn(seed: int) -> ScoreFn:
    """A uniformly random policy, as a baseline for the same evaluation."""
    rng = np.random.default_rng(seed)
    return lambda obs: rng.random(obs["candidate_items"].shape)
