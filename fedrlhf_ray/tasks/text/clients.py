"""Build the IMDb task's clients (their private shards of reviews) from the config."""

from __future__ import annotations

from fedrlhf_ray.errors import ConfigError
from fedrlhf_ray.schema import ExperimentConfig


def build_imdb_shards(cfg: ExperimentConfig) -> list:
    """The K clients' IMDb shards (``envs.data.imdb.ImdbShard``), deterministic in ``cfg.seed``."""
    from envs.data.imdb import ShardError, load_imdb, shard_imdb

    imdb = cfg.imdb()
    data = load_imdb(imdb.path, cache_dir=imdb.cache_dir, download=imdb.download)
    try:
        return shard_imdb(
            data, num_clients=cfg.clients.num_clients, reviews_per_client=imdb.reviews_per_client,
            test_per_client=imdb.test_prompts_per_client, label_skew=imdb.label_skew, seed=cfg.seed,
        )
    except ShardError as err:
        raise ConfigError(f"env.imdb.{err}") from None
