"""Turn a MovieLens ratings table into federated clients.

Per user, ratings are split in time: the earliest ``1 - heldout_fraction`` go to training and
feedback, the latest to held-out evaluation. Item features are public catalogue information
(genres, year) plus popularity and mean rating computed from the training ratings of users who
are not clients, so neither a held-out rating nor another client's rating reaches a feature.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.cluster.vq import kmeans2

from envs.types import ClientData, ItemCatalog, UserRecord

FORMATIONS = ("user", "group")
GROUPINGS = ("random", "taste")


class PartitionError(ValueError):
    """The requested clients cannot be formed from this data. The message is one line that
    names the parameter (as the config names it), the value and what the data allows."""


@dataclass(frozen=True)
class TemporalSplit:
    train: pd.DataFrame
    heldout: pd.DataFrame
    users: np.ndarray  # eligible users (at least ``min_ratings`` ratings), sorted


def temporal_split(
    ratings: pd.DataFrame, heldout_fraction: float = 0.2, min_ratings: int = 20
) -> TemporalSplit:
    """Split every user's ratings by time; users with fewer than ``min_ratings`` are dropped.

    Ties in time are broken by item id so that the split is deterministic. Every eligible
    user keeps at least one rating on each side.
    """
    if not 0.0 < heldout_fraction < 1.0:
        raise PartitionError(f"heldout_fraction: got {heldout_fraction} — must lie in (0, 1)")
    df = ratings.sort_values(["user", "timestamp", "item"], kind="stable")
    counts = df.groupby("user", sort=True)["item"].transform("size")
    df = df[counts >= max(min_ratings, 2)]
    counts = counts[df.index]
    position = df.groupby("user", sort=False).cumcount()
    n_held = np.clip(np.round(heldout_fraction * counts).astype(np.int64), 1, counts - 1)
    is_held = position >= counts - n_held
    users = np.sort(df["user"].unique())
    return TemporalSplit(
        train=df[~is_held].reset_index(drop=True),
        heldout=df[is_held].reset_index(drop=True),
        users=users,
    )


def build_catalog(movies: pd.DataFrame, genre_names: tuple[str, ...], train: pd.DataFrame):
    """Item features: genre flags, scaled year, log-popularity and centred mean rating.

    ``train`` holds the ratings the statistics are computed from (possibly none).

    Returns the catalogue and a mapping from the dataset's movie id to the dense item index.
    """
    movies = movies.sort_values("item").reset_index(drop=True)
    n = len(movies)
    index_of = pd.Series(np.arange(1, n + 1, dtype=np.int64), index=movies["item"].to_numpy())
    genre_cols = [f"genre:{g}" for g in genre_names]
    stats = train.groupby("item")["rating"].agg(["size", "mean"])
    counts = stats["size"].reindex(movies["item"]).fillna(0).to_numpy()
    means = stats["mean"].reindex(movies["item"]).to_numpy()
    global_mean = float(train["rating"].mean()) if len(train) else 0.0
    year = movies["year"].to_numpy(dtype=np.float64)
    year = np.where(np.isnan(year), np.nanmedian(year), year)

    features = np.zeros((n + 1, len(genre_cols) + 3), dtype=np.float32)
    features[1:, : len(genre_cols)] = movies[genre_cols].to_numpy(dtype=np.float32)
    features[1:, -3] = (year - 1990.0) / 20.0
    features[1:, -2] = np.log1p(counts) / np.log1p(max(counts.max(), 1.0))
    features[1:, -1] = np.where(np.isnan(means), 0.0, means - global_mean)
    catalog = ItemCatalog(
        features=features,
        feature_names=tuple(genre_cols) + ("year", "popularity", "mean_rating"),
        external_ids=np.concatenate([[0], movies["item"].to_numpy(dtype=np.int64)]),
        titles=("",) + tuple(movies["title"].astype(str)),
    )
    return catalog, index_of


def _user_records(split: TemporalSplit, index_of: pd.Series) -> dict[int, UserRecord]:
    records = {}
    train_groups = split.train.groupby("user", sort=False)
    held_groups = split.heldout.groupby("user", sort=False)
    for user, train in train_groups:
        held = held_groups.get_group(user)
        records[int(user)] = UserRecord(
            user_id=int(user),
            train_items=index_of.loc[train["item"].to_numpy()].to_numpy(),
            train_ratings=train["rating"].to_numpy(dtype=np.float32),
            heldout_items=index_of.loc[held["item"].to_numpy()].to_numpy(),
            heldout_ratings=held["rating"].to_numpy(dtype=np.float32),
        )
    return records


def _taste_vectors(records: list[UserRecord], catalog: ItemCatalog, n_genres: int) -> np.ndarray:
    """Each user's centred-rating-weighted genre profile, for clustering users by taste."""
    out = np.zeros((len(records), n_genres))
    for row, user in enumerate(records):
        weights = user.train_ratings - user.train_ratings.mean()
        out[row] = weights @ catalog.features[user.train_items, :n_genres]
        out[row] /= max(np.linalg.norm(out[row]), 1e-8)
    return out


