"""MovieLens loaders: ml-latest-small, ml-100k, ml-1m and ml-25m in their official layouts.

Where the files come from (first match wins):

1. ``path`` -- an extracted folder (the files directly inside it, or inside one sub-folder named
   like the dataset, e.g. ``data/ml-100k/``) or the official ``.zip`` archive (members
   ``<name>/ratings.csv`` ...; a zip with the files at its root is accepted too).
2. ``cache_dir/movielens/<name>/`` -- a copy extracted there earlier (by a previous download or by
   hand); ``cache_dir/movielens/<name>.zip`` is accepted as well.
3. Only when ``download=True``: the official archive from
   ``https://files.grouplens.org/datasets/movielens/<name>.zip`` (or ``url``).  It is streamed to a
   temporary file next to its destination, its sha256 is verified, it is extracted into a
   temporary folder and only then renamed to ``cache_dir/movielens/<name>/``; the archive itself
   is deleted afterwards.  A failed download, a checksum mismatch or a corrupt archive raises
   :class:`DatasetError` and leaves nothing behind in the cache.

Checksums: every download is verified against a sha256.  The expected value is ``sha256`` when the
caller gives one, otherwise the official archive's checksum from :data:`OFFICIAL_SHA256`, which
holds a checksum for all four supported datasets (taken from TensorFlow Datasets).
When ``path`` names a zip and ``sha256`` is given, that zip is verified as well; a folder is never
hashed.  Independently of the checksum, an archive must be a complete zip (central directory
readable, CRC of every extracted/read member correct) containing the dataset's files.

Parsed-data cache: after the first parse the two frames are written as parquet to
``cache_dir/parsed/<name>-<key>/``, where ``key`` changes with the parser version and with the
path, size and mtime of every source file, so an edited, replaced or cut-short file is parsed
again (see :mod:`~envs.data.movielens.parsed_cache`).

Validation: every user-facing data problem raises :class:`DatasetError` with a one-line message
naming the file (``<zip>:<member>`` inside an archive), the line (1-based, as an editor counts; a
header is line 1) or the column, and the problem.  A file whose last line has no line break was
cut short and is rejected, however well its last line parses (see
:mod:`~envs.data.movielens.lines`).

Modules: ``sources`` (folder/zip), ``download``, ``parsed_cache``, ``movies`` and ``ratings``
(parsing), ``diagnostics`` (describing a bad ratings line), with ``formats``, ``layouts``,
``values`` and ``lines`` shared by the parsers.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from envs.data.movielens.download import BASE_URL, OFFICIAL_SHA256, download_and_extract
from envs.data.movielens.errors import DatasetError
from envs.data.movielens.formats import (
    FORMATS,
    RATING_SCALES,
    SUPPORTED_DATASETS,
    Format,
)
from envs.data.movielens.movies import parse_movies
from envs.data.movielens.parsed_cache import (
    Parsed,
    cache_key,
    default_cache_dir,
    read_parsed,
    write_parsed,
)
from envs.data.movielens.ratings import parse_ratings
from envs.data.movielens.sources import (
    FolderSource,
    Source,
    missing_files,
    source_from_cache,
    source_from_path,
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


@dataclass(frozen=True, eq=False)
class MovieLensData:
    """One MovieLens dataset, parsed and validated.

    Attributes:
        name: ``"ml-latest-small" | "ml-100k" | "ml-1m" | "ml-25m"``.
        ratings: columns ``user`` int64, ``item`` int64 (the dataset's movieId), ``rating``
            float32, ``timestamp`` int64 (Unix seconds); sorted by (user, timestamp, item),
            RangeIndex.
        movies: columns ``item`` int64, ``title`` str, ``year`` float32 (NaN if unknown), then one
            uint8 column per genre named ``"genre:<Name>"``; in the order of the movies file.
        genre_names: genre names in column order (without the "(no genres listed)"/"unknown"
            pseudo-genre).
        source: where the data was read from (folder, zip, or the URL it was just downloaded from).

    ``eq=False``: instances compare by identity (comparing DataFrames with ``==`` is ambiguous).
    """

    name: str
    ratings: pd.DataFrame
    movies: pd.DataFrame
    genre_names: tuple[str, ...]
    source: str

    @property
    def rating_scale(self) -> tuple[float, float]:
        """(min, max) rating of this dataset's scale."""
        return RATING_SCALES[self.name]


def load_movielens(
    name: str,
    path: str | os.PathLike | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    download: bool = False,
    url: str | None = None,
    sha256: str | None = None,
) -> MovieLensData:
    """Load a MovieLens dataset (see the module docstring for sources, caching and checks).

    Args:
        name: one of :data:`SUPPORTED_DATASETS`.
        path: an extracted folder or the official ``.zip``; ``None`` looks in the cache.
        cache_dir: root of the download and parsed-data caches (default :func:`default_cache_dir`).
        download: allow downloading the archive when no copy is found. Never downloads otherwise.
        url: where to download from (default ``<BASE_URL>/<name>.zip``).
        sha256: expected sha256 of the archive (default: the official one from
            :data:`OFFICIAL_SHA256`); also verifies a zip given as ``path``.

    Raises:
        DatasetError: dataset not found, download failed, checksum mismatch, corrupt archive or
            malformed files.
    """
    fmt = FORMATS.get(name)
    if fmt is None:
        raise DatasetError(
            f"unknown MovieLens dataset {name!r}; supported: {', '.join(SUPPORTED_DATASETS)}"
        )
    cache_root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if sha256 is not None:
        sha256 = sha256.strip().lower()
        if not re.fullmatch(r"[0-9a-f]{64}", sha256):
            raise DatasetError(f"sha256 must be 64 hexadecimal digits, got {sha256!r}")

    origin: str | None = None
    source: Source | None
    if path is not None:
        source = source_from_path(fmt, Path(path).expanduser(), sha256)
    else:
        source = source_from_cache(fmt, cache_root)
        if source is None:
            the_url = url or f"{BASE_URL}/{name}.zip"
            if not download:
                folder = cache_root / "movielens" / name
                partial = (
                    f" (that folder lacks {', '.join(missing_files(folder, fmt))})"
                    if folder.is_dir()
                    else ""
                )
                raise DatasetError(
                    f"MovieLens {name!r} not found: no path was given and there is no copy in "
                    f"{folder}/{partial} (nor {folder}.zip). Supply a copy with "
                    f"--path <folder or .zip> (load_movielens({name!r}, path=...)), or fetch "
                    f"{the_url} with --download (download=True)."
                )
            expected = sha256 or OFFICIAL_SHA256[name]
            folder = download_and_extract(fmt, cache_root, the_url, expected)
            source = FolderSource(folder)
            origin = the_url

    with source:
        entry = cache_root / "parsed" / f"{name}-{cache_key(fmt, source)}"
        parsed = read_parsed(entry, fmt)
        if parsed is None:
            parsed = _parse(fmt, source)
            write_parsed(entry, fmt, parsed, source.location)
    ratings, movies, genre_names = parsed
    return MovieLensData(
        name=name,
        ratings=ratings,
        movies=movies,
        genre_names=genre_names,
        source=origin or source.location,
    )


def _parse(fmt: Format, source: Source) -> Parsed:
    # The movies first: every rating must name a movie of the catalogue.
    movies, genre_names = parse_movies(fmt, source)
    ratings = parse_ratings(fmt, source, movies["item"].to_numpy())
    return ratings, movies, genre_names


def describe(data: MovieLensData) -> dict:
    """Summary statistics of a loaded dataset (plain Python values, JSON-serialisable).

    Keys: name, users, items (movies in the catalogue), rated_items, ratings, genres,
    rating_min, rating_max, first_date, last_date (ISO dates, UTC), span_days,
    ratings_per_user_min, ratings_per_user_median, ratings_per_user_max.
    """
    r = data.ratings
    per_user = r["user"].value_counts().to_numpy()
    first = int(r["timestamp"].min())
    last = int(r["timestamp"].max())

    def iso(ts: int) -> str:
        return datetime.fromtimestamp(ts, tz=timezone.utc).date().isoformat()

    return {
        "name": data.name,
        "users": int(r["user"].nunique()),
        "items": len(data.movies),
        "rated_items": int(r["item"].nunique()),
        "ratings": len(r),
        "genres": len(data.genre_names),
        "rating_min": float(r["rating"].min()),
        "rating_max": float(r["rating"].max()),
        "first_date": iso(first),
        "last_date": iso(last),
        "span_days": round((last - first) / 86400.0, 2),
        "ratings_per_user_min": int(per_user.min()),
        "ratings_per_user_median": float(np.median(per_user)),
        "ratings_per_user_max": int(per_user.max()),
    }
