"""The IMDb Large Movie Review Dataset (aclImdb v1.0, Maas et al. 2011), read where it lies.

Three shapes of the official tree are accepted, all without unpacking anything to disk:

* an extracted folder: ``aclImdb/`` itself, or a folder holding it;
* the official ``aclImdb_v1.tar.gz`` (or any ``.tar.gz`` / ``.tar`` of the tree);
* a folder of archives that each hold part of the tree under the official ``aclImdb/...``
  paths (``../shared/data/imdb``: train, test and unlabelled as three ``.tar.gz`` files);
* with no path, the official archive in the cache (``<cache>/imdb/aclImdb_v1.tar.gz``), which
  ``download=True`` fetches first if it is missing: streamed to a temporary file, checked against
  its published sha256 and only then renamed into place, so a failed or tampered download leaves
  nothing behind.

A review is ``aclImdb/<split>/<pos|neg|unsup>/<id>_<rating>.txt``: raw UTF-8 with its original
``<br />`` tags. Positive reviews are rated 7–10, negative 1–4, unlabelled ones 0, and the
unlabelled ones exist only under ``train``. Anything else — a damaged or truncated archive, a
review that is not UTF-8, a rating off its label's range, a review given twice, a missing
labelled split — is a :class:`DatasetError` with one line that names the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tarfile
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from envs.data.errors import DatasetError
from envs.data.movielens.download import stream_download
from envs.data.movielens.parsed_cache import default_cache_dir

OFFICIAL_URL = "https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz"
# sha256 of the official aclImdb_v1.tar.gz, as pinned by several independent public projects
# that download it (dataset managers in Rust, Go and Julia, and checksum-checked shell scripts).
OFFICIAL_SHA256 = "c40f74a18d3b61f90feba1e17730e0d38e8b97c05fde7008942e91923d1658fe"
ARCHIVE_NAME = "aclImdb_v1.tar.gz"

SPLITS = ("train", "test", "unsup")
LABELS = {"pos": 1, "neg": 0, "unsup": -1}
RATINGS = {"pos": range(7, 11), "neg": range(1, 5), "unsup": range(0, 1)}
MEMBER_RE = re.compile(r"(?:^|/)aclImdb/(train|test)/(pos|neg|unsup)/(\d+)_(\d+)\.txt$")
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")
# Everything tarfile and gzip raise on a damaged, truncated or foreign file.
ARCHIVE_ERRORS = (tarfile.TarError, EOFError, zlib.error, OSError)


@dataclass(frozen=True)
class Review:
    """One review: ``label`` 1 positive, 0 negative, -1 unlabelled; ``rating`` 1–10 (0 unlabelled)."""

    split: str
    review_id: int
    label: int
    rating: int
    text: str


@dataclass(frozen=True)
class ImdbData:
    """The reviews of each split (``train``, ``test``, ``unsup``), sorted by label then id."""

    source: str
    reviews: dict[str, list[Review]]

    def counts(self) -> dict[str, int]:
        """Reviews per split and label, e.g. ``train_pos``: 12,500 for the official data."""
        out: dict[str, int] = {}
        for split in ("train", "test"):
            for name, label in (("pos", 1), ("neg", 0)):
                out[f"{split}_{name}"] = sum(r.label == label for r in self.reviews[split])
        out["unsup"] = len(self.reviews["unsup"])
        return out


def _review(name: str, data: bytes, where: str) -> Review | None:
    """The review of member/file ``name`` (None: not a review file), checked."""
    match = MEMBER_RE.search(name)
    if match is None:
        return None
    split, kind, review_id, rating = match.group(1), match.group(2), int(match.group(3)), int(match.group(4))
    if kind == "unsup" and split != "train":
        raise DatasetError(f"{where}: {name}: unlabelled reviews belong under aclImdb/train/unsup")
    if (kind != "unsup" and rating not in RATINGS[kind]) or (kind == "unsup" and rating != 0):
        allowed = RATINGS[kind]
        raise DatasetError(
            f"{where}: {name}: rating {rating} is off the {kind} range {allowed.start}–{allowed.stop - 1}"
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DatasetError(f"{where}: {name}: not UTF-8 text (byte offset {err.start})") from None
    return Review("unsup" if kind == "unsup" else split, review_id, LABELS[kind], rating, text)


def _from_archive(path: Path) -> Iterator[Review]:
    try:
        with tarfile.open(path, "r:*") as archive:
            for member in archive:
                if not member.isfile() or MEMBER_RE.search(member.name) is None:
                    continue
                handle = archive.extractfile(member)
                if handle is None:
                    continue
                review = _review(member.name, handle.read(), str(path))
                if review is not None:
                    yield review
    except ARCHIVE_ERRORS as err:
        raise DatasetError(
            f"{path}: not a readable tar archive ({type(err).__name__}: {err}) — it is damaged or "
            "truncated; copy or download it again"
        ) from None


def _from_folder(root: Path) -> Iterator[Review]:
    for path in sorted(root.glob("*/*/*.txt")):
        rel = f"aclImdb/{path.relative_to(root).as_posix()}"
        if MEMBER_RE.search(rel) is None:
            continue
        try:
            data = path.read_bytes()
        except OSError as err:
            raise DatasetError(f"{path}: unreadable ({err.strerror or err})") from None
        review = _review(rel, data, str(root))
        if review is not None:
            yield review


def _sources(path: Path) -> tuple[str, list[Iterator[Review]]]:
    if path.is_file():
        return f"archive {path}", [_from_archive(path)]
    if not path.is_dir():
        raise DatasetError(f"{path}: no such file or folder — give the aclImdb folder or its .tar.gz archive(s)")
    for root in (path, path / "aclImdb"):
        if (root / "train").is_dir() and (root / "test").is_dir():
            return f"folder {root}", [_from_folder(root)]
    archives = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(ARCHIVE_SUFFIXES))
    if archives:
        return f"archives in {path}", [_from_archive(p) for p in archives]
    raise DatasetError(
        f"{path}: holds neither an aclImdb/ tree (train/ and test/) nor .tar.gz archives of it"
    )


def fetch_official(cache_dir: str | Path | None = None, url: str = OFFICIAL_URL,
                   expected: str = OFFICIAL_SHA256) -> Path:
    """Download the official archive into ``<cache>/imdb/`` (checked, atomic); its path."""
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    folder = folder / "imdb"
    target = folder / ARCHIVE_NAME
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=folder, prefix=f".{ARCHIVE_NAME}.", suffix=".part")
    except OSError as err:
        raise DatasetError(f"{folder}: cannot write the download cache: {err}") from None
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            digest = stream_download(url, out)
        if digest != expected:
            raise DatasetError(
                f"{url}: sha256 checksum mismatch: expected {expected}, got {digest}; the download was discarded"
            )
        os.replace(tmp, target)
    except OSError as err:
        raise DatasetError(f"{target}: cannot store the download ({err.strerror or err})") from None
    finally:
        tmp.unlink(missing_ok=True)
    return target


def load_imdb(
    path: str | Path | None = None,
    cache_dir: str | Path | None = None,
    download: bool = False,
    url: str = OFFICIAL_URL,
    expected: str = OFFICIAL_SHA256,
) -> ImdbData:
    """Every review under ``path``, or in the cached official archive (see the module docstring)."""
    if path is None:
        folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        cached = folder / "imdb" / ARCHIVE_NAME
        if not cached.is_file():
            if not download:
                raise DatasetError(
                    f"imdb: not found in the cache ({cached}) — give the path of a copy (--path), "
                    f"or allow (--download) the download of {url}"
                )
            cached = fetch_official(cache_dir, url, expected)
        path = cached
    path = Path(path).expanduser()
    source, streams = _sources(path)
    entry = _parsed_entry(path, cache_dir)
    if entry is not None:
        cached_reviews = _read_parsed(entry)
        if cached_reviews is not None:
            return ImdbData(source, cached_reviews)
    reviews: dict[str, list[Review]] = {s: [] for s in SPLITS}
    seen: set[tuple[str, int, int]] = set()
    for stream in streams:
        for review in stream:
            key = (review.split, review.label, review.review_id)
            if key in seen:
                kind = {1: "pos", 0: "neg", -1: "unsup"}[review.label]
                raise DatasetError(f"{path}: review {review.split}/{kind}/{review.review_id} is given twice")
            seen.add(key)
            reviews[review.split].append(review)
    for split in ("train", "test"):
        for label, kind in ((1, "pos"), (0, "neg")):
            if not any(r.label == label for r in reviews[split]):
                raise DatasetError(
                    f"{path}: no aclImdb/{split}/{kind}/ reviews — the copy is incomplete (the official "
                    "tree has 12,500 in each)"
                )
    for split in SPLITS:
        reviews[split].sort(key=lambda r: (-r.label, r.review_id))
    if entry is not None:
        _write_parsed(entry, reviews)
    return ImdbData(source, reviews)


# Part of the parsed cache's key: raise it whenever the parser accepts less than before.
PARSER_VERSION = 1
_COLUMNS = ("split", "review_id", "label", "rating", "text")


def _parsed_entry(path: Path, cache_dir: str | Path | None) -> Path | None:
    """Where the parse of archive(s) ``path`` is cached (parquet), keyed by every archive's
    resolved path, size and mtime; None for an extracted folder (100,000 files to stat)."""
    if path.is_file():
        files = [path]
    else:
        if any((root / "train").is_dir() for root in (path, path / "aclImdb")):
            return None
        files = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(ARCHIVE_SUFFIXES))
    try:
        fingerprint = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    except OSError:
        return None
    blob = json.dumps({"v": PARSER_VERSION, "files": fingerprint}).encode()
    base = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return base / "parsed" / f"imdb-{hashlib.sha256(blob).hexdigest()[:20]}"


def _read_parsed(entry: Path) -> dict[str, list[Review]] | None:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(entry / "reviews.parquet")
        columns = [table.column(c).to_pylist() for c in _COLUMNS]
    except Exception:  # noqa: BLE001 - an unreadable cache entry is only a cache miss
        return None
    reviews: dict[str, list[Review]] = {s: [] for s in SPLITS}
    for split, review_id, label, rating, text in zip(*columns, strict=True):
        reviews[split].append(Review(split, review_id, label, rating, text))
    return reviews


def _write_parsed(entry: Path, reviews: dict[str, list[Review]]) -> None:
    """Write the cache entry atomically; a cache that cannot be written is no error."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [r for split in SPLITS for r in reviews[split]]
    table = pa.table({c: [getattr(r, c) for r in rows] for c in _COLUMNS})
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=".imdb-", dir=entry.parent))
    except OSError:
        return
    try:
        pq.write_table(table, work / "reviews.parquet")
        os.rename(work, entry)  # fails if a concurrent load wrote it first: theirs is as good
    except OSError:
        pass
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)


