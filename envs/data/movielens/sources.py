"""Where a dataset's files are read from: an extracted folder or a zip archive.

A folder holds the files directly or in one sub-folder named like the dataset (``data/ml-100k/``);
an archive holds them under ``<name>/`` (the official layout), at its root, or under another
top-level folder. Files are opened as :class:`DatasetFile`, which names the file in read errors.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
import zlib
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from envs.data.movielens.errors import DatasetError
from envs.data.movielens.formats import Format

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self needs Python 3.11

# What zipfile raises for a damaged archive or member, when opening it and again while reading a
# member: truncated deflate data raises EOFError or zlib.error, a bad CRC BadZipFile at its end.
ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError)


class DatasetFile(io.BufferedReader):
    """A dataset file open for buffered binary reading.

    A read that fails -- a zip member that is truncated or fails its CRC check, an I/O error --
    raises a one-line :class:`DatasetError` naming the file, whichever parser is reading it. It
    also remembers the last byte read, so a parser that streamed the whole file (pandas) can
    tell afterwards whether the file ended with a line break -- whether it was cut short -- without
    reading it a second time (for a zip member, a second decompression).
    """

    def __init__(self, stream: IO[bytes], shown: str) -> None:
        self._reads = _NamedReads(stream, shown)
        super().__init__(self._reads, buffer_size=1 << 16)

    @property
    def ends_with_line_break(self) -> bool:
        """Whether the bytes read so far end with ``\\n``: once read to the end, the whole file."""
        return self._reads.last_byte == b"\n"


class _NamedReads(io.RawIOBase):
    """The raw reads under a :class:`DatasetFile`: turns read errors into one-line
    :class:`DatasetError` naming the file and keeps the last byte read."""

    def __init__(self, stream: IO[bytes], shown: str) -> None:
        self._stream = stream
        self._shown = shown
        self.last_byte = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        try:
            # FileIO and zipfile's ZipExtFile both have readinto; typing.IO does not declare it.
            n = self._stream.readinto(buffer)  # type: ignore[attr-defined]
        except ZIP_ERRORS as exc:
            raise corrupt_zip(self._shown, exc) from exc
        except OSError as exc:
            raise DatasetError(f"{self._shown}: cannot read: {exc.strerror or exc}") from exc
        if n:
            self.last_byte = bytes(buffer[n - 1 : n])
        return n

    def close(self) -> None:
        try:
            self._stream.close()
        finally:
            super().close()


class Source:
    location: str

    def open(self, fname: str) -> DatasetFile:
        raise NotImplementedError

    def display(self, fname: str) -> str:
        """How messages name ``fname``: its path, or ``<zip>:<member>``."""
        raise NotImplementedError

    def fingerprint(self, fmt: Format) -> list[Any]:
        """Path, size and mtime of what holds the files: the parsed-data cache key."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class FolderSource(Source):
    def __init__(self, root: Path) -> None:
        self.root = root
        self.location = str(root)

    def open(self, fname: str) -> DatasetFile:
        shown = self.display(fname)
        try:
            # unbuffered: DatasetFile is the buffer
            return DatasetFile(open(self.root / fname, "rb", buffering=0), shown)
        except OSError as exc:
            raise DatasetError(f"{shown}: cannot open: {exc.strerror or exc}") from exc

    def display(self, fname: str) -> str:
        return str(self.root / fname)

    def fingerprint(self, fmt: Format) -> list[Any]:
        out = []
        for fname in fmt.files:
            p = (self.root / fname).resolve()
            st = p.stat()
            out.append([str(p), st.st_size, st.st_mtime_ns])
        return out


class ZipSource(Source):
    def __init__(self, zip_path: Path, zf: zipfile.ZipFile, prefix: str) -> None:
        self.zip_path = zip_path
        self.zf = zf
        self.prefix = prefix
        self.location = str(zip_path)

    def open(self, fname: str) -> DatasetFile:
        try:
            member = self.zf.open(self.prefix + fname)
        except (*ZIP_ERRORS, OSError) as exc:
            raise corrupt_zip(self.display(fname), exc) from exc
        return DatasetFile(member, self.display(fname))

    def display(self, fname: str) -> str:
        return f"{self.zip_path}:{self.prefix}{fname}"

    def fingerprint(self, fmt: Format) -> list[Any]:
        p = self.zip_path.resolve()
        st = p.stat()
        return [[str(p), self.prefix, st.st_size, st.st_mtime_ns]]

    def close(self) -> None:
        self.zf.close()


def corrupt_zip(what: str, exc: BaseException) -> DatasetError:
    return DatasetError(
        f"{what}: not a valid zip archive (truncated or corrupt): {exc}; "
        f"re-download or re-create the archive"
    )


def missing_files(folder: Path, fmt: Format) -> list[str]:
    return [f for f in fmt.files if not (folder / f).is_file()]


def source_from_path(fmt: Format, p: Path, sha256: str | None) -> Source:
    """The folder or zip at ``p``; a zip is checked against ``sha256`` when one is given."""
    if not p.exists():
        raise DatasetError(
            f"{p}: no such file or folder "
            f"(expected an extracted {fmt.name} folder or {fmt.name}.zip)"
        )
    if p.is_dir():
        missing = missing_files(p, fmt)
        if not missing:
            return FolderSource(p)
        sub = p / fmt.name
        if sub.is_dir() and not missing_files(sub, fmt):
            return FolderSource(sub)
        raise DatasetError(
            f"{p}: folder does not contain the {fmt.name} files (missing {', '.join(missing)}; "
            f"looked in {p}/ and {sub}/)"
        )
    if sha256 is not None:
        got = sha256_file(p)
        if got != sha256:
            raise DatasetError(f"{p}: sha256 checksum mismatch: expected {sha256}, got {got}")
    try:
        zf = zipfile.ZipFile(p)
    except ZIP_ERRORS as exc:
        raise corrupt_zip(str(p), exc) from exc
    except OSError as exc:
        raise DatasetError(f"{p}: cannot open: {exc.strerror or exc}") from exc
    try:
        prefix = zip_prefix(fmt, zf, str(p))
    except BaseException:
        zf.close()
        raise
    return ZipSource(p, zf, prefix)


def zip_prefix(fmt: Format, zf: zipfile.ZipFile, what: str) -> str:
    """The folder inside the archive that holds the dataset's files (``""`` for the root)."""
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


def source_from_cache(fmt: Format, cache_root: Path) -> Source | None:
    """The copy extracted (or the zip placed) in ``cache_root/movielens/``, if there is one."""
    folder = cache_root / "movielens" / fmt.name
    if folder.is_dir() and not missing_files(folder, fmt):
        return FolderSource(folder)
    archive = folder.with_name(f"{fmt.name}.zip")
    if archive.is_file():
        return source_from_path(fmt, archive, None)
    return None


def sha256_file(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
