"""Data records shared by the environments, the feedback simulator and the reward models.

Items are addressed by a dense index ``1..n_items``; index 0 is the padding item (all-zero
features) so that fixed-length histories can be padded without a mask column.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PAD_ITEM = 0


@dataclass(frozen=True)
class ItemCatalog:
    """Public item side information, identical on every client.

    Attributes:
        features: ``(n_items + 1, F)`` float32 item features; row 0 is the padding item.
        feature_names: one name per feature column.
        external_ids: ``(n_items + 1,)`` the dataset's own item ids (``movieId``); 0 for padding.
        titles: optional item titles (index-aligned with ``external_ids``).
    """

    features: np.ndarray
    feature_names: tuple[str, ...]
    external_ids: np.ndarray
    titles: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.features.ndim != 2 or self.features.shape[0] != self.external_ids.shape[0]:
            raise ValueError(
                f"catalog features {self.features.shape} do not match "
                f"{self.external_ids.shape[0]} item ids"
            )
        if self.features.shape[1] != len(self.feature_names):
            raise ValueError("one feature name per feature column is required")

    @property
    def n_items(self) -> int:
        """Number of real items (excluding the padding row)."""
        return int(self.features.shape[0] - 1)

    @property
    def n_features(self) -> int:
        return int(self.features.shape[1])


@dataclass(frozen=True)
class UserRecord:
    """One user's interactions, already split in time.

    Attributes:
        user_id: the dataset's own user id.
        train_items / train_ratings: earlier interactions (oldest first); the only ones that
            feedback, reward models, histories and training episodes may use.
        heldout_items / heldout_ratings: later interactions, used by evaluation only.
        true_ratings: ``(n_items + 1,)`` ground-truth rating of every item on the rating scale
            (synthetic data only; ``None`` for real data, where unrated items are unknown).
    """

    user_id: int
    train_items: np.ndarray
    train_ratings: np.ndarray
    heldout_items: np.ndarray
    heldout_ratings: np.ndarray
    true_ratings: np.ndarray | None = None

    @property
    def n_train(self) -> int:
        return int(self.train_items.shape[0])

    @property
    def n_heldout(self) -> int:
        return int(self.heldout_items.shape[0])

    def rated_items(self) -> np.ndarray:
        """All items this user interacted with, in either split."""
        return np.concatenate([self.train_items, self.heldout_items])


@dataclass(frozen=True)
class ClientData:
    """Everything one federated client owns: its users' interactions and the public catalogue.

    In the paper's setting a client is one user; in the cross-silo setting a group of users.
    """

    client_id: int
    users: tuple[UserRecord, ...]
    catalog: ItemCatalog
    rating_scale: tuple[float, float] = (0.5, 5.0)

    @property
    def n_train(self) -> int:
        return sum(u.n_train for u in self.users)

    @property
    def n_heldout(self) -> int:
        return sum(u.n_heldout for u in self.users)


def recent_history(
    user: UserRecord, history_length: int, rating_scale: tuple[float, float]
) -> tuple[np.ndarray, np.ndarray]:
    """The user's ``history_length`` most recent training items and their ratings scaled to
    [0, 1]: oldest first, right-padded with item 0 and rating 0.

    The policy's observation and the reward model's user context are both built from it.
    """
    lo, hi = rating_scale
    items = np.zeros(history_length, dtype=np.int64)
    ratings = np.zeros(history_length, dtype=np.float32)
    recent = user.train_items[-history_length:]
    items[: recent.size] = recent
    ratings[: recent.size] = (user.train_ratings[-history_length:] - lo) / (hi - lo)
    return items, ratings
