"""The client-local reward model H_k, fitted on the client's human feedback.

:class:`RewardNet` scores catalogue items for a user described by the user's recent training
history (the same ``history_items`` / ``history_ratings`` the slate env puts in its
observation). :class:`RewardModel` owns the net, its Adam optimizer (kept across rounds) and a
``torch.Generator`` for initialisation and shuffling; it fits on *all* feedback accumulated so
far with the Bradley–Terry loss ``-logsigmoid(s_chosen - s_rejected)`` (plus an MSE on scaled
direct ratings through a learned affine calibration), and exports the per-user
``reward_table`` that :class:`envs.rec_env.ShapedRewardWrapper` adds as ``λ·H``.

Evaluation helpers compare the model with a popularity-only baseline on the same held-out
pairs (pairs of one user's held-out items with different ratings). The reward model never
leaves its client: nothing here is aggregated.
"""

from __future__ import annotations

import math
import numbers
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from envs.types import ClientData, ItemCatalog, recent_history
from fedrlhf_ray.tasks.rec.feedback import FeedbackLog


def user_histories(client: ClientData, history_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Each user's ``history_length`` most recent training items and ratings scaled to [0, 1].

    Exactly the construction of :class:`envs.rec_env.SlateRecEnv`'s ``history_items`` /
    ``history_ratings``: oldest first, right-padded with item 0 and rating 0.
    Returns ``(items (U, H) int64, ratings (U, H) float32)``.
    """
    rows = [recent_history(user, history_length, client.rating_scale) for user in client.users]
    items = np.stack([r[0] for r in rows]).reshape(len(rows), history_length)
    ratings = np.stack([r[1] for r in rows]).reshape(len(rows), history_length)
    return items, ratings


def _init_linear(layer: nn.Linear, generator: torch.Generator) -> None:
    """PyTorch's default Linear initialisation, drawn from ``generator``."""
    nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=generator)
    bound = 1.0 / math.sqrt(layer.in_features)
    nn.init.uniform_(layer.bias, -bound, bound, generator=generator)


