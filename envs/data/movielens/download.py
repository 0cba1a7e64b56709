"""Downloading the official GroupLens archive into the cache: streamed to a temporary file,
checked against its sha256, extracted into a temporary folder and only then renamed into place,
so a failed download, a checksum mismatch or a corrupt archive leaves nothing in the cache."""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from typing import IO

from envs.data.movielens.errors import DatasetError
from envs.data.movielens.formats import Format
from envs.data.movielens.sources import (
    ZIP_ERRORS,
    corrupt_zip,
    missing_files,
    zip_prefix,
)

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


def download_and_extract(fmt: Format, cache_root: Path, url: str, expected: str) -> Path:
    """Download ``url``, check its sha256 against ``expected`` and extract it to
    ``cache_root/movielens/<name>/``; return that folder."""
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
            digest = stream_download(url, out)
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
            if not (target.is_dir() and not missing_files(target, fmt)):
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


def stream_download(url: str, out: IO[bytes]) -> str:
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


def _extract(fmt: Format, zip_path: Path, dest: Path, what: str) -> Path:
    """Extract the dataset's folder from ``zip_path`` into ``dest``; return the extracted root."""
    try:
        with zipfile.ZipFile(zip_path) as zf:
            prefix = zip_prefix(fmt, zf, what)
            for info in zf.infolist():
                if info.filename.startswith(prefix):
                    zf.extract(info, dest)
    except ZIP_ERRORS as exc:
        raise corrupt_zip(what, exc) from exc
    except OSError as exc:
        raise DatasetError(f"{what}: cannot extract into {dest}: {exc}") from exc
    root = dest / prefix.rstrip("/") if prefix else dest
    missing = missing_files(root, fmt)
    if missing:
        raise DatasetError(f"{what}: extraction produced no {', '.join(missing)}")
    return root
