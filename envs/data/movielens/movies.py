"""Parsing the movies file (and ml-100k's ``u.genre``) into the catalogue frame: one row per
movie with its id, title, year and one 0/1 column per genre."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from typing import Any

import numpy as np
import pandas as pd

from envs.data.movielens.errors import DatasetError
from envs.data.movielens.formats import CSV_MOVIE_HEADER, GENRE_PREFIX, Format
from envs.data.movielens.layouts import header_index
from envs.data.movielens.lines import lines
from envs.data.movielens.sources import Source
from envs.data.movielens.values import INT_FULL

_YEAR_RE = r"\((\d{4})(?:\s*[-\u2013]\s*(?:\d{4})?)?\)\s*$"


def parse_movies(fmt: Format, source: Source) -> tuple[pd.DataFrame, tuple[str, ...]]:
    """The catalogue frame (in file order) and the genre names of its genre columns."""
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
        if not INT_FULL.match(raw):
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
        numbered = lines(source, fname, fmt.encoding)
        numbers: list[int] = []

        def texts() -> Iterator[str]:
            for no, text in numbered:
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
                idx = header_index(shown, header, CSV_MOVIE_HEADER)
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
        for no, text in lines(source, fname, fmt.encoding):
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
        for no, text in lines(source, fname, fmt.encoding):
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
                column = col.get(g)
                if column is not None:
                    genre_matrix[i, column] = 1

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
        data[GENRE_PREFIX + g] = genre_matrix[:, j]
    return pd.DataFrame(data), genre_names


def _split_genres(text: str) -> list[str]:
    return [g.strip() for g in text.split("|") if g.strip()]


def _parse_100k_genres(fmt: Format, source: Source) -> list[str]:
    """Genre names of ``u.genre`` in the order of u.item's flag columns (their index)."""
    fname = "u.genre"
    shown = source.display(fname)
    by_index: dict[int, tuple[str, int]] = {}
    for no, text in lines(source, fname, fmt.encoding):
        if not text.strip():
            continue
        name, sep, index = text.rpartition("|")
        if not sep or not name.strip():
            raise DatasetError(f"{shown}: line {no}: expected 'name|index', found {text!r}")
        if not INT_FULL.match(index) or "." in index:
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