class RewardNet(nn.Module):
    """Scores items for users: ``score = MLP([item, user, item ⊙ user])``.

    * item representation: an MLP over ``[standardised catalogue features, item embedding]``;
    * user representation: the mean and the centred-rating-weighted mean of the history items'
      representations (items the user rated above its own average pull towards them);
    * the catalogue features are a non-trainable buffer (not part of the state dict: the
      catalogue is public and identical on every client).

    Parameters are created on the meta device and initialised from ``generator``, so building
    a net never touches torch's global random state.
    """

    features: torch.Tensor  # a buffer (register_buffer), typed for mypy

    def __init__(
        self,
        features: np.ndarray,
        *,
        hidden: int = 32,
        embedding_dim: int = 0,
        generator: torch.Generator,
    ) -> None:
        super().__init__()
        features = np.asarray(features, dtype=np.float32)
        n_rows, n_features = features.shape
        self.n_items = n_rows - 1
        self.hidden = hidden
        self.embedding_dim = embedding_dim
        meta = torch.device("meta")
        self.embedding = (
            nn.Embedding(n_rows, embedding_dim, padding_idx=0, device=meta)
            if embedding_dim > 0
            else None
        )
        self.item_in = nn.Linear(n_features + embedding_dim, hidden, device=meta)
        self.item_out = nn.Linear(hidden, hidden, device=meta)
        self.head_in = nn.Linear(5 * hidden, hidden, device=meta)
        self.head_out = nn.Linear(hidden, 1, device=meta)
        self.to_empty(device="cpu")
        for layer in (self.item_in, self.item_out, self.head_in, self.head_out):
            _init_linear(layer, generator)
        if self.embedding is not None:
            nn.init.normal_(self.embedding.weight, 0.0, 0.01, generator=generator)
            with torch.no_grad():
                self.embedding.weight[0].zero_()
        # Standardise feature columns over the real items; the padding row stays all-zero.
        real = features[1:]
        mean = real.mean(axis=0)
        std = real.std(axis=0)
        std = np.where(std > 1e-6, std, 1.0)
        scaled = np.zeros_like(features)
        scaled[1:] = (real - mean) / std
        self.register_buffer("features", torch.from_numpy(scaled), persistent=False)

    def item_repr(self, items: torch.Tensor) -> torch.Tensor:
        """``(..., hidden)`` representation of item indices of any shape."""
        x = self.features[items]
        if self.embedding is not None:
            x = torch.cat([x, self.embedding(items)], dim=-1)
        return self.item_out(F.relu(self.item_in(x)))

    def user_repr(self, history_items: torch.Tensor, history_ratings: torch.Tensor) -> torch.Tensor:
        """``(B, 2·hidden)``: mean and centred-rating-weighted mean of the history's items."""
        reps = self.item_repr(history_items)  # (B, H, d)
        mask = (history_items != 0).to(reps.dtype)  # (B, H)
        count = mask.sum(dim=1, keepdim=True).clamp_min(1.0)
        mean = (reps * mask.unsqueeze(-1)).sum(dim=1) / count
        centred = (history_ratings - (history_ratings * mask).sum(1, keepdim=True) / count) * mask
        weighted = (reps * centred.unsqueeze(-1)).sum(dim=1) / count
        return torch.cat([mean, weighted], dim=-1)

    def head(self, item_rep: torch.Tensor, user_rep: torch.Tensor) -> torch.Tensor:
        """Scores from item representations ``(..., d)`` and matching user ones ``(..., 2d)``."""
        d = self.hidden
        inter = torch.cat([item_rep * user_rep[..., :d], item_rep * user_rep[..., d:]], dim=-1)
        x = torch.cat([item_rep, user_rep, inter], dim=-1)
        return self.head_out(F.relu(self.head_in(x))).squeeze(-1)

    def forward(
        self, history_items: torch.Tensor, history_ratings: torch.Tensor, items: torch.Tensor
    ) -> torch.Tensor:
        """Scores ``(B, N)`` of ``items (B, N)`` for users with histories ``(B, H)``."""
        user = self.user_repr(history_items, history_ratings)
        item = self.item_repr(items)
        return self.head(item, user.unsqueeze(1).expand(-1, items.shape[1], -1))


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check(name: str, value, ok: bool, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


class RewardModel:
    """A client's reward model H_k: the net, its optimizer and its random generator.

    Args:
        catalog: the public item catalogue (its features become the net's buffer).
        hidden: hidden units of the item and scoring MLPs.
        embedding_dim: learned item embedding size (0 = catalogue features only).
        lr: Adam learning rate.
        weight_decay: Adam (L2) weight decay on all parameters.
        epochs: passes over all accumulated feedback per :meth:`fit`.
        batch_size: mini-batch size (pairs, and ratings alongside when present).
        history_length: H, the user-context length (same as the env's ``history_length``).
        rating_weight: weight of the direct-rating MSE relative to the pairwise loss.
        seed: seeds the ``torch.Generator`` used for initialisation and shuffling.
    """

    def __init__(
        self,
        catalog: ItemCatalog,
        *,
        hidden: int = 32,
        embedding_dim: int = 0,
        lr: float = 3e-3,
        weight_decay: float = 1e-4,
        epochs: int = 30,
        batch_size: int = 64,
        history_length: int = 10,
        rating_weight: float = 1.0,
        seed: int = 0,
    ) -> None:
        for name, value in (("hidden", hidden), ("epochs", epochs), ("batch_size", batch_size),
                            ("history_length", history_length)):
            _check(name, value, _is_int(value) and value >= 1, "an integer >= 1")
        _check("embedding_dim", embedding_dim, _is_int(embedding_dim) and embedding_dim >= 0,
               "an integer >= 0")
        _check("lr", lr, math.isfinite(lr) and lr > 0, "a finite number > 0")
        for name, number in (("weight_decay", weight_decay), ("rating_weight", rating_weight)):
            _check(name, number, math.isfinite(number) and number >= 0, "a finite number >= 0")
        hidden, embedding_dim, epochs, batch_size, history_length = (
            int(hidden), int(embedding_dim), int(epochs), int(batch_size), int(history_length)
        )
        self.config: dict[str, Any] = dict(
            hidden=hidden, embedding_dim=embedding_dim, lr=float(lr),
            weight_decay=float(weight_decay), epochs=epochs, batch_size=batch_size,
            history_length=history_length, rating_weight=float(rating_weight), seed=int(seed),
        )
        self.generator = torch.Generator().manual_seed(int(seed))
        self.net = RewardNet(
            catalog.features, hidden=hidden, embedding_dim=embedding_dim, generator=self.generator
        )
        # Affine calibration of the score onto the [0, 1]-scaled rating (direct feedback).
        self.calibration = nn.Parameter(torch.tensor([0.1, 0.5]))
        self.optimizer = torch.optim.Adam(
            [*self.net.parameters(), self.calibration], lr=lr, weight_decay=weight_decay
        )
        self.num_fits = 0

    @property
    def n_items(self) -> int:
        return self.net.n_items

    @property
    def is_fitted(self) -> bool:
        """Whether the model has been fitted on some feedback yet."""
        return self.num_fits > 0

    def _histories(self, client: ClientData) -> tuple[torch.Tensor, torch.Tensor]:
        if client.catalog.n_items != self.n_items:
            raise ValueError(
                f"client {client.client_id} has {client.catalog.n_items} items; "
                f"this reward model was built for {self.n_items}"
            )
        items, ratings = user_histories(client, self.config["history_length"])
        return torch.from_numpy(items), torch.from_numpy(ratings)

    def _scores(self, hist, users: torch.Tensor, *item_sets: torch.Tensor) -> list[torch.Tensor]:
        """Scores of each ``items[i]`` for ``users[i]``, for every tensor of ``item_sets``."""
        h_items, h_ratings = hist
        uniq, inverse = torch.unique(users, return_inverse=True)
        user_rep = self.net.user_repr(h_items[uniq], h_ratings[uniq])[inverse]
        return [self.net.head(self.net.item_repr(items), user_rep) for items in item_sets]

    def _losses(self, hist, pairs, ratings, lo: float, hi: float):
        """Bradley–Terry loss on pairs plus the rating MSE; also the pairs' margins."""
        loss = torch.zeros(())
        margin = None
        if pairs is not None:
            users, a, b, label = pairs
            s_a, s_b = self._scores(hist, users, a, b)
            sign = 2.0 * label - 1.0  # +1: a chosen, -1: b chosen
            margin = sign * (s_a - s_b)  # s_chosen - s_rejected
            loss = loss - F.logsigmoid(margin).mean()
        if ratings is not None:
            users, items, values = ratings
            (score,) = self._scores(hist, users, items)
            pred = self.calibration[0] * score + self.calibration[1]
            target = (values - lo) / (hi - lo)
            loss = loss + self.config["rating_weight"] * F.mse_loss(pred, target)
        return loss, margin

    def fit(self, log: FeedbackLog, client: ClientData) -> dict[str, float]:
        """Train on all accumulated feedback ``log`` for ``epochs`` passes; return metrics.

        Metrics (computed on the whole log after training): ``loss``, ``pair_accuracy``
        (train), ``margin`` (mean ``s_chosen - s_rejected``), ``num_pairs``, ``num_ratings``,
        ``fit_seconds``.
        """
        start = time.perf_counter()
        n_users = len(client.users)
        for name in ("pair_user", "rating_user"):
            users = getattr(log, name)
            if users.size and (users.min() < 0 or users.max() >= n_users):
                raise ValueError(f"feedback log {name} indexes users outside 0..{n_users - 1}")
        for name in ("pair_a", "pair_b", "rating_item"):
            items = getattr(log, name)
            if items.size and (items.min() < 1 or items.max() > self.n_items):
                raise ValueError(f"feedback log {name} holds items outside 1..{self.n_items}")
        hist = self._histories(client)
        lo, hi = client.rating_scale
        n_pairs, n_ratings = log.num_pairs, log.num_ratings
        pairs = (
            (torch.from_numpy(log.pair_user), torch.from_numpy(log.pair_a),
             torch.from_numpy(log.pair_b), torch.from_numpy(log.pair_label))
            if n_pairs else None
        )
        ratings = (
            (torch.from_numpy(log.rating_user), torch.from_numpy(log.rating_item),
             torch.from_numpy(log.rating_value))
            if n_ratings else None
        )
        if n_pairs == 0 and n_ratings == 0:
            return {"loss": float("nan"), "pair_accuracy": float("nan"), "margin": float("nan"),
                    "num_pairs": 0, "num_ratings": 0,
                    "fit_seconds": time.perf_counter() - start}

        bs = self.config["batch_size"]
        steps = math.ceil(max(n_pairs, n_ratings) / bs)
        self.net.train()
        for _ in range(self.config["epochs"]):
            pair_order = self._order(n_pairs, steps * bs)
            rating_order = self._order(n_ratings, steps * bs)
            for step in range(steps):
                batch = slice(step * bs, (step + 1) * bs)
                pb = tuple(t[pair_order[batch]] for t in pairs) if pairs else None
                rb = tuple(t[rating_order[batch]] for t in ratings) if ratings else None
                loss, _ = self._losses(hist, pb, rb, lo, hi)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
        self.num_fits += 1

        self.net.eval()
        with torch.no_grad():
            loss, margin = self._losses(hist, pairs, ratings, lo, hi)
        metrics = {
            "loss": float(loss),
            "pair_accuracy": float((margin > 0).float().mean() + 0.5 * (margin == 0).float().mean())
            if margin is not None else float("nan"),
            "margin": float(margin.mean()) if margin is not None else float("nan"),
            "num_pairs": n_pairs,
            "num_ratings": n_ratings,
            "fit_seconds": time.perf_counter() - start,
        }
        return metrics

    def _order(self, n: int, length: int) -> torch.Tensor:
        """Indices ``0..n-1`` in fresh random orders, repeated to ``length`` (empty if n=0)."""
        if n == 0:
            return torch.zeros(0, dtype=torch.long)
        reps = math.ceil(length / n)
        orders = [torch.randperm(n, generator=self.generator) for _ in range(reps)]
        return torch.cat(orders)[:length]

    @torch.no_grad()
    def _score_user(self, hist, user_idx: int, items: np.ndarray) -> np.ndarray:
        h_items, h_ratings = hist
        self.net.eval()
        items_t = torch.as_tensor(np.asarray(items, dtype=np.int64).reshape(1, -1))
        scores = self.net(h_items[user_idx : user_idx + 1], h_ratings[user_idx : user_idx + 1],
                          items_t)
        return scores[0].numpy().astype(np.float32)

    def score(self, client: ClientData, user_idx: int, items) -> np.ndarray:
        """Raw (unstandardised) scores of ``items`` for the client's user ``user_idx``."""
        if not 0 <= int(user_idx) < len(client.users):
            raise IndexError(f"user index {user_idx} out of range for {len(client.users)} users")
        return self._score_user(self._histories(client), int(user_idx), items)

    @torch.no_grad()
    def reward_table(self, client: ClientData) -> np.ndarray:
        """``(n_users, n_items + 1)`` float32 scores of every item for every user.

        Standardised per user over the user's training items (zero mean, unit std there), so
        that λ means the same on every client; column 0 (padding) is 0.
        """
        h_items, h_ratings = self._histories(client)
        self.net.eval()
        all_items = torch.arange(1, self.n_items + 1)
        item_rep = self.net.item_repr(all_items)  # shared by every user
        user_rep = self.net.user_repr(h_items, h_ratings)
        table = np.zeros((len(client.users), self.n_items + 1), dtype=np.float32)
        for row, user in enumerate(client.users):
            scores = self.net.head(item_rep, user_rep[row].expand(item_rep.shape[0], -1)).numpy()
            ref = scores[np.asarray(user.train_items, dtype=np.int64) - 1]
            mean = float(ref.mean()) if ref.size else 0.0
            std = float(ref.std()) if ref.size > 1 else 0.0
            table[row, 1:] = (scores - mean) / (std if std > 1e-8 else 1.0)
        return table

    def heldout_pairwise_accuracy(
        self,
        client: ClientData,
        max_pairs: int | None = None,
        rng: np.random.Generator | None = None,
    ) -> float:
        """Accuracy on pairs of one user's held-out items with different ratings (evaluation).

        Score ties count 0.5; NaN if the client has no such pair. See :func:`heldout_pairs`.
        """
        users, a, b, label = heldout_pairs(client, max_pairs=max_pairs, rng=rng)
        if label.size == 0:
            return float("nan")
        hist = self._histories(client)
        s_a = np.empty(label.size, np.float64)
        s_b = np.empty(label.size, np.float64)
        for u in np.unique(users):
            mask = users == u
            items, inverse = np.unique(np.concatenate([a[mask], b[mask]]), return_inverse=True)
            s = self._score_user(hist, int(u), items).astype(np.float64)
            k = int(mask.sum())
            s_a[mask], s_b[mask] = s[inverse[:k]], s[inverse[k:]]
        return pairwise_accuracy(s_a, s_b, label)

    def state_dict(self) -> dict[str, Any]:
        """Net, calibration, optimizer and generator state (for checkpoints)."""
        return {
            "net": self.net.state_dict(),
            "calibration": self.calibration.detach().clone(),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "num_fits": self.num_fits,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.net.load_state_dict(state["net"])
        with torch.no_grad():
            self.calibration.copy_(state["calibration"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.num_fits = int(state["num_fits"])

    def num_parameters(self, include_embedding: bool = True) -> int:
        return sum(
            p.numel()
            for name, p in self.net.named_parameters()
            if include_embedding or not name.startswith("embedding.")
        )


def heldout_pairs(
    client: ClientData,
    *,
    max_pairs: int | None = None,
    rng: np.random.Generator | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """All pairs of one user's held-out items with different ratings, over the client's users.

    Returns ``(users, items_a, items_b, labels)`` with ``labels = 1.0`` where ``a`` is rated
    higher. With ``max_pairs`` a uniform subsample of that many pairs is drawn from ``rng``
    (default: a fixed ``default_rng(0)``, so the same pairs are evaluated every time).
    """
    chunks = []
    for u, user in enumerate(client.users):
        items = np.asarray(user.heldout_items, dtype=np.int64)
        ratings = np.asarray(user.heldout_ratings, dtype=np.float64)
        i, j = np.triu_indices(items.size, k=1)
        keep = ratings[i] != ratings[j]
        i, j = i[keep], j[keep]
        chunks.append((np.full(i.size, u, np.int64), items[i], items[j],
                       (ratings[i] > ratings[j]).astype(np.float32)))
    if not chunks:
        empty = np.zeros(0, np.int64)
        return empty, empty, empty, np.zeros(0, np.float32)
    users, a, b, label = (np.concatenate(parts) for parts in zip(*chunks, strict=True))
    if max_pairs is not None and label.size > max_pairs:
        rng = np.random.default_rng(0) if rng is None else rng
        keep = np.sort(rng.choice(label.size, size=max_pairs, replace=False))
        users, a, b, label = users[keep], a[keep], b[keep], label[keep]
    return users, a, b, label


def pairwise_accuracy(scores_a, scores_b, labels) -> float:
    """Fraction of pairs ordered like ``labels`` (1: a better); score ties count 0.5."""
    diff = np.asarray(scores_a, np.float64) - np.asarray(scores_b, np.float64)
    sign = 2.0 * np.asarray(labels, np.float64) - 1.0
    agree = np.where(diff == 0, 0.5, (diff * sign > 0).astype(np.float64))
    return float(agree.mean()) if agree.size else float("nan")


def popularity_pairwise_accuracy(
    client: ClientData,
    feature: str | int = "popularity",
    *,
    max_pairs: int | None = None,
    rng: np.random.Generator | None = None,
) -> float:
    """The popularity-only baseline on the held-out pairs of :func:`heldout_pairs`.

    Ranks items by the catalogue column ``feature`` (a name in ``catalog.feature_names`` or a
    column index); ties count 0.5. NaN if the client has no held-out pair.
    """
    names = client.catalog.feature_names
    if isinstance(feature, str):
        if feature not in names:
            raise ValueError(f"feature {feature!r} is not a catalogue feature; have {names}")
        column = names.index(feature)
    else:
        column = int(feature)
        if not 0 <= column < len(names):
            raise ValueError(f"feature index {feature} out of range for {len(names)} features")
    _, a, b, label = heldout_pairs(client, max_pairs=max_pairs, rng=rng)
    values = client.catalog.features[:, column]
    return pairwise_accuracy(values[a], values[b], label)
