"""How the lines of a ratings file are laid out (separator, fields, header) in each release, and
matching a CSV header line to the columns a file needs."""

from __future__ import annotations

import csv
from dataclasses import dataclass

from envs.data.movielens.errors import DatasetError
from envs.data.movielens.formats import CSV_RATING_HEADER, RATING_COLUMNS, Format
from envs.data.movielens.lines import cut_short
from envs.data.movielens.sources import Source
from envs.data.movielens.values import FLOAT_FULL


@dataclass(frozen=True)
class RatingLayout:
    sep: str  # separator used by pandas' C parser
    names: tuple[str, ...]  # all fields of a line
    header: tuple[str, ...] | None  # header line fields (csv only)
    cols: dict[str, int]  # user/item/rating/timestamp -> field index
    fillers: tuple[int, ...]  # fields that must be empty (the ':' trick for '::')
    describe: str  # how a line looks, for messages
    split: str  # separator for the line scanner
    col_names: dict[str, str]  # user/item/rating/timestamp -> column name for messages


def rating_layout(fmt: Format, source: Source) -> RatingLayout:
    fname = fmt.ratings_file
    if fmt.kind == "csv":
        header = read_csv_header(source, fname)
        idx = header_index(source.display(fname), header, CSV_RATING_HEADER)
        cols = dict(zip(RATING_COLUMNS, idx, strict=True))
        return RatingLayout(
            ",", tuple(header), tuple(header), cols, (), f"{len(header)} comma-separated fields "
            f"({','.join(header)})", ",", dict(zip(RATING_COLUMNS, CSV_RATING_HEADER, strict=True)),
        )
    if fmt.kind == "dat":
        # "::" is not supported by the C parser: split on ':' and require every other field empty.
        return RatingLayout(
            ":", ("user", "_1", "item", "_2", "rating", "_3", "timestamp"), None,
            {"user": 0, "item": 2, "rating": 4, "timestamp": 6}, (1, 3, 5),
            "4 fields separated by '::' (UserID::MovieID::Rating::Timestamp)", "::",
            {"user": "UserID", "item": "MovieID", "rating": "Rating", "timestamp": "Timestamp"},
        )
    return RatingLayout(
        "\t", RATING_COLUMNS, None, {c: i for i, c in enumerate(RATING_COLUMNS)}, (),
        "4 tab-separated fields (user id, item id, rating, timestamp)", "\t",
        {"user": "1 (user id)", "item": "2 (item id)", "rating": "3 (rating)",
         "timestamp": "4 (timestamp)"},
    )


def read_csv_header(source: Source, fname: str) -> list[str]:
    shown = source.display(fname)
    with source.open(fname) as f:
        first = f.readline()
    if not first:
        raise DatasetError(f"{shown}: the file is empty")
    if not first.endswith(b"\n"):  # cut inside the header: its columns would look missing
        raise cut_short(shown, 1)
    if not first.strip():
        raise DatasetError(f"{shown}: line 1: the header line is blank")
    try:
        text = first.decode("utf-8-sig").rstrip("\r\n")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{shown}: line 1: not valid utf-8 text") from exc
    return [c.strip() for c in next(csv.reader([text]))]


def header_index(shown: str, header: list[str], required: tuple[str, ...]) -> list[int]:
    """Position of each ``required`` column in ``header``."""
    missing = [c for c in required if c not in header]
    if missing:
        hint = ""
        if header and all(FLOAT_FULL.match(c) for c in header if c):
            hint = " (the header line seems to be missing)"
        raise DatasetError(
            f"{shown}: line 1 (header): missing column(s) {', '.join(missing)}; columns found: "
            f"{', '.join(header) if any(header) else 'none'}; expected {','.join(required)}{hint}"
        )
    return [header.index(c) for c in required]
