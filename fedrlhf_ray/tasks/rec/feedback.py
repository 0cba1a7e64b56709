"""The simulated human of one client, the query selectors and the per-round feedback loop.

A client's human knows only the client's *training* ratings (``UserRecord.train_items`` /
``train_ratings``); held-out ratings are for evaluation and are never queried. It answers

* pairwise queries "is item a better than item b for this user?" with Bradley–Terry noise:
  ``P(a ≻ b) = sigmoid(beta * (r_a - r_b))`` on the client's rating scale (``beta = 0`` is a
  coin flip, ``beta → ∞`` always agrees with the ratings);
* direct rating queries with Gaussian noise of std ``rating_noise``, clipped to the scale.

Which queries are asked is the client's choice (:class:`RandomQueries`,
:class:`UncertaintyQueries`); :func:`collect_feedback` runs one round of it within a budget.
All randomness of a client's feedback process — which queries and the human's answers — comes
from the human's own ``numpy.random.Generator``, so :meth:`SimulatedHuman.state` is the one
thing a checkpoint needs to reproduce the rest of a run. Everything here is pure NumPy and
picklable (it travels into Ray actors).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Protocol

import numpy as np

from envs.types import ClientData

FEEDBACK_KINDS = ("pairwise", "rating", "both")


def _as_int(values) -> np.ndarray:
    return np.asarray(values, dtype=np.int64).reshape(-1)


def _as_float(values) -> np.ndarray:
    return np.asarray(values, dtype=np.float32).reshape(-1)


@dataclass(frozen=True)
class FeedbackLog:
    """A client's feedback, as parallel arrays (one entry per answered query).

    Attributes:
        pair_user: index into ``client.users`` of the user asked each pairwise query.
        pair_a / pair_b: the two items compared (catalogue indices).
        pair_label: 1.0 if the user preferred ``a`` over ``b``, else 0.0.
        rating_user: index into ``client.users`` of the user asked each rating query.
        rating_item: the item rated.
        rating_value: the (noisy) rating given, on the client's rating scale.
    """

    pair_user: np.ndarray
    pair_a: np.ndarray
    pair_b: np.ndarray
    pair_label: np.ndarray
    rating_user: np.ndarray
    rating_item: np.ndarray
    rating_value: np.ndarray

    def __post_init__(self) -> None:
        for name in ("pair_user", "pair_a", "pair_b", "rating_user", "rating_item"):
            object.__setattr__(self, name, _as_int(getattr(self, name)))
        for name in ("pair_label", "rating_value"):
            object.__setattr__(self, name, _as_float(getattr(self, name)))
        n_pairs = {self.pair_user.size, self.pair_a.size, self.pair_b.size, self.pair_label.size}
        if len(n_pairs) != 1:
            raise ValueError(f"pairwise arrays of FeedbackLog differ in length: {sorted(n_pairs)}")
        n_rat = {self.rating_user.size, self.rating_item.size, self.rating_value.size}
        if len(n_rat) != 1:
            raise ValueError(f"rating arrays of FeedbackLog differ in length: {sorted(n_rat)}")

    @classmethod
    def empty(cls) -> FeedbackLog:
        none_i, none_f = np.zeros(0, np.int64), np.zeros(0, np.float32)
        return cls(none_i, none_i, none_i, none_f, none_i, none_i, none_f)

    @classmethod
    def from_pairs(cls, users, items_a, items_b, labels) -> FeedbackLog:
        """A log of pairwise answers only."""
        empty = cls.empty()
        return cls(users, items_a, items_b, labels, empty.rating_user, empty.rating_item,
                   empty.rating_value)

    @classmethod
    def from_ratings(cls, users, items, values) -> FeedbackLog:
        """A log of direct ratings only."""
        empty = cls.empty()
        return cls(empty.pair_user, empty.pair_a, empty.pair_b, empty.pair_label, users, items,
                   values)

    def extend(self, other: FeedbackLog) -> FeedbackLog:
        """A new log holding this log's entries followed by ``other``'s."""
        return FeedbackLog(
            **{
                f.name: np.concatenate([getattr(self, f.name), getattr(other, f.name)])
                for f in fields(self)
            }
        )

    @property
    def num_pairs(self) -> int:
        return int(self.pair_label.size)

    @property
    def num_ratings(self) -> int:
        return int(self.rating_value.size)

    def __len__(self) -> int:
        return self.num_pairs + self.num_ratings

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, FeedbackLog):
            return NotImplemented
        return all(
            np.array_equal(getattr(self, f.name), getattr(other, f.name)) for f in fields(self)
        )

    __hash__ = None  # type: ignore[assignment]  # arrays are not hashable (typeshed types __hash__ as a method)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    out = np.empty_like(x)
    pos = x >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-x[pos]))
    ex = np.exp(x[~pos])
    out[~pos] = ex / (1.0 + ex)
    return out


class SimulatedHuman:
    """The client's users, answering feedback queries from their training ratings.

    Args:
        client: the client whose users answer.
        beta: Bradley–Terry rationality (≥ 0) on the rating scale.
        rating_noise: std of the Gaussian noise on direct ratings (≥ 0).
        seed: an int, a ``SeedSequence`` or a ``numpy.random.Generator`` (used as is). The
            generator also drives query selection in :func:`collect_feedback`.
        flipped: a malicious client's human (``attack.kind: flipped_feedback``): every pairwise
            answer inverted, every rating mirrored on the rating scale (lo + hi − r).
    """

    def __init__(
        self,
        client: ClientData,
        *,
        beta: float = 5.0,
        rating_noise: float = 0.5,
        seed: int | np.random.SeedSequence | np.random.Generator = 0,
        flipped: bool = False,
    ) -> None:
        if not np.isfinite(beta) or beta < 0:
            raise ValueError(f"beta must be a finite number >= 0, got {beta!r}")
        if not np.isfinite(rating_noise) or rating_noise < 0:
            raise ValueError(f"rating_noise must be a finite number >= 0, got {rating_noise!r}")
        if seed is None:
            raise ValueError("seed is required (an int or a numpy Generator): runs must be seeded")
        self.client = client
        self.beta = float(beta)
        self.rating_noise = float(rating_noise)
        self.flipped = bool(flipped)
        self.rng = np.random.default_rng(seed)
        # What the human knows: per user, its training items (sorted) and their ratings.
        self._items: list[np.ndarray] = []
        self._ratings: list[np.ndarray] = []
        for user in client.users:
            items = np.asarray(user.train_items, dtype=np.int64)
            ratings = np.asarray(user.train_ratings, dtype=np.float64)
            # Keep the last rating of an item rated twice; sort for binary search.
            rev_items, rev_pos = np.unique(items[::-1], return_index=True)
            self._items.append(rev_items)
            self._ratings.append(ratings[::-1][rev_pos])

    @property
    def num_users(self) -> int:
        return len(self._items)

    def known_items(self, user_idx: int) -> np.ndarray:
        """The items user ``user_idx`` can give feedback on (its training items, sorted)."""
        return self._items[user_idx]

    def known_ratings(self, user_idx: int) -> np.ndarray:
        """The training ratings of :meth:`known_items` (the simulator's ground truth)."""
        return self._ratings[user_idx]

    def true_rating(self, user_idx, items) -> np.ndarray:
        """Noise-free training rating of each ``(user, item)``; raises for an item not known.

        ``user_idx`` is an int or an array broadcast against ``items``.
        """
        items = _as_int(items)
        users = np.broadcast_to(np.asarray(user_idx, dtype=np.int64), items.shape)
        out = np.empty(items.size, dtype=np.float64)
        for u in np.unique(users):
            if not 0 <= u < self.num_users:
                raise IndexError(f"user index {u} out of range for {self.num_users} users")
            mask = users == u
            known = self._items[u]
            pos = np.minimum(np.searchsorted(known, items[mask]), known.size - 1)
            found = known[pos] == items[mask]
            if not found.all():
                bad = items[mask][~found][:5].tolist()
                raise ValueError(
                    f"user {u} of client {self.client.client_id} has no training rating for "
                    f"items {bad}: the simulated human only answers about training items"
                )
            out[mask] = self._ratings[u][pos]
        return out

    def preference_probability(self, user_idx, items_a, items_b) -> np.ndarray:
        """Bradley–Terry ``P(a ≻ b) = sigmoid(beta * (r_a - r_b))`` of each query."""
        diff = self.true_rating(user_idx, items_a) - self.true_rating(user_idx, items_b)
        return _sigmoid(self.beta * diff)

    def answer_pairs(self, user_idx, items_a, items_b) -> np.ndarray:
        """Answer pairwise queries: 1.0 where the user prefers ``a`` over ``b``, else 0.0."""
        items_a, items_b = _as_int(items_a), _as_int(items_b)
        if items_a.shape != items_b.shape:
            raise ValueError(f"items_a {items_a.shape} and items_b {items_b.shape} differ in shape")
        p = self.preference_probability(user_idx, items_a, items_b)
        answers = (self.rng.random(p.size) < p).astype(np.float32)
        return 1.0 - answers if self.flipped else answers

    def rate(self, user_idx, items) -> np.ndarray:
        """Direct ratings: training rating + N(0, rating_noise²), clipped to the rating scale."""
        truth = self.true_rating(user_idx, items)
        lo, hi = self.client.rating_scale
        noisy = np.clip(truth + self.rating_noise * self.rng.standard_normal(truth.size), lo, hi)
        return (lo + hi - noisy if self.flipped else noisy).astype(np.float32)

    def state(self) -> dict:
        """A snapshot of the random state (a copy of the generator's ``bit_generator.state``)."""
        return {"bit_generator": _copy_state(self.rng.bit_generator.state)}

    def set_state(self, state: dict) -> None:
        """Restore a snapshot taken by :meth:`state`."""
        self.rng.bit_generator.state = _copy_state(state["bit_generator"])


def _copy_state(state: Mapping[str, Any]) -> dict[str, Any]:
    return {k: (_copy_state(v) if isinstance(v, dict) else v) for k, v in state.items()}


class Scorer(Protocol):
    """What query selection needs from a reward model."""

    def score(self, client: ClientData, user_idx: int, items: np.ndarray) -> np.ndarray: ...


class QuerySelector(Protocol):
    """Chooses which queries a client asks (see :class:`RandomQueries`)."""

    def select_pairs(
        self, human: SimulatedHuman, budget: int, rng: np.random.Generator,
        reward_model: Scorer | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...

    def select_items(
        self, human: SimulatedHuman, budget: int, rng: np.random.Generator,
        reward_model: Scorer | None = None,
    ) -> tuple[np.ndarray, np.ndarray]: ...


def _has_preference(ratings: np.ndarray) -> bool:
    return ratings.size > 1 and bool(ratings.min() < ratings.max())


def _spread_users(rng: np.random.Generator, users: np.ndarray, n: int) -> np.ndarray:
    """``n`` user indices cycling through a random order of ``users`` (counts differ by ≤ 1)."""
    return np.resize(rng.permutation(users), n)


def random_pairs(
    human: SimulatedHuman, n: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` random candidate pairs: two training items of one user with different ratings.

    Users whose training ratings are all equal (no preference to ask about) are skipped; the
    pairs are spread evenly over the other users. Returns ``(users, items_a, items_b)``.
    """
    eligible = np.array(
        [u for u in range(human.num_users) if _has_preference(human.known_ratings(u))],
        dtype=np.int64,
    )
    if n <= 0 or eligible.size == 0:
        if n > 0:
            raise ValueError(
                f"client {human.client.client_id} has no user with two different training "
                "ratings: no pairwise query can be asked"
            )
        empty = np.zeros(0, np.int64)
        return empty, empty, empty
    users = _spread_users(rng, eligible, n)
    items_a = np.empty(n, np.int64)
    items_b = np.empty(n, np.int64)
    for u in np.unique(users):
        mask = np.flatnonzero(users == u)
        known, ratings = human.known_items(u), human.known_ratings(u)
        pa = rng.integers(ratings.size, size=mask.size)
        pb = rng.integers(ratings.size, size=mask.size)
        tie = ratings[pa] == ratings[pb]
        while tie.any():  # rejection sampling: ties carry no preference
            k = int(tie.sum())
            pa[tie] = rng.integers(ratings.size, size=k)
            pb[tie] = rng.integers(ratings.size, size=k)
            tie = ratings[pa] == ratings[pb]
        items_a[mask], items_b[mask] = known[pa], known[pb]
    return users, items_a, items_b


def random_items(
    human: SimulatedHuman, n: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` random (user, training item) rating queries, spread evenly over the users."""
    eligible = np.array(
        [u for u in range(human.num_users) if human.known_items(u).size > 0], dtype=np.int64
    )
    if n <= 0 or eligible.size == 0:
        if n > 0:
            raise ValueError(f"client {human.client.client_id} has no training interaction")
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    users = _spread_users(rng, eligible, n)
    items = np.empty(n, np.int64)
    for u in np.unique(users):
        mask = users == u
        known = human.known_items(u)
        items[mask] = known[rng.integers(known.size, size=int(mask.sum()))]
    return users, items


class RandomQueries:
    """Ask uniformly random queries (pairs of a user's training items with different ratings)."""

    def select_pairs(
        self,
        human: SimulatedHuman,
        budget: int,
        rng: np.random.Generator,
        reward_model: Scorer | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return random_pairs(human, budget, rng)

    def select_items(
        self,
        human: SimulatedHuman,
        budget: int,
        rng: np.random.Generator,
        reward_model: Scorer | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        return random_items(human, budget, rng)

    def __repr__(self) -> str:
        return "RandomQueries()"


class UncertaintyQueries(RandomQueries):
    """Active learning: ask the pairs the current reward model is least sure about.

    Draws ``pool_factor × budget`` random candidate pairs, scores both items with the reward
    model and keeps the ``budget`` pairs with the smallest ``|score_a − score_b|``. Without a
    (fitted) reward model it falls back to random pairs. Rating queries stay random.
    """

    def __init__(self, pool_factor: int = 4) -> None:
        if int(pool_factor) != pool_factor or pool_factor < 1:
            raise ValueError(f"pool_factor must be an integer >= 1, got {pool_factor!r}")
        self.pool_factor = int(pool_factor)

    def select_pairs(
        self,
        human: SimulatedHuman,
        budget: int,
        rng: np.random.Generator,
        reward_model: Scorer | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if reward_model is None or not getattr(reward_model, "is_fitted", True):
            return random_pairs(human, budget, rng)
        users, a, b = random_pairs(human, self.pool_factor * budget, rng)
        margin = np.empty(users.size, np.float64)
        for u in np.unique(users):
            mask = users == u
            items, inverse = np.unique(np.concatenate([a[mask], b[mask]]), return_inverse=True)
            scores = np.asarray(reward_model.score(human.client, int(u), items), np.float64)
            k = int(mask.sum())
            margin[mask] = np.abs(scores[inverse[:k]] - scores[inverse[k:]])
        keep = np.sort(np.argsort(margin, kind="stable")[:budget])
        return users[keep], a[keep], b[keep]

    def __repr__(self) -> str:
        return f"UncertaintyQueries(pool_factor={self.pool_factor})"


def collect_feedback(
    human: SimulatedHuman,
    selector: QuerySelector,
    *,
    budget: int,
    kind: str = "pairwise",
    reward_model: Scorer | None = None,
) -> FeedbackLog:
    """One round of feedback: ``budget`` queries chosen by ``selector``, answered by ``human``.

    ``kind``: ``"pairwise"``, ``"rating"`` or ``"both"`` (``ceil(budget/2)`` pairwise queries
    and ``floor(budget/2)`` rating queries). Selection and answers draw from ``human.rng``.
    """
    if kind not in FEEDBACK_KINDS:
        raise ValueError(f"kind must be one of {FEEDBACK_KINDS}, got {kind!r}")
    if isinstance(budget, bool) or int(budget) != budget or budget < 0:
        raise ValueError(f"budget must be an integer >= 0, got {budget!r}")
    budget = int(budget)
    n_pairs = {"pairwise": budget, "rating": 0, "both": (budget + 1) // 2}[kind]
    n_ratings = budget - n_pairs
    rng = human.rng
    log = FeedbackLog.empty()
    if n_pairs:
        users, a, b = selector.select_pairs(human, n_pairs, rng, reward_model)
        log = log.extend(FeedbackLog.from_pairs(users, a, b, human.answer_pairs(users, a, b)))
    if n_ratings:
        users, items = selector.select_items(human, n_ratings, rng, reward_model)
        log = log.extend(FeedbackLog.from_ratings(users, items, human.rate(users, items)))
    return log