def form_clients(
    ratings: pd.DataFrame,
    movies: pd.DataFrame,
    genre_names: tuple[str, ...],
    *,
    num_clients: int,
    formation: str = "user",
    users_per_client: int = 1,
    grouping: str = "random",
    heldout_fraction: float = 0.2,
    min_ratings: int = 20,
    rating_scale: tuple[float, float] = (0.5, 5.0),
    seed: int = 0,
) -> list[ClientData]:
    """Choose users deterministically from ``seed`` and assemble ``num_clients`` clients.

    ``formation="user"``: one user per client (the paper's setting). ``formation="group"``:
    ``users_per_client`` users per client, either random groups or groups of similar taste
    (k-means on genre profiles, then contiguous chunks in cluster order) — the heterogeneity
    knob of the cross-silo setting.
    """
    if formation not in FORMATIONS:
        raise PartitionError(f"formation: got {formation!r} — allowed: {', '.join(FORMATIONS)}")
    if grouping not in GROUPINGS:
        raise PartitionError(f"grouping: got {grouping!r} — allowed: {', '.join(GROUPINGS)}")
    per_client = 1 if formation == "user" else users_per_client
    for name, value in (("num_clients", num_clients), ("users_per_client", per_client)):
        if value < 1:
            raise PartitionError(f"{name}: got {value} — must be >= 1")
    split = temporal_split(ratings, heldout_fraction, min_ratings)
    needed = num_clients * per_client
    if needed > split.users.size:
        if split.users.size == 0:
            most = int(ratings.groupby("user").size().max()) if len(ratings) else 0
            raise PartitionError(
                f"min_ratings: got {min_ratings} — no user has {max(min_ratings, 2)} ratings "
                f"(the most any user has is {most})"
            )
        raise PartitionError(
            f"num_clients: got {num_clients} — {num_clients} clients x {per_client} users need {needed} users "
            f"with at least {min_ratings} ratings (min_ratings); the data has {split.users.size}"
        )
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xC11E]))
    chosen = np.sort(rng.choice(split.users, size=needed, replace=False))
    keep = split.train["user"].isin(chosen)
    # Popularity and mean rating are public catalogue statistics, so they come from the
    # training ratings of users who are NOT clients: no client's rating reaches another
    # client through a feature (with every user a client they are all zero).
    catalog, index_of = build_catalog(movies, genre_names, split.train[~keep])
    split = TemporalSplit(
        train=split.train[keep],
        heldout=split.heldout[split.heldout["user"].isin(chosen)],
        users=chosen,
    )
    records = _user_records(split, index_of)
    ordered = [records[int(u)] for u in chosen]
    if formation == "group" and grouping == "taste":
        taste = _taste_vectors(ordered, catalog, len(genre_names))
        _, labels = kmeans2(taste, num_clients, seed=int(rng.integers(2**31)), minit="++")
        ordered = [ordered[i] for i in np.lexsort((taste[:, 0], labels))]
    else:
        ordered = [ordered[i] for i in rng.permutation(len(ordered))]
    return [
        ClientData(
            client_id=k,
            users=tuple(ordered[k * per_client : (k + 1) * per_client]),
            catalog=catalog,
            rating_scale=rating_scale,
        )
        for k in range(num_clients)
    ]

