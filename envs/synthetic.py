"""A synthetic recommendation world with known ground truth.

Users and items have latent taste vectors; a user's true rating of an item is a squashed dot
product plus an item quality term. Users belong to preference clusters; ``heterogeneity``
moves the clusters apart (0: every client has the same taste distribution, 1: clients' tastes
are unrelated). What a user watched is sampled from popularity and taste, so engagement (the
shared objective) and personal ratings (the human feedback) agree only partly, as they do in
MovieLens. Everything is derived from one seed.
"""

from __future__ import annotations

import numpy as np

from envs.types import ClientData, ItemCatalog, UserRecord

RATING_SCALE = (1.0, 5.0)


def _gumbel_top_k(rng: np.random.Generator, logits: np.ndarray, k: int) -> np.ndarray:
    """Sample ``k`` indices without replacement with probabilities ∝ exp(logits)."""
    keys = logits + rng.gumbel(size=logits.shape)
    return np.argpartition(-keys, k - 1)[:k]


def make_synthetic_clients(
    *,
    num_clients: int,
    users_per_client: int = 1,
    n_items: int = 300,
    latent_dim: int = 8,
    n_clusters: int = 4,
    heterogeneity: float = 0.7,
    feature_noise: float = 0.1,
    items_per_user: int = 60,
    heldout_fraction: float = 0.2,
    popularity_weight: float = 1.5,
    taste_weight: float = 0.2,
    home_cluster_prob: float = 0.5,
    seed: int = 0,
) -> list[ClientData]:
    """Generate ``num_clients`` clients of ``users_per_client`` users over one item catalogue.

    Each client has a home preference cluster (assigned round-robin); each of its users comes
    from the home cluster with probability ``home_cluster_prob`` and from a uniformly drawn
    cluster otherwise. So clients differ in their mix of tastes (more so as
    ``home_cluster_prob`` → 1) and the clusters differ as much as ``heterogeneity`` says.
    """
    if items_per_user >= n_items:
        raise ValueError(f"items_per_user ({items_per_user}) must be below n_items ({n_items})")
    # The latest heldout_fraction of each user's items, at least one, is held out.
    n_held = max(1, round(heldout_fraction * items_per_user))
    if n_held >= items_per_user:
        raise ValueError(
            f"heldout_fraction ({heldout_fraction}) holds out all {items_per_user} items per user: "
            "none left for training"
        )
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5EED]))

    item_latent = rng.normal(size=(n_items, latent_dim)) / np.sqrt(latent_dim)
    item_quality = rng.normal(scale=0.5, size=n_items)
    log_popularity = rng.normal(scale=1.0, size=n_items)

    shared_center = rng.normal(size=latent_dim)
    cluster_centers = rng.normal(size=(n_clusters, latent_dim))
    centers = (1.0 - heterogeneity) * shared_center + heterogeneity * cluster_centers

    observed = item_latent + feature_noise * rng.normal(size=item_latent.shape)
    pop_feature = (log_popularity - log_popularity.mean()) / log_popularity.std()
    features = np.zeros((n_items + 1, latent_dim + 1), dtype=np.float32)
    features[1:, :latent_dim] = observed * np.sqrt(latent_dim)
    features[1:, latent_dim] = pop_feature
    names = tuple(f"latent_{j}" for j in range(latent_dim)) + ("popularity",)
    catalog = ItemCatalog(
        features=features,
        feature_names=names,
        external_ids=np.arange(n_items + 1, dtype=np.int64),
    )

    clients = []
    user_id = 0
    for client_id in range(num_clients):
        home = client_id % n_clusters
        users = []
        for _ in range(users_per_client):
            cluster = home if rng.random() < home_cluster_prob else int(rng.integers(n_clusters))
            taste = centers[cluster] + 0.5 * rng.normal(size=latent_dim)
            taste *= 2.0 / np.linalg.norm(taste)
            utility = item_latent @ taste * np.sqrt(latent_dim) + item_quality
            true = np.empty(n_items + 1, dtype=np.float32)
            true[0] = np.nan
            true[1:] = RATING_SCALE[0] + (RATING_SCALE[1] - RATING_SCALE[0]) / (
                1.0 + np.exp(-utility)
            )
            watched = _gumbel_top_k(
                rng, popularity_weight * log_popularity + taste_weight * utility, items_per_user
            )
            rng.shuffle(watched)  # the order a user watched in is the time order of the split
            items = watched.astype(np.int64) + 1
            users.append(
                UserRecord(
                    user_id=user_id,
                    train_items=items[:-n_held],
                    train_ratings=true[items[:-n_held]],
                    heldout_items=items[-n_held:],
                    heldout_ratings=true[items[-n_held:]],
                    true_ratings=true,
                )
            )
            user_id += 1
        clients.append(
            ClientData(
                client_id=client_id,
                users=tuple(users),
                catalog=catalog,
                rating_scale=RATING_SCALE,
            )
        )
    return clients
