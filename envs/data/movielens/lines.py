"""Reading a dataset file line by line, and telling a file that was cut short.

Every official MovieLens file ends with a line break. A file whose last line has none was cut
short -- an interrupted copy, extraction or download -- and that last line must not be parsed: cut
inside a number it still parses, e.g. the timestamp 1493846415 cut to 149348 (a date in 1970) or
the rating 2.5 cut to 2. A file cut exactly after a line break cannot be told from a complete
one, unless it is a zip member whose data was cut: the archive's CRC still describes the whole.
"""

from __future__ import annotations

from collections.abc import Iterator

from envs.data.movielens.errors import DatasetError
from envs.data.movielens.sources import Source


def cut_short(shown: str, line: int) -> DatasetError:
    return DatasetError(
        f"{shown}: line {line}: the file ends inside this line (no line break after it), so it "
        f"was cut short; re-extract or re-download the dataset"
    )


def lines(source: Source, fname: str, encoding: str) -> Iterator[tuple[int, str]]:
    """(line number, text without the line ending) of every line of a file.

    Raises :class:`DatasetError` at a last line without a line break, before decoding it: a line
    cut inside a multi-byte character is reported as cut, not as an encoding error.
    """
    shown = source.display(fname)
    with source.open(fname) as f:
        for no, raw in enumerate(f, 1):
            if not raw.endswith(b"\n"):
                raise cut_short(shown, no)
            try:
                text = raw.decode("utf-8-sig" if no == 1 and encoding == "utf-8" else encoding)
            except UnicodeDecodeError as exc:
                raise DatasetError(
                    f"{shown}: line {no}: not valid {encoding} text ({exc.reason} "
                    f"at byte {exc.start})"
                ) from exc
            yield no, text.rstrip("\r\n")


def raise_if_cut_short(source: Source, fname: str) -> None:
    """Read the whole file; raise :class:`DatasetError` naming its last line if it has no line
    break. For files parsed without :func:`lines` (pandas), where the line number is unknown."""
    line_breaks = 0
    last = b""
    with source.open(fname) as f:
        while chunk := f.read(1 << 20):
            line_breaks += chunk.count(b"\n")
            last = chunk[-1:]
    if last and last != b"\n":
        raise cut_short(source.display(fname), line_breaks + 1)