def is_judge_review(review: Review) -> bool:
    """Whether ``review`` is kept for the independent judge: the test reviews with an odd id. No
    client ever holds one (their prompts come from the even ids, their feedback from train)."""
    return review.split == "test" and review.review_id % 2 == 1


class ShardError(ValueError):
    """The requested client shards cannot be cut from the data (the message names the setting)."""


@dataclass(frozen=True)
class ImdbShard:
    """One client's private reviews: labelled training reviews (its human feedback) and held-out
    test reviews (whose openings are its evaluation prompts)."""

    client_id: int
    train: tuple[Review, ...]
    test: tuple[Review, ...]

    @property
    def positive_share(self) -> float:
        return sum(r.label for r in self.train) / max(1, len(self.train))


def positive_shares(num_clients: int, label_skew: float) -> list[float]:
    """Client k's share of positive reviews: linear from 0.5 − s/2 to 0.5 + s/2 (0.5 for one client)."""
    if num_clients == 1:
        return [0.5]
    return [0.5 + label_skew * (k / (num_clients - 1) - 0.5) for k in range(num_clients)]


def shard_imdb(
    data: ImdbData, *, num_clients: int, reviews_per_client: int, test_per_client: int,
    label_skew: float = 0.0, seed: int = 0,
) -> list[ImdbShard]:
    """K disjoint shards, IID (``label_skew`` 0) or skewed by label, deterministic in ``seed``.

    Reviews whose text repeats another's are dropped first, so no text is in two shards, and so
    are the judge's (:func:`is_judge_review`): held-out prompts come from half the test split.
    """
    shards: dict[int, dict[str, list[Review]]] = {k: {"train": [], "test": []} for k in range(num_clients)}
    shares = positive_shares(num_clients, label_skew)
    judge_texts = {r.text for r in data.reviews["test"] if is_judge_review(r)}
    for split, per_client, setting in (
        ("train", reviews_per_client, "reviews_per_client"), ("test", test_per_client, "test_prompts_per_client")
    ):
        # The judge's texts count as seen: no client holds a review the judge learnt from.
        seen = set(judge_texts)
        unique = []
        for review in data.reviews[split]:
            if review.text not in seen:
                seen.add(review.text)
                unique.append(review)
        rng = np.random.default_rng([seed, SPLITS.index(split)])
        for label in (1, 0):
            pool = [r for r in unique if r.label == label]
            order = rng.permutation(len(pool))
            positives = [round(per_client * s) for s in shares]
            wanted = positives if label == 1 else [per_client - p for p in positives]
            if sum(wanted) > len(pool):
                name = "positive" if label == 1 else "negative"
                raise ShardError(
                    f"{setting}: got {per_client} — {num_clients} clients need {sum(wanted)} {name} {split} "
                    f"reviews and the data has {len(pool)} distinct ones; lower it or clients.num_clients"
                )
            start = 0
            for k, count in enumerate(wanted):
                shards[k][split].extend(pool[i] for i in order[start:start + count])
                start += count
    out = []
    for k in range(num_clients):
        parts = {}
        for split in ("train", "test"):
            reviews = shards[k][split]
            order = np.random.default_rng([seed, 7, k, SPLITS.index(split)]).permutation(len(reviews))
            parts[split] = tuple(reviews[i] for i in order)
        out.append(ImdbShard(k, parts["train"], parts["test"]))
    return out
