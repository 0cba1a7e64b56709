"""Build the recommendation task's clients (their private data) from the config."""

from __future__ import annotations

from envs.data.partition import PartitionError, form_clients
from envs.synthetic import make_synthetic_clients
from envs.types import ClientData
from fedrlhf_ray.errors import ConfigError
from fedrlhf_ray.schema import ExperimentConfig


def build_clients(cfg: ExperimentConfig) -> list[ClientData]:
    """The K clients of the experiment, deterministic in ``cfg.seed``.

    Raises ``envs.data.movielens.DatasetError`` when the MovieLens copy is missing or bad, and
    :class:`ConfigError` when the configured clients cannot be formed from it.
    """
    env, clients = cfg.slate_env(), cfg.clients
    users_per_client = 1 if clients.formation == "user" else clients.users_per_client
    if cfg.env.name == "synthetic":
        syn = cfg.synthetic()
        return make_synthetic_clients(
            num_clients=clients.num_clients,
            users_per_client=users_per_client,
            n_items=syn.n_items,
            latent_dim=syn.latent_dim,
            n_clusters=syn.n_clusters,
            heterogeneity=syn.heterogeneity,
            feature_noise=syn.feature_noise,
            items_per_user=syn.items_per_user,
            heldout_fraction=env.heldout_fraction,
            popularity_weight=syn.popularity_weight,
            taste_weight=syn.taste_weight,
            home_cluster_prob=syn.home_cluster_prob,
            seed=cfg.seed,
        )
    from envs.data.movielens import RATING_SCALES, load_movielens

    data_cfg = cfg.movielens()
    data = load_movielens(
        data_cfg.dataset, data_cfg.path, cache_dir=data_cfg.cache_dir, download=data_cfg.download
    )
    try:
        return form_clients(
            data.ratings,
            data.movies,
            data.genre_names,
            num_clients=clients.num_clients,
            formation=clients.formation,
            users_per_client=users_per_client,
            grouping=clients.grouping,
            heldout_fraction=env.heldout_fraction,
            min_ratings=data_cfg.min_ratings,
            rating_scale=RATING_SCALES[data_cfg.dataset],
            seed=cfg.seed,
        )
    except PartitionError as err:
        name = str(err).partition(":")[0]
        raise ConfigError(f"{_CONFIG_PATHS.get(name, name)}:{str(err).partition(':')[2]}") from None


# PartitionError names the partition's parameters; the user knows them by their config path.
_CONFIG_PATHS = {
    "num_clients": "clients.num_clients",
    "users_per_client": "clients.users_per_client",
    "formation": "clients.formation",
    "grouping": "clients.grouping",
    "heldout_fraction": "env.heldout_fraction",
    "min_ratings": "env.data.min_ratings",
}
