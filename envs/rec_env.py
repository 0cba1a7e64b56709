"""The slate recommendation environment shared by the synthetic and the MovieLens tasks.

An episode is one session of one of the client's users. At every step the env shows a slate
of ``slate_size`` candidates: ``positives_per_slate`` items the user watched (from the training
split in ``train`` mode, from the held-out split in ``heldout`` mode) mixed with items the user
never rated. The agent picks one; the intrinsic reward R⁰ is engagement (the pick was watched).
``info`` carries what evaluation needs: every candidate's true rating (NaN where unknown),
whether the pick was liked and the oracle's pick (unknown ratings are reported as
``UNKNOWN_RATING`` = 0.0).

The whole session's slates are drawn at ``reset`` in a few vectorised calls, so a step is only
indexing: this keeps the env far above 10k steps/s on one core.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

from envs.types import PAD_ITEM, ClientData, recent_history

MODES = ("train", "heldout")
# Rating reported for candidates whose rating is unknown (MovieLens items the user never
# rated); below every rating scale, and finite so that infos compare equal across runs.
UNKNOWN_RATING = 0.0


class SlateRecEnv(gym.Env):
    """Pick one item from a slate of candidates for one of the client's users.

    Observation (``Dict``):
        history_items ``(H,)`` int64 — the user's ``H`` most recent training items (0 = padding);
        history_ratings ``(H,)`` float32 — their ratings scaled to [0, 1] (0 for padding);
        history_features ``(H, F)`` float32 — their catalogue features;
        candidate_items ``(M,)`` int64 and candidate_features ``(M, F)`` float32.
    Action: ``Discrete(M)``, the slate position picked.
    """

    metadata = {"render_modes": []}  # noqa: RUF012 - gymnasium's Env declares it a plain dict attribute

    def __init__(
        self,
        client: ClientData,
        *,
        slate_size: int = 10,
        session_length: int = 10,
        history_length: int = 10,
        positives_per_slate: int = 3,
        mode: str = "train",
        like_threshold: float = 4.0,
        seed: int | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not 0 <= positives_per_slate <= slate_size:
            raise ValueError("positives_per_slate must lie in [0, slate_size]")
        self.client = client
        self.slate_size = slate_size
        self.session_length = session_length
        self.history_length = history_length
        self.positives_per_slate = positives_per_slate
        self.mode = mode
        self.like_threshold = like_threshold

        catalog = client.catalog
        self._features = catalog.features
        self._n_items = catalog.n_items
        n_features = catalog.n_features
        f_lo, f_hi = float(catalog.features.min()), float(catalog.features.max())
        self.set_client(client)

        self.observation_space = gym.spaces.Dict(
            {
                "history_items": gym.spaces.Box(0, self._n_items, (history_length,), np.int64),
                "history_ratings": gym.spaces.Box(0.0, 1.0, (history_length,), np.float32),
                "history_features": gym.spaces.Box(
                    f_lo, f_hi, (history_length, n_features), np.float32
                ),
                "candidate_items": gym.spaces.Box(1, self._n_items, (slate_size,), np.int64),
                "candidate_features": gym.spaces.Box(
                    f_lo, f_hi, (slate_size, n_features), np.float32
                ),
            }
        )
        self.action_space = gym.spaces.Discrete(slate_size)
        self._rng = np.random.default_rng(seed)
        self._user_index = 0
        self._t = 0
        self._slates = np.zeros((session_length, slate_size), dtype=np.int64)

    def set_client(self, client: ClientData) -> None:
        """Serve another client over the same catalogue (pooled actors swap virtual clients).

        The next :meth:`reset` starts a session of the new client's users.
        """
        if client.catalog.features.shape != self._features.shape:
            raise ValueError("a swapped-in client must share the env's item catalogue")
        self.client = client
        # User indices must match the rows of the client's reward table, so a user without
        # interactions in this split is an error rather than silently skipped.
        self._users = list(client.users)
        empty = [u.user_id for u in self._users if self._positives(u).size == 0]
        if empty or not self._users:
            raise ValueError(
                f"client {client.client_id}: users {empty} have no {self.mode} interactions"
            )
        # Per-user constants, computed once: the history part of the observation, the
        # rated-item mask for negative sampling and the rating lookup for candidates.
        self._history = []
        self._rated = []
        self._ratings = []
        for user in self._users:
            items, ratings = recent_history(user, self.history_length, client.rating_scale)
            self._history.append((items, ratings, self._features[items]))
            # What the env may know depends on the mode: a training session knows only the
            # training split (a later-watched item may be shown as unwatched, as it was then);
            # a held-out session knows both splits, so no watched item poses as a negative.
            known_items = user.train_items if self.mode == "train" else user.rated_items()
            rated = np.zeros(self._n_items + 1, dtype=bool)
            rated[known_items] = True
            rated[PAD_ITEM] = True
            if (~rated).sum() < self.slate_size:
                raise ValueError(
                    f"user {user.user_id} rated all but {(~rated).sum()} items: too few to fill "
                    f"a slate of {self.slate_size} with unrated candidates"
                )
            self._rated.append(rated)
            if user.true_ratings is not None:
                lookup = np.nan_to_num(user.true_ratings.astype(np.float32), nan=UNKNOWN_RATING)
            else:
                lookup = np.full(self._n_items + 1, UNKNOWN_RATING, dtype=np.float32)
                lookup[user.train_items] = user.train_ratings
                if self.mode == "heldout":
                    lookup[user.heldout_items] = user.heldout_ratings
            self._ratings.append(lookup)
        self._user_index = 0

    def _positives(self, user) -> np.ndarray:
        return user.train_items if self.mode == "train" else user.heldout_items

    @property
    def num_users(self) -> int:
        return len(self._users)

    @property
    def users(self) -> list:
        """The client's users; ``user_index`` values index this list."""
        return list(self._users)

    def user_observation(self, user_index: int, items: np.ndarray) -> dict[str, np.ndarray]:
        """A batch-of-one observation that presents ``items`` (any number) to a user."""
        hist_items, hist_ratings, hist_features = self._history[user_index]
        return {
            "history_items": hist_items[None],
            "history_ratings": hist_ratings[None],
            "history_features": hist_features[None],
            "candidate_items": items[None],
            "candidate_features": self._features[items][None],
        }

    @property
    def user_index(self) -> int:
        """Index (into ``client.users``) of the user of the current session."""
        return self._user_index

    def _draw_session(self) -> None:
        rng = self._rng
        user = self._users[self._user_index]
        T, M, P = self.session_length, self.slate_size, self.positives_per_slate
        pool = self._positives(user)
        n_pos = min(P, pool.size)
        # Candidates within a slate are distinct: positives without replacement per slate,
        # negatives resampled until no slate repeats an item or shows a rated one.
        positives = np.stack([rng.choice(pool, size=n_pos, replace=False) for _ in range(T)])
        negatives = rng.integers(1, self._n_items + 1, size=(T, M - n_pos))
        rated = self._rated[self._user_index]
        while True:
            bad = rated[negatives]
            ordered = np.sort(negatives, axis=1)
            bad |= (ordered[:, 1:] == ordered[:, :-1]).any(axis=1, keepdims=True)
            if not bad.any():
                break
            negatives[bad] = rng.integers(1, self._n_items + 1, size=int(bad.sum()))
        slates = np.concatenate([positives, negatives], axis=1)
        order = np.argsort(rng.random((T, M)), axis=1)
        self._slates = np.take_along_axis(slates, order, axis=1)
        self._watched = np.take_along_axis(
            np.concatenate([np.ones((T, n_pos), bool), np.zeros((T, M - n_pos), bool)], axis=1),
            order,
            axis=1,
        )
        self._slate_ratings = self._ratings[self._user_index][self._slates]
        self._slate_features = self._features[self._slates]

    def _obs(self) -> dict[str, np.ndarray]:
        items, ratings, features = self._history[self._user_index]
        t = min(self._t, self.session_length - 1)
        return {
            "history_items": items,
            "history_ratings": ratings,
            "history_features": features,
            "candidate_items": self._slates[t],
            "candidate_features": self._slate_features[t],
        }

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        if seed is not None:
            self._rng = np.random.default_rng(seed)
        self._user_index = int(self._rng.integers(self.num_users))
        if options and "user_index" in options:
            self._user_index = int(options["user_index"])
        self._t = 0
        self._draw_session()
        return self._obs(), {"user_index": self._user_index}

    def step(self, action):
        a = int(action)
        t = self._t
        ratings = self._slate_ratings[t]
        picked_rating = float(ratings[a])
        engaged = bool(self._watched[t, a])
        liked_mask = ratings >= self.like_threshold
        info: dict[str, Any] = {
            "user_index": self._user_index,
            "item": int(self._slates[t, a]),
            "engaged": engaged,
            "liked": bool(liked_mask[a]),
            "picked_rating": picked_rating,
            "candidate_ratings": ratings,
            "oracle_action": int(np.argmax(ratings)),
            "oracle_liked": bool(liked_mask.any()),
        }
        self._t += 1
        terminated = self._t >= self.session_length
        return self._obs(), float(engaged), terminated, False, info


class ShapedRewardWrapper(gym.Wrapper):
    """R = R⁰ + λ·H: adds the client's learned human-feedback reward to the engagement reward.

    ``reward_table[u, i]`` is the reward model's score of item ``i`` for the client's user
    ``u`` (histories are fixed within a session, so the score depends on user and item only).
    Refreshed with :meth:`set_reward_table` whenever the client refits its reward model.
    """

    def __init__(self, env: gym.Env, lam: float = 0.0, reward_table: np.ndarray | None = None):
        super().__init__(env)
        self.lam = float(lam)
        self.reward_table = reward_table

    def set_reward_table(self, reward_table: np.ndarray | None, lam: float | None = None) -> None:
        self.reward_table = reward_table
        if lam is not None:
            self.lam = float(lam)

    def step(self, action):
        obs, r0, terminated, truncated, info = self.env.step(action)
        h = 0.0
        if self.reward_table is not None:
            h = float(self.reward_table[info["user_index"], info["item"]])
        reward = float(r0) + self.lam * h
        info["reward_intrinsic"] = r0
        info["reward_human"] = h
        info["reward_shaped"] = reward
        return obs, reward, terminated, truncated, info
