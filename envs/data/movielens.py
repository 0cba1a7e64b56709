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
holds a checksum for all four supported datasets (taken from TensorFlow Datasets, see the table).
When ``path`` names a zip and ``sha256`` is given, that zip is verified as well; a folder is never
hashed.  Independently of the checksum, an archive must be a complete zip (central directory
readable, CRC of every extracted/read member correct) containing the dataset's files.

Parsed-data cache: after the first parse the two frames are written as parquet to
``cache_dir/parsed/<name>-<key>/`` (atomically: a temporary folder renamed into place).  ``key``
is a hash of the parser version and, for every source file, its resolved path, size and
``mtime_ns`` (for a zip: the archive's), so editing or replacing a file makes the next load
re-parse it.  Stale entries are not deleted automatically.

Validation: every user-facing data problem raises :class:`DatasetError` with a one-line message
naming the file (``<zip>:<member>`` inside an archive), the line (1-based, as an editor counts; a
header is line 1) or the column, and the problem.  The happy path uses pandas' C parser with dtype
specifications and vectorised checks; only when those fail is the file scanned line by line to
locate and describe the first offending line.
"""

from __future__ import annotations

import csv
import hashlib
import http.client
import json
import math
import os
import re
import shutil
import struct
import tempfile
import urllib.error
import urllib.request
import warnings
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

import numpy as np
import pandas as pd

__all__ = [
    "BASE_URL",
    "DatasetError",
    "MovieLensData",
    "OFFICIAL_SHA256",
    "RATING_SCALES",
    "SUPPORTED_DATASETS",
    "default_cache_dir",
    "describe",
    "load_movielens",
]


class DatasetError(ValueError):
    """A user-facing data problem (missing, corrupt or malformed dataset); one-line message."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


SUPPORTED_DATASETS: tuple[str, ...] = ("ml-latest-small", "ml-100k", "ml-1m", "ml-25m")

BASE_URL = "https://files.grouplens.org/datasets/movielens"

# sha256 of the official GroupLens archives <BASE_URL>/<name>.zip.
# Source: tensorflow/datasets, tensorflow_datasets/url_checksums/movielens.txt (url, size in
# bytes, sha256), read at commit 1c076ac3c19c8ea83e1d1a75e0623c9a699e0d7c:
#   ml-latest-small.zip    978,202 bytes
#   ml-100k.zip          4,924,029 bytes
#   ml-1m.zip            5,917,549 bytes
#   ml-25m.zip         261,978,986 bytes
# The same values are pinned independently in other public projects (e.g. the ml-1m value in
# tensorflow/models' movielens recommendation data script).
OFFICIAL_SHA256: dict[str, str] = {
    "ml-latest-small": "696d65a3dfceac7c45750ad32df2c259311949efec81f0f144fdfb91ebc9e436",
    "ml-100k": "50d2a982c66986937beb9ffb3aa76efe955bf3d5c6b761f4e3a7cd717c6a3229",
    "ml-1m": "a6898adb50b9ca05aa231689da44c217cb524e7ebd39d264c56e2832f2c54e20",
    "ml-25m": "8b21cfb7eb1706b4ec0aac894368d90acf26ebdfb6aced3ebd4ad5bd1eb9c6aa",
}

# (min, max) of each dataset's rating scale; see _FORMATS for the step.
RATING_SCALES: dict[str, tuple[float, float]] = {
    "ml-latest-small": (0.5, 5.0),
    "ml-100k": (1.0, 5.0),
    "ml-1m": (1.0, 5.0),
    "ml-25m": (0.5, 5.0),
}

_PARSER_VERSION = 1
_GENRE_PREFIX = "genre:"
_RATING_COLUMNS = ("user", "item", "rating", "timestamp")
_YEAR_RE = r"\((\d{4})(?:\s*[-\u2013]\s*(?:\d{4})?)?\)\s*$"
# What counts as an integer id/timestamp ("5" or "5.0", as pandas' integer parser accepts) and as
# a number. Used both by the vectorised checks (pyarrow/RE2) and the line-by-line descriptions.
_INT_PATTERN = r"^\s*[+-]?\d+(?:\.0*)?\s*$"
_FLOAT_PATTERN = r"^\s*[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?\s*$"
_INT_FULL = re.compile(_INT_PATTERN)
_FLOAT_FULL = re.compile(_FLOAT_PATTERN)
_F32 = struct.Struct("<f")


@dataclass(frozen=True)
class _Format:
    name: str
    kind: str  # "csv" (latest-small, 25m) | "dat" (1m) | "100k"
    ratings_file: str
    movies_file: str
    extra_files: tuple[str, ...]
    step: float
    encoding: str
    pseudo_genre: str | None

    @property
    def files(self) -> tuple[str, ...]:
        return (self.ratings_file, self.movies_file, *self.extra_files)

    @property
    def scale(self) -> tuple[float, float]:
        return RATING_SCALES[self.name]


_FORMATS: dict[str, _Format] = {
    "ml-latest-small": _Format(
        "ml-latest-small", "csv", "ratings.csv", "movies.csv", (), 0.5, "utf-8",
        "(no genres listed)",
    ),
    "ml-25m": _Format(
        "ml-25m", "csv", "ratings.csv", "movies.csv", (), 0.5, "utf-8", "(no genres listed)"
    ),
    "ml-1m": _Format("ml-1m", "dat", "ratings.dat", "movies.dat", (), 1.0, "latin-1", None),
    "ml-100k": _Format(
        "ml-100k", "100k", "u.data", "u.item", ("u.genre",), 1.0, "latin-1", "unknown"
    ),
}

_CSV_RATING_HEADER = ("userId", "movieId", "rating", "timestamp")
_CSV_MOVIE_HEADER = ("movieId", "title", "genres")


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


def default_cache_dir() -> Path:
    """``$FEDRLHF_CACHE`` if set (and non-empty), else ``~/.cache/fedrlhf``."""
    env = os.environ.get("FEDRLHF_CACHE", "").strip()
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "fedrlhf"


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
    fmt = _FORMATS.get(name)
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
    if path is not None:
        source = _source_from_path(fmt, Path(path).expanduser(), sha256)
    else:
        source = _source_from_cache(fmt, cache_root)
        if source is None:
            the_url = url or f"{BASE_URL}/{name}.zip"
            if not download:
                folder = cache_root / "movielens" / name
                partial = (
                    f" (that folder lacks {', '.join(_missing_files(folder, fmt))})"
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
            folder = _download_and_extract(fmt, cache_root, the_url, expected)
            source = _FolderSource(folder)
            origin = the_url

    with source:
        key = _cache_key(fmt, source)
        entry = cache_root / "parsed" / f"{name}-{key}"
        cached = _read_parsed(entry, fmt)
        if cached is not None:
            ratings, movies, genre_names = cached
        else:
            ratings, movies, genre_names = _parse(fmt, source)
            _write_parsed(entry, fmt, ratings, movies, genre_names, source.location)
    return MovieLensData(
        name=name,
        ratings=ratings,
        movies=movies,
        genre_names=genre_names,
        source=origin or source.location,
    )


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
        "items": int(len(data.movies)),
        "rated_items": int(r["item"].nunique()),
        "ratings": int(len(r)),
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


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------


class _Source:
    location: str

    def open(self, fname: str) -> IO[bytes]:
        raise NotImplementedError

    def display(self, fname: str) -> str:
        raise NotImplementedError

    def fingerprint(self, fmt: _Format) -> list[Any]:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> _Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _FolderSource(_Source):
    def __init__(self, root: Path) -> None:
        self.root = root
        self.location = str(root)

    def open(self, fname: str) -> IO[bytes]:
        try:
            return open(self.root / fname, "rb")
        except OSError as exc:
            shown = self.display(fname)
            raise DatasetError(f"{shown}: cannot open: {exc.strerror or exc}") from exc

    def display(self, fname: str) -> str:
        return str(self.root / fname)

    def fingerprint(self, fmt: _Format) -> list[Any]:
        out = []
        for fname in fmt.files:
            p = (self.root / fname).resolve()
            st = p.stat()
            out.append([str(p), st.st_size, st.st_mtime_ns])
        return out


class _ZipSource(_Source):
    def __init__(self, zip_path: Path, zf: zipfile.ZipFile, prefix: str) -> None:
        self.zip_path = zip_path
        self.zf = zf
        self.prefix = prefix
        self.location = str(zip_path)

    def open(self, fname: str) -> IO[bytes]:
        try:
            return self.zf.open(self.prefix + fname)
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:
            raise _corrupt_zip(self.display(fname), exc) from exc

    def display(self, fname: str) -> str:
        return f"{self.zip_path}:{self.prefix}{fname}"

    def fingerprint(self, fmt: _Format) -> list[Any]:
        p = self.zip_path.resolve()
        st = p.stat()
        return [[str(p), self.prefix, st.st_size, st.st_mtime_ns]]

    def close(self) -> None:
        self.zf.close()


def _corrupt_zip(what: str, exc: BaseException) -> DatasetError:
    return DatasetError(f"{what}: not a valid zip archive (truncated or corrupt): {exc}")


def _missing_files(folder: Path, fmt: _Format) -> list[str]:
    return [f for f in fmt.files if not (folder / f).is_file()]


def _source_from_path(fmt: _Format, p: Path, sha256: str | None) -> _Source:
    if not p.exists():
        raise DatasetError(
            f"{p}: no such file or folder "
            f"(expected an extracted {fmt.name} folder or {fmt.name}.zip)"
        )
    if p.is_dir():
        missing = _missing_files(p, fmt)
        if not missing:
            return _FolderSource(p)
        sub = p / fmt.name
        if sub.is_dir() and not _missing_files(sub, fmt):
            return _FolderSource(sub)
        raise DatasetError(
            f"{p}: folder does not contain the {fmt.name} files (missing {', '.join(missing)}; "
            f"looked in {p}/ and {sub}/)"
        )
    if sha256 is not None:
        got = _sha256_file(p)
        if got != sha256:
            raise DatasetError(f"{p}: sha256 checksum mismatch: expected {sha256}, got {got}")
    try:
        zf = zipfile.ZipFile(p)
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        raise _corrupt_zip(str(p), exc) from exc
    except OSError as exc:
        raise DatasetError(f"{p}: cannot open: {exc.strerror or exc}") from exc
    try:
        prefix = _zip_prefix(fmt, zf, str(p))
    except BaseException:
        zf.close()
        raise
    return _ZipSource(p, zf, prefix)


def _zip_prefix(fmt: _Format, zf: zipfile.ZipFile, what: str) -> str:
    names = set(zf.namelist())
    candidates = [f"{fmt.name}/", ""]
    tops = sorted({n.split("/", 1)[0] + "/" for n in names if "/" in n})
    candidates += [t for t in tops if t not in candidates]
    for prefix in candidates:
        if all(prefix + f in names for f in fmt.files):
            return prefix
    missing = [f"{fmt.name}/{f}" for f in fmt.files if f"{fmt.name}/{f}" not in names]
    shown = ", ".join(sorted(names)[:8]) + (", ..." if len(names) > 8 else "")
    raise DatasetError(
        f"{what}: archive does not contain the {fmt.name} files (missing {', '.join(missing)}; "
        f"members: {shown or 'none'})"
    )


def _source_from_cache(fmt: _Format, cache_root: Path) -> _Source | None:
    folder = cache_root / "movielens" / fmt.name
    if folder.is_dir() and not _missing_files(folder, fmt):
        return _FolderSource(folder)
    archive = folder.with_name(f"{fmt.name}.zip")
    if archive.is_file():
        return _source_from_path(fmt, archive, None)
    return None


def _sha256_file(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# Download
# --------------------------------------------------------------------------------------------


def _download_and_extract(fmt: _Format, cache_root: Path, url: str, expected: str) -> Path:
    mdir = cache_root / "movielens"
    target = mdir / fmt.name
    try:
        mdir.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=mdir, prefix=f".{fmt.name}.", suffix=".zip.part")
    except OSError as exc:
        raise DatasetError(f"{mdir}: cannot write the download cache: {exc}") from exc
    tmp_zip = Path(tmp_name)
    tmp_dir: Path | None = None
    what = f"{url} (downloaded to {tmp_zip})"
    try:
        with os.fdopen(fd, "wb") as out:
            digest = _fetch(url, out)
        if digest != expected:
            raise DatasetError(
                f"{what}: sha256 checksum mismatch: expected {expected}, got {digest}; "
                f"the download was discarded"
            )
        tmp_dir = Path(tempfile.mkdtemp(dir=mdir, prefix=f".{fmt.name}.extract-"))
        root = _extract(fmt, tmp_zip, tmp_dir, what)
        try:
            os.replace(root, target)
        except OSError as exc:
            if not (target.is_dir() and not _missing_files(target, fmt)):
                raise DatasetError(
                    f"{target}: cannot move the extracted {fmt.name} files into place ({exc}); "
                    f"remove that folder and retry"
                ) from exc
            # else: another process extracted the same dataset first; use its copy.
        return target
    finally:
        tmp_zip.unlink(missing_ok=True)
        if tmp_dir is not None:
            shutil.rmtree(tmp_dir, ignore_errors=True)


def _fetch(url: str, out: IO[bytes]) -> str:
    """Stream ``url`` into ``out``; return the sha256 hex digest of the bytes received."""
    h = hashlib.sha256()
    received = 0
    request = urllib.request.Request(url, headers={"User-Agent": "fedrlhf-ray"})
    try:
        with urllib.request.urlopen(request, timeout=60) as resp:
            length = resp.headers.get("Content-Length")
            while chunk := resp.read(1 << 20):
                h.update(chunk)
                out.write(chunk)
                received += len(chunk)
    except urllib.error.HTTPError as exc:
        raise DatasetError(f"could not download {url}: HTTP {exc.code} {exc.reason}") from exc
    except urllib.error.URLError as exc:
        raise DatasetError(f"could not download {url}: {exc.reason}") from exc
    except (OSError, http.client.HTTPException) as exc:
        raise DatasetError(f"could not download {url}: {type(exc).__name__}: {exc}") from exc
    if length is not None and length.isdigit() and int(length) != received:
        raise DatasetError(
            f"could not download {url}: truncated transfer ({received} of {length} bytes)"
        )
    return h.hexdigest()


def _extract(fmt: _Format, zip_path: Path, dest: Path, what: str) -> Path:
    """Extract the dataset's folder from ``zip_path`` into ``dest``; return the extracted root."""
    try:
        with zipfile.ZipFile(zip_path) as zf:
            prefix = _zip_prefix(fmt, zf, what)
            for info in zf.infolist():
                if info.filename.startswith(prefix):
                    zf.extract(info, dest)
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        raise _corrupt_zip(what, exc) from exc
    except OSError as exc:
        raise DatasetError(f"{what}: cannot extract into {dest}: {exc}") from exc
    root = dest / prefix.rstrip("/") if prefix else dest
    missing = _missing_files(root, fmt)
    if missing:
        raise DatasetError(f"{what}: extraction produced no {', '.join(missing)}")
    return root


# --------------------------------------------------------------------------------------------
# Parsed-data cache
# --------------------------------------------------------------------------------------------


def _cache_key(fmt: _Format, source: _Source) -> str:
    try:
        fp = source.fingerprint(fmt)
    except OSError as exc:
        raise DatasetError(f"{source.location}: cannot stat the dataset files: {exc}") from exc
    blob = json.dumps({"v": _PARSER_VERSION, "name": fmt.name, "files": fp}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _read_parsed(
    entry: Path, fmt: _Format
) -> tuple[pd.DataFrame, pd.DataFrame, tuple[str, ...]] | None:
    meta_path = entry / "meta.json"
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("parser_version") != _PARSER_VERSION or meta.get("name") != fmt.name:
            return None
        ratings = _read_parquet(entry / "ratings.parquet")
        movies = _read_parquet(entry / "movies.parquet")
        genre_names = tuple(meta["genre_names"])
        expected_cols = ["item", "title", "year", *(_GENRE_PREFIX + g for g in genre_names)]
        if list(ratings.columns) != list(_RATING_COLUMNS) or list(movies.columns) != expected_cols:
            return None
        if len(ratings) != meta["n_ratings"] or len(movies) != meta["n_movies"]:
            return None
    except Exception:  # an unreadable cache entry is just a cache miss
        return None
    return ratings, movies, genre_names


def _read_parquet(path: Path) -> pd.DataFrame:
    import pyarrow.parquet as pq

    # split_blocks avoids consolidating the int64 columns into one 2-D block (a full copy).
    return pq.read_table(path).to_pandas(split_blocks=True, self_destruct=True)


def _write_parsed(
    entry: Path,
    fmt: _Format,
    ratings: pd.DataFrame,
    movies: pd.DataFrame,
    genre_names: tuple[str, ...],
    location: str,
) -> None:
    if entry.exists():
        shutil.rmtree(entry, ignore_errors=True)  # unreadable/outdated entry with the same key
    tmp: Path | None = None
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=entry.parent, prefix=f".{entry.name}.tmp-"))
        ratings.to_parquet(tmp / "ratings.parquet", index=False)
        movies.to_parquet(tmp / "movies.parquet", index=False)
        meta = {
            "parser_version": _PARSER_VERSION,
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
    except Exception as exc:  # the cache is an optimisation; loading still succeeded
        warnings.warn(f"could not write the parsed MovieLens cache {entry}: {exc}", stacklevel=3)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------


def _parse(fmt: _Format, source: _Source) -> tuple[pd.DataFrame, pd.DataFrame, tuple[str, ...]]:
    try:
        movies, genre_names = _parse_movies(fmt, source)
        ratings = _parse_ratings(fmt, source, movies["item"].to_numpy())
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        raise _corrupt_zip(source.location, exc) from exc
    return ratings, movies, genre_names


def _lines(source: _Source, fname: str, encoding: str) -> Iterator[tuple[int, str]]:
    """(line number, text without the line ending) of every line of a file."""
    with source.open(fname) as f:
        for no, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8-sig" if no == 1 and encoding == "utf-8" else encoding)
            except UnicodeDecodeError as exc:
                raise DatasetError(
                    f"{source.display(fname)}: line {no}: not valid {encoding} text ({exc.reason} "
                    f"at byte {exc.start})"
                ) from exc
            yield no, text.rstrip("\r\n")


def _rating_value_ok(value: float, fmt: _Format) -> bool:
    """Scalar twin of :func:`_rating_ok` (same float32 rounding), for the line-by-line checks."""
    try:
        v = _F32.unpack(_F32.pack(value))[0]
    except OverflowError:
        return False
    lo, hi = fmt.scale
    scaled = v / fmt.step
    return lo <= v <= hi and scaled == math.floor(scaled)


# ---- movies --------------------------------------------------------------------------------


def _parse_movies(fmt: _Format, source: _Source) -> tuple[pd.DataFrame, tuple[str, ...]]:
    fname = fmt.movies_file
    shown = source.display(fname)
    ids: list[int] = []
    titles: list[str] = []
    genre_lists: list[list[str]] = []
    dates: list[str] = []
    flags: list[list[int]] = []
    seen: dict[int, int] = {}
    genre_names: tuple[str, ...] = ()

    def add_id(raw: str, no: int, col: str) -> None:
        if not _INT_FULL.match(raw):
            raise DatasetError(
                f"{shown}: line {no}: movie id {raw!r} in column {col} is not an integer"
            )
        item = int(float(raw)) if "." in raw else int(raw)
        if item in seen:
            raise DatasetError(
                f"{shown}: line {no}: movie id {item} appears again (first on line {seen[item]})"
            )
        seen[item] = no
        ids.append(item)

    if fmt.kind == "csv":
        lines = _lines(source, fname, fmt.encoding)
        numbers: list[int] = []

        def texts() -> Iterator[str]:
            for no, text in lines:
                numbers.append(no)
                yield text

        reader = csv.reader(texts())
        header: list[str] | None = None
        start = 1
        for row in reader:
            no = start
            start = numbers[-1] + 1
            if header is None:
                header = [c.strip() for c in row]
                idx = _header_index(shown, header, _CSV_MOVIE_HEADER)
                n_fields = len(header)
                continue
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if [c.strip() for c in row] == header:
                raise DatasetError(f"{shown}: line {no}: duplicate header line inside the data")
            if len(row) != n_fields:
                raise DatasetError(
                    f"{shown}: line {no}: expected {n_fields} comma-separated fields "
                    f"({','.join(header)}), found {len(row)}"
                )
            add_id(row[idx[0]], no, "movieId")
            titles.append(row[idx[1]].strip())
            genre_lists.append(_split_genres(row[idx[2]]))
        if header is None:
            raise DatasetError(f"{shown}: the file is empty")
    elif fmt.kind == "dat":
        for no, text in _lines(source, fname, fmt.encoding):
            if not text.strip():
                continue
            head, sep1, rest = text.partition("::")
            title, sep2, genres = rest.rpartition("::")
            if not (sep1 and sep2):
                found = len(text.split("::"))
                raise DatasetError(
                    f"{shown}: line {no}: expected 3 fields separated by '::' "
                    f"(MovieID::Title::Genres), found {found}"
                )
            add_id(head, no, "MovieID")
            titles.append(title.strip())
            genre_lists.append(_split_genres(genres))
    else:  # ml-100k
        genre_names_all = _parse_100k_genres(fmt, source)
        n_fields = 5 + len(genre_names_all)
        for no, text in _lines(source, fname, fmt.encoding):
            if not text.strip():
                continue
            parts = text.split("|")
            if len(parts) != n_fields:
                raise DatasetError(
                    f"{shown}: line {no}: expected {n_fields} '|'-separated fields (movie id, "
                    f"title, release date, video release date, IMDb URL, {len(genre_names_all)} "
                    f"genre flags), found {len(parts)}"
                )
            add_id(parts[0], no, "1 (movie id)")
            titles.append(parts[1].strip())
            dates.append(parts[2].strip())
            row_flags = parts[5:]
            for j, v in enumerate(row_flags):
                if v.strip() not in ("0", "1"):
                    raise DatasetError(
                        f"{shown}: line {no}: genre flag {v!r} in column {6 + j} "
                        f"({genre_names_all[j]}) is not 0 or 1"
                    )
            flags.append([int(v) for v in row_flags])

    if not ids:
        raise DatasetError(f"{shown}: the file is empty (no movies)")

    n = len(ids)
    if fmt.kind == "100k":
        keep = [j for j, g in enumerate(genre_names_all) if g != fmt.pseudo_genre]
        genre_names = tuple(genre_names_all[j] for j in keep)
        genre_matrix = np.asarray(flags, dtype=np.uint8)[:, keep].reshape(n, len(keep))
    else:
        names = {g for gs in genre_lists for g in gs}
        names.discard(fmt.pseudo_genre or "")
        genre_names = tuple(sorted(names))
        col = {g: j for j, g in enumerate(genre_names)}
        genre_matrix = np.zeros((n, len(genre_names)), dtype=np.uint8)
        for i, gs in enumerate(genre_lists):
            for g in gs:
                j = col.get(g)
                if j is not None:
                    genre_matrix[i, j] = 1

    title_s = pd.Series(titles, dtype="str")
    year = pd.to_numeric(title_s.str.extract(_YEAR_RE, expand=False), errors="coerce")
    if fmt.kind == "100k":
        release = pd.Series(dates, dtype="str").str.extract(r"(\d{4})\s*$", expand=False)
        year = year.fillna(pd.to_numeric(release, errors="coerce"))
    data: dict[str, Any] = {
        "item": np.asarray(ids, dtype=np.int64),
        "title": title_s,
        "year": year.to_numpy(dtype=np.float32, na_value=np.nan),
    }
    for j, g in enumerate(genre_names):
        data[_GENRE_PREFIX + g] = genre_matrix[:, j]
    return pd.DataFrame(data), genre_names


def _split_genres(text: str) -> list[str]:
    return [g.strip() for g in text.split("|") if g.strip()]


def _parse_100k_genres(fmt: _Format, source: _Source) -> list[str]:
    fname = "u.genre"
    shown = source.display(fname)
    by_index: dict[int, tuple[str, int]] = {}
    for no, text in _lines(source, fname, fmt.encoding):
        if not text.strip():
            continue
        name, sep, index = text.rpartition("|")
        if not sep or not name.strip():
            raise DatasetError(f"{shown}: line {no}: expected 'name|index', found {text!r}")
        if not _INT_FULL.match(index) or "." in index:
            raise DatasetError(f"{shown}: line {no}: genre index {index!r} is not an integer")
        i = int(index)
        if i in by_index:
            raise DatasetError(
                f"{shown}: line {no}: genre index {i} appears again "
                f"(first on line {by_index[i][1]})"
            )
        by_index[i] = (name.strip(), no)
    if not by_index:
        raise DatasetError(f"{shown}: the file is empty (no genres)")
    if sorted(by_index) != list(range(len(by_index))):
        raise DatasetError(
            f"{shown}: genre indices must be 0..{len(by_index) - 1}, found {sorted(by_index)}"
        )
    return [by_index[i][0] for i in range(len(by_index))]


def _header_index(shown: str, header: list[str], required: tuple[str, ...]) -> list[int]:
    missing = [c for c in required if c not in header]
    if missing:
        hint = ""
        if header and all(_FLOAT_FULL.match(c) for c in header if c):
            hint = " (the header line seems to be missing)"
        raise DatasetError(
            f"{shown}: line 1 (header): missing column(s) {', '.join(missing)}; columns found: "
            f"{', '.join(header) if any(header) else 'none'}; expected {','.join(required)}{hint}"
        )
    return [header.index(c) for c in required]


# ---- ratings -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _RatingLayout:
    sep: str  # separator used by pandas' C parser
    names: tuple[str, ...]  # all fields of a line
    header: tuple[str, ...] | None  # header line fields (csv only)
    cols: dict[str, int]  # user/item/rating/timestamp -> field index
    fillers: tuple[int, ...]  # fields that must be empty (the ':' trick for '::')
    describe: str  # how a line looks, for messages
    split: str  # separator for the line scanner
    col_names: dict[str, str]  # user/item/rating/timestamp -> column name for messages


def _rating_layout(fmt: _Format, source: _Source) -> _RatingLayout:
    fname = fmt.ratings_file
    if fmt.kind == "csv":
        header = _read_csv_header(source, fname)
        idx = _header_index(source.display(fname), header, _CSV_RATING_HEADER)
        cols = dict(zip(_RATING_COLUMNS, idx))
        return _RatingLayout(
            ",", tuple(header), tuple(header), cols, (), f"{len(header)} comma-separated fields "
            f"({','.join(header)})", ",", dict(zip(_RATING_COLUMNS, _CSV_RATING_HEADER)),
        )
    if fmt.kind == "dat":
        # "::" is not supported by the C parser: split on ':' and require every other field empty.
        return _RatingLayout(
            ":", ("user", "_1", "item", "_2", "rating", "_3", "timestamp"), None,
            {"user": 0, "item": 2, "rating": 4, "timestamp": 6}, (1, 3, 5),
            "4 fields separated by '::' (UserID::MovieID::Rating::Timestamp)", "::",
            {"user": "UserID", "item": "MovieID", "rating": "Rating", "timestamp": "Timestamp"},
        )
    return _RatingLayout(
        "\t", _RATING_COLUMNS, None, {c: i for i, c in enumerate(_RATING_COLUMNS)}, (),
        "4 tab-separated fields (user id, item id, rating, timestamp)", "\t",
        {"user": "1 (user id)", "item": "2 (item id)", "rating": "3 (rating)",
         "timestamp": "4 (timestamp)"},
    )


def _read_csv_header(source: _Source, fname: str) -> list[str]:
    with source.open(fname) as f:
        first = f.readline()
    if not first.strip():
        if not first:
            raise DatasetError(f"{source.display(fname)}: the file is empty")
        raise DatasetError(f"{source.display(fname)}: line 1: the header line is blank")
    try:
        text = first.decode("utf-8-sig").rstrip("\r\n")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{source.display(fname)}: line 1: not valid utf-8 text") from exc
    return [c.strip() for c in next(csv.reader([text]))]


def _parse_ratings(fmt: _Format, source: _Source, movie_ids: np.ndarray) -> pd.DataFrame:
    fname = fmt.ratings_file
    shown = source.display(fname)
    layout = _rating_layout(fmt, source)
    names = layout.names
    dtypes: dict[str, Any] = {
        names[layout.cols["user"]]: "int64",
        names[layout.cols["item"]]: "int64",
        names[layout.cols["rating"]]: "float32",
        names[layout.cols["timestamp"]]: "int64",
    }
    for j in layout.fillers:
        dtypes[names[j]] = "str"
    kwargs: dict[str, Any] = dict(
        sep=layout.sep,
        dtype=dtypes,
        na_filter=False,
        index_col=False,
        engine="c",
        encoding=_ratings_encoding(fmt),
    )
    if layout.header is not None:
        kwargs.update(header=0)
    else:
        kwargs.update(header=None, names=list(names), quoting=csv.QUOTE_NONE)
    try:
        with source.open(fname) as f, warnings.catch_warnings():
            warnings.simplefilter("error", pd.errors.ParserWarning)
            raw = pd.read_csv(f, **kwargs)
    except pd.errors.EmptyDataError as exc:
        raise DatasetError(f"{shown}: the file is empty") from exc
    except (ValueError, pd.errors.ParserWarning, UnicodeDecodeError) as exc:
        # Something did not parse: find and describe the first offending line.
        raise _diagnose_ratings(fmt, source, layout, movie_ids, exc) from exc
    if len(raw) == 0:
        if layout.header is None:
            raise DatasetError(f"{shown}: the file is empty (no ratings)")
        raise DatasetError(f"{shown}: the file has no ratings (only the header line)")

    n = len(raw)
    user = raw[names[layout.cols["user"]]].to_numpy(dtype=np.int64)
    item = raw[names[layout.cols["item"]]].to_numpy(dtype=np.int64)
    rating = raw[names[layout.cols["rating"]]].to_numpy(dtype=np.float32)
    ts = raw[names[layout.cols["timestamp"]]].to_numpy(dtype=np.int64)
    item_rank = _item_ranks(item, movie_ids)
    bad = ~_rating_ok(rating, fmt)
    bad |= item_rank < 0
    for j in layout.fillers:
        bad |= raw[names[j]].to_numpy() != ""
    del raw
    if bad.any():
        raise _report_row(fmt, source, layout, movie_ids, int(np.argmax(bad)), None)

    order = _sort_order(user, ts, item_rank)  # the rank orders like the movie id, in fewer bits
    return pd.DataFrame(
        {"user": user[order], "item": item[order], "rating": rating[order], "timestamp": ts[order]},
        index=pd.RangeIndex(n),
        copy=False,
    )


def _ratings_encoding(fmt: _Format) -> str:
    return "utf-8" if fmt.kind == "csv" else "latin-1"


def _bits(x: np.ndarray) -> int:
    return int(x.max()).bit_length() if len(x) else 0


def _sort_order(user: np.ndarray, ts: np.ndarray, item: np.ndarray) -> np.ndarray:
    """Stable order by (user, timestamp, item).

    ``np.lexsort`` on three 25M-row keys takes ~30 s; packing the keys into one uint64 and using a
    stable (timsort, fast on the mostly user-sorted files) argsort takes a few seconds.
    """
    u = (user - user.min()).astype(np.uint64)
    t = (ts - ts.min()).astype(np.uint64)
    i = (item - item.min()).astype(np.uint64)
    bu, bt, bi = _bits(u), _bits(t), _bits(i)
    if bu + bt + bi <= 64:
        key = (u << np.uint64(bt + bi)) | (t << np.uint64(bi)) | i
        return np.argsort(key, kind="stable")
    if bu + bt <= 64:
        # order by (user, timestamp), then by item within runs of equal (user, timestamp)
        ut = (u << np.uint64(bt)) | t
        del u, t
        first = np.argsort(ut, kind="stable")
        ut = ut[first]
        group = np.empty(len(ut), dtype=np.uint64)
        group[0] = 0
        np.cumsum(ut[1:] != ut[:-1], out=group[1:])
        del ut
        bg = _bits(group)
        if bg + bi <= 64:
            second = np.argsort((group << np.uint64(bi)) | i[first], kind="stable")
            return first[second]
    return np.lexsort((item, ts, user))


def _rating_ok(rating: np.ndarray, fmt: _Format) -> np.ndarray:
    """Rating on the scale: within [min, max] and a whole number of steps (NaN fails)."""
    lo, hi = fmt.scale
    r = np.asarray(rating, dtype=np.float32)
    with np.errstate(invalid="ignore"):
        scaled = r * np.float32(1.0 / fmt.step)  # x2 or x1: exact in float32
        return (r >= lo) & (r <= hi) & (scaled == np.rint(scaled))


def _item_ranks(item: np.ndarray, movie_ids: np.ndarray) -> np.ndarray:
    """Rank of each rated movie id among the sorted catalogue ids; -1 where not in the catalogue."""
    ids = np.sort(movie_ids)
    lo, hi = int(ids[0]), int(ids[-1])
    if hi - lo < 1 << 24:  # lookup table (at most 64 MiB)
        lut = np.full(hi - lo + 1, -1, dtype=np.int32)
        lut[ids - lo] = np.arange(len(ids), dtype=np.int32)
        ranks = lut[np.clip(item - lo, 0, hi - lo)].astype(np.int64)
    else:
        pos = np.minimum(np.searchsorted(ids, item), len(ids) - 1)
        ranks = np.where(ids[pos] == item, pos, -1).astype(np.int64)
    ranks[(item < lo) | (item > hi)] = -1
    return ranks


def _diagnose_ratings(
    fmt: _Format,
    source: _Source,
    layout: _RatingLayout,
    movie_ids: np.ndarray,
    exc: BaseException,
) -> DatasetError:
    """The typed read failed: re-read every field as text and find the first bad record with
    vectorised checks (pyarrow compute), then report its line. Records with the wrong number of
    fields are skipped by the text read but the first one is remembered (pyarrow's
    ``invalid_row_handler``); whichever problem comes first in the file is reported. Anything else
    (bad quoting, encoding) falls back to scanning the file line by line.
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pacsv

    names = list(layout.names)
    invalid: list[int | None] = []  # pyarrow's number of the first row with a bad field count

    def on_invalid_row(row: Any) -> str:
        if not invalid:
            invalid.append(row.number)
        return "skip"

    read = pacsv.ReadOptions(
        encoding=_ratings_encoding(fmt),
        column_names=None if layout.header is not None else names,
        block_size=1 << 24,
        use_threads=False,  # row numbers of invalid rows are only known when parsing serially
    )
    parse = pacsv.ParseOptions(
        delimiter=layout.sep,
        quote_char='"' if layout.header is not None else False,
        invalid_row_handler=on_invalid_row,
    )
    convert = pacsv.ConvertOptions(
        column_types={c: pa.string() for c in names}, null_values=[], strings_can_be_null=False
    )
    try:
        with source.open(fmt.ratings_file) as f:
            table = pacsv.read_csv(
                f, read_options=read, parse_options=parse, convert_options=convert
            )
    except (pa.ArrowInvalid, UnicodeDecodeError, ValueError):
        return _scan_ratings(fmt, source, layout, movie_ids, exc)
    if list(table.column_names) != names or (invalid and invalid[0] is None):
        return _scan_ratings(fmt, source, layout, movie_ids, exc)
    # pyarrow numbers non-empty rows from 1, header included; convert to a 0-based record index
    first_invalid = invalid[0] - (2 if layout.header is not None else 1) if invalid else None

    def column(field: str):
        return pc.utf8_trim_whitespace(table.column(names[layout.cols[field]]))

    def mask(values) -> np.ndarray:
        return np.asarray(values.to_numpy(zero_copy_only=False), dtype=bool)

    try:
        bad = np.zeros(table.num_rows, dtype=bool)
        for field in ("user", "timestamp"):
            bad |= ~mask(pc.match_substring_regex(column(field), _INT_PATTERN))
        items = column("item")
        item_ok = mask(pc.match_substring_regex(items, _INT_PATTERN))
        item_values = pc.cast(pc.if_else(pa.array(item_ok), items, "0"), pa.float64())
        item_values = item_values.to_numpy()
        bad |= ~item_ok | (_item_ranks(item_values.astype(np.int64), movie_ids) < 0)
        ratings = column("rating")
        rating_ok = mask(pc.match_substring_regex(ratings, _FLOAT_PATTERN))
        rating_values = pc.cast(pc.if_else(pa.array(rating_ok), ratings, "0"), pa.float64())
        rating_values = rating_values.to_numpy()
        bad |= ~rating_ok | ~_rating_ok(rating_values, fmt)
        for j in layout.fillers:
            bad |= mask(pc.not_equal(table.column(names[j]), ""))
    except (pa.ArrowInvalid, ValueError):  # a value the checks let through but cannot cast
        return _scan_ratings(fmt, source, layout, movie_ids, exc)
    del table
    row = int(np.argmax(bad)) if bad.any() else None
    # Rows before the first skipped (invalid) record keep their record index.
    if first_invalid is not None and (row is None or first_invalid <= row):
        row = first_invalid
    if row is None:
        return _scan_ratings(fmt, source, layout, movie_ids, exc)
    return _report_row(fmt, source, layout, movie_ids, row, exc)


def _line_problem(
    fmt: _Format, layout: _RatingLayout, text: str, known: set[int], movies_shown: str
) -> str | None:
    """Describe what is wrong with one (non-blank) data line of a ratings file, or ``None``.

    Uses the same definitions as the vectorised checks (``_INT_PATTERN``, ``_FLOAT_PATTERN``,
    :func:`_rating_ok`), so a record flagged there is described here.
    """
    if layout.header is not None and not text.lstrip()[:1].isdigit():
        if [c.strip() for c in next(csv.reader([text]), [])] == list(layout.header):
            return "duplicate header line inside the data"
    parts = text.split(layout.split)
    if len(parts) != len(layout.names) - len(layout.fillers):
        return f"expected {layout.describe}, found {len(parts)}"
    if layout.fillers:  # map the '::' split back onto the ':'-split field positions
        parts = [p for q in parts for p in (q, "")][:-1]
    for field, what in (("user", "user id"), ("item", "movie id")):
        raw = parts[layout.cols[field]]
        if not _INT_FULL.match(raw):
            return f"{what} {raw!r} in column {layout.col_names[field]} is not an integer"
    raw_rating = parts[layout.cols["rating"]]
    if not _FLOAT_FULL.match(raw_rating):
        return f"rating {raw_rating!r} in column {layout.col_names['rating']} is not a number"
    if not _rating_value_ok(float(raw_rating), fmt):
        lo, hi = fmt.scale
        allowed = (
            f"allowed {lo:g} to {hi:g} in steps of {fmt.step:g}"
            if fmt.step != 1.0
            else f"allowed whole numbers {lo:g} to {hi:g}"
        )
        return f"rating {raw_rating.strip()} is out of range ({allowed})"
    raw_ts = parts[layout.cols["timestamp"]]
    if not _INT_FULL.match(raw_ts):
        return f"timestamp {raw_ts!r} in column {layout.col_names['timestamp']} is not an integer"
    item = int(float(parts[layout.cols["item"]]))
    if item not in known:
        return f"movie id {item} is not in {movies_shown}"
    return None


def _data_lines(
    fmt: _Format, source: _Source, layout: _RatingLayout
) -> Iterator[tuple[int, bytes]]:
    """Non-blank data lines (header skipped) with their 1-based line numbers, undecoded."""
    with source.open(fmt.ratings_file) as f:
        for no, raw in enumerate(f, 1):
            if no == 1 and layout.header is not None:
                continue
            if raw.strip():
                yield no, raw


def _decode(fmt: _Format, raw: bytes) -> str:
    return raw.decode(_ratings_encoding(fmt), errors="replace").rstrip("\r\n")


def _report_row(
    fmt: _Format,
    source: _Source,
    layout: _RatingLayout,
    movie_ids: np.ndarray,
    row: int,
    exc: BaseException | None,
) -> DatasetError:
    """Error for the ``row``-th parsed record (0-based): find its line and describe it."""
    known = set(movie_ids.tolist())
    movies_shown = source.display(fmt.movies_file)
    for i, (no, raw) in enumerate(_data_lines(fmt, source, layout)):
        if i == row:
            problem = _line_problem(fmt, layout, _decode(fmt, raw), known, movies_shown)
            if problem is not None:
                return DatasetError(f"{source.display(fmt.ratings_file)}: line {no}: {problem}")
            break
    # The parser's rows and the file's lines disagree (unusual whitespace or quoting).
    return _scan_ratings(fmt, source, layout, movie_ids, exc)


def _scan_ratings(
    fmt: _Format,
    source: _Source,
    layout: _RatingLayout,
    movie_ids: np.ndarray,
    exc: BaseException | None,
) -> DatasetError:
    """Scan the ratings file line by line; return an error for the first bad line."""
    known = set(movie_ids.tolist())
    movies_shown = source.display(fmt.movies_file)
    shown = source.display(fmt.ratings_file)
    encoding = _ratings_encoding(fmt)
    any_line = False
    for no, raw in _data_lines(fmt, source, layout):
        any_line = True
        try:
            text = raw.decode(encoding).rstrip("\r\n")
        except UnicodeDecodeError as err:
            return DatasetError(f"{shown}: line {no}: not valid {encoding} text ({err.reason})")
        problem = _line_problem(fmt, layout, text, known, movies_shown)
        if problem is not None:
            return DatasetError(f"{shown}: line {no}: {problem}")
    if not any_line:
        return DatasetError(f"{shown}: the file has no ratings")
    detail = f": {type(exc).__name__}: {exc}" if exc is not None else ""
    return DatasetError(f"{shown}: could not be parsed{detail}")
