"""The parsed-data cache: the frames of a successful parse, stored as parquet under
``cache_dir/parsed/<name>-<key>/``.

``key`` hashes the parser version and, for every source file, its resolved path, size and
``mtime_ns`` (for a zip: the archive's), so an edited, replaced or cut-short file is parsed (and
checked) again instead of being answered from the cache. An entry is written atomically (a
temporary folder renamed into place) and only after a parse passed every check. Stale entries are
not deleted automatically.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import pandas as pd

from envs.data.movielens.errors import DatasetError
from envs.data.movielens.formats import GENRE_PREFIX, RATING_COLUMNS, Format
from envs.data.movielens.sources import Source

# Part of every key: raise it whenever the parser accepts less than before, so entries written by
# an older, more lenient parser are never reused. 2: files cut short (no line break after their
# last line) are rejected; version 1 parsed them, e.g. a timestamp cut to its first digits.
PARSER_VERSION = 2

Parsed = tuple[pd.DataFrame, pd.DataFrame, tuple[str, ...]]  # ratings, movies, genre names


def default_cache_dir() -> Path:
    """``$FEDRLHF_CACHE`` if set (and non-empty), else ``~/.cache/fedrlhf``."""
    env = os.environ.get("FEDRLHF_CACHE", "").strip()
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "fedrlhf"


def cache_key(fmt: Format, source: Source) -> str:
    try:
        fp = source.fingerprint(fmt)
    except OSError as exc:
        raise DatasetError(f"{source.location}: cannot stat the dataset files: {exc}") from exc
    blob = json.dumps({"v": PARSER_VERSION, "name": fmt.name, "files": fp}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def read_parsed(entry: Path, fmt: Format) -> Parsed | None:
    """The cached frames in ``entry``, or ``None`` when it is missing, outdated or unreadable."""
    meta_path = entry / "meta.json"
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("parser_version") != PARSER_VERSION or meta.get("name") != fmt.name:
            return None
        ratings = _read_parquet(entry / "ratings.parquet")
        movies = _read_parquet(entry / "movies.parquet")
        genre_names = tuple(meta["genre_names"])
        expected_cols = ["item", "title", "year", *(GENRE_PREFIX + g for g in genre_names)]
        if list(ratings.columns) != list(RATING_COLUMNS) or list(movies.columns) != expected_cols:
            return None
        if len(ratings) != meta["n_ratings"] or len(movies) != meta["n_movies"]:
            return None
    except Exception:  # noqa: BLE001 (an unreadable cache entry is just a cache miss)
        return None
    return ratings, movies, genre_names


def _read_parquet(path: Path) -> pd.DataFrame:
    import pyarrow.parquet as pq

    # split_blocks avoids consolidating the int64 columns into one 2-D block (a full copy).
    return pq.read_table(path).to_pandas(split_blocks=True, self_destruct=True)


def write_parsed(entry: Path, fmt: Format, parsed: Parsed, location: str) -> None:
    """Store ``parsed`` in ``entry``; a failure only warns (the cache is an optimisation)."""
    ratings, movies, genre_names = parsed
    if entry.exists():
        shutil.rmtree(entry, ignore_errors=True)  # unreadable/outdated entry with the same key
    tmp: Path | None = None
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=entry.parent, prefix=f".{entry.name}.tmp-"))
        ratings.to_parquet(tmp / "ratings.parquet", index=False)
        movies.to_parquet(tmp / "movies.parquet", index=False)
        meta = {
            "parser_version": PARSER_VERSION,
            "name": fmt.name,
            "source": location,
            "genre_names": list(genre_names),
            "n_ratings": len(ratings),
            "n_movies": len(movies),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
        try:
            os.rename(tmp, entry)
            tmp = None
        except OSError:
            pass  # a concurrent load wrote the same entry first
    except Exception as exc:  # noqa: BLE001 (the cache is an optimisation; the load succeeded)
        warnings.warn(f"could not write the parsed MovieLens cache {entry}: {exc}", stacklevel=3)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
