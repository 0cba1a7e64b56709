"""Dataset loaders (real public datasets in their official layouts)."""

from envs.data.movielens import (
    BASE_URL,
    OFFICIAL_SHA256,
    RATING_SCALES,
    SUPPORTED_DATASETS,
    DatasetError,
    MovieLensData,
    default_cache_dir,
    describe,
    load_movielens,
)

__all__ = [
    "BASE_URL",
    "OFFICIAL_SHA256",
    "RATING_SCALES",
    "SUPPORTED_DATASETS",
    "DatasetError",
    "MovieLensData",
    "default_cache_dir",
    "describe",
    "load_movielens",
]
