"""Locating and describing the first bad line of a ratings file, once the fast typed read has
failed or its vectorised checks found a bad record.

The fast path reports no line numbers, so the file is read again: first as text columns with
pyarrow and checked vectorised (the record index is mapped back to its line), and only when that
cannot tell, line by line. Every message names the file, the 1-based line (as an editor counts; a
header is line 1) and the problem.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from typing import Any

import numpy as np

from envs.data.movielens.errors import DatasetError
from envs.data.movielens.formats import Format
from envs.data.movielens.layouts import RatingLayout
from envs.data.movielens.sources import Source
from envs.data.movielens.values import (
    FLOAT_FULL,
    FLOAT_PATTERN,
    INT_FULL,
    INT_PATTERN,
    item_ranks,
    rating_ok,
    rating_value_ok,
)


def diagnose_ratings(
    fmt: Format,
    source: Source,
    layout: RatingLayout,
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
        encoding=fmt.encoding,
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
        return scan_ratings(fmt, source, layout, movie_ids, exc)
    if list(table.column_names) != names or (invalid and invalid[0] is None):
        return scan_ratings(fmt, source, layout, movie_ids, exc)
    # pyarrow numbers non-empty rows from 1, header included; convert to a 0-based record index
    first_row = invalid[0] if invalid else None  # never None here: returned above
    first_invalid = first_row - (2 if layout.header is not None else 1) if first_row is not None else None

    def column(field: str):
        return pc.utf8_trim_whitespace(table.column(names[layout.cols[field]]))

    def mask(values) -> np.ndarray:
        return np.asarray(values.to_numpy(zero_copy_only=False), dtype=bool)

    try:
        bad = np.zeros(table.num_rows, dtype=bool)
        for field in ("user", "timestamp"):
            bad |= ~mask(pc.match_substring_regex(column(field), INT_PATTERN))
        items = column("item")
        item_ok = mask(pc.match_substring_regex(items, INT_PATTERN))
        item_values = pc.cast(pc.if_else(pa.array(item_ok), items, "0"), pa.float64())
        item_values = item_values.to_numpy()
        bad |= ~item_ok | (item_ranks(item_values.astype(np.int64), movie_ids) < 0)
        ratings = column("rating")
        rating_is_number = mask(pc.match_substring_regex(ratings, FLOAT_PATTERN))
        rating_values = pc.cast(pc.if_else(pa.array(rating_is_number), ratings, "0"), pa.float64())
        rating_values = rating_values.to_numpy()
        bad |= ~rating_is_number | ~rating_ok(rating_values, fmt)
        for j in layout.fillers:
            bad |= mask(pc.not_equal(table.column(names[j]), ""))
    except (pa.ArrowInvalid, ValueError):  # a value the checks let through but cannot cast
        return scan_ratings(fmt, source, layout, movie_ids, exc)
    table = None  # free the text columns before report_row reads the file again
    row = int(np.argmax(bad)) if bad.any() else None
    # Rows before the first skipped (invalid) record keep their record index.
    if first_invalid is not None and (row is None or first_invalid <= row):
        row = first_invalid
    if row is None:
        return scan_ratings(fmt, source, layout, movie_ids, exc)
    return report_row(fmt, source, layout, movie_ids, row, exc)


def line_problem(
    fmt: Format, layout: RatingLayout, text: str, known: set[int], movies_shown: str
) -> str | None:
    """Describe what is wrong with one (non-blank) data line of a ratings file, or ``None``.

    Uses the same definitions as the vectorised checks (``INT_PATTERN``, ``FLOAT_PATTERN``,
    :func:`rating_ok`), so a record flagged there is described here.
    """
    if (
        layout.header is not None
        and not text.lstrip()[:1].isdigit()
        and [c.strip() for c in next(csv.reader([text]), [])] == list(layout.header)
    ):
        return "duplicate header line inside the data"
    parts = text.split(layout.split)
    if len(parts) != len(layout.names) - len(layout.fillers):
        return f"expected {layout.describe}, found {len(parts)}"
    if layout.fillers:  # map the '::' split back onto the ':'-split field positions
        parts = [p for q in parts for p in (q, "")][:-1]
    for field, what in (("user", "user id"), ("item", "movie id")):
        raw = parts[layout.cols[field]]
        if not INT_FULL.match(raw):
            return f"{what} {raw!r} in column {layout.col_names[field]} is not an integer"
    raw_rating = parts[layout.cols["rating"]]
    if not FLOAT_FULL.match(raw_rating):
        return f"rating {raw_rating!r} in column {layout.col_names['rating']} is not a number"
    if not rating_value_ok(float(raw_rating), fmt):
        lo, hi = fmt.scale
        allowed = (
            f"allowed {lo:g} to {hi:g} in steps of {fmt.step:g}"
            if fmt.step != 1.0
            else f"allowed whole numbers {lo:g} to {hi:g}"
        )
        return f"rating {raw_rating.strip()} is out of range ({allowed})"
    raw_ts = parts[layout.cols["timestamp"]]
    if not INT_FULL.match(raw_ts):
        return f"timestamp {raw_ts!r} in column {layout.col_names['timestamp']} is not an integer"
    item = int(float(parts[layout.cols["item"]]))
    if item not in known:
        return f"movie id {item} is not in {movies_shown}"
    return None


def _data_lines(fmt: Format, source: Source, layout: RatingLayout) -> Iterator[tuple[int, bytes]]:
    """Non-blank data lines (header skipped) with their 1-based line numbers, undecoded."""
    with source.open(fmt.ratings_file) as f:
        for no, raw in enumerate(f, 1):
            if no == 1 and layout.header is not None:
                continue
            if raw.strip():
                yield no, raw


def report_row(
    fmt: Format,
    source: Source,
    layout: RatingLayout,
    movie_ids: np.ndarray,
    row: int,
    exc: BaseException | None,
) -> DatasetError:
    """Error for the ``row``-th parsed record (0-based): find its line and describe it."""
    known = set(movie_ids.tolist())
    movies_shown = source.display(fmt.movies_file)
    for i, (no, raw) in enumerate(_data_lines(fmt, source, layout)):
        if i == row:
            text = raw.decode(fmt.encoding, errors="replace").rstrip("\r\n")
            problem = line_problem(fmt, layout, text, known, movies_shown)
            if problem is not None:
                return DatasetError(f"{source.display(fmt.ratings_file)}: line {no}: {problem}")
            break
    # The parser's rows and the file's lines disagree (unusual whitespace or quoting).
    return scan_ratings(fmt, source, layout, movie_ids, exc)


def scan_ratings(
    fmt: Format,
    source: Source,
    layout: RatingLayout,
    movie_ids: np.ndarray,
    exc: BaseException | None,
) -> DatasetError:
    """Scan the ratings file line by line; return an error for the first bad line."""
    known = set(movie_ids.tolist())
    movies_shown = source.display(fmt.movies_file)
    shown = source.display(fmt.ratings_file)
    any_line = False
    for no, raw in _data_lines(fmt, source, layout):
        any_line = True
        try:
            text = raw.decode(fmt.encoding).rstrip("\r\n")
        except UnicodeDecodeError as err:
            return DatasetError(f"{shown}: line {no}: not valid {fmt.encoding} text ({err.reason})")
        problem = line_problem(fmt, layout, text, known, movies_shown)
        if problem is not None:
            return DatasetError(f"{shown}: line {no}: {problem}")
    if not any_line:
        return DatasetError(f"{shown}: the file has no ratings")
    detail = f": {type(exc).__name__}: {exc}" if exc is not None else ""
    return DatasetError(f"{shown}: could not be parsed{detail}")
