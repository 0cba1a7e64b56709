"""Parsing the ratings file into the ratings frame, sorted by (user, timestamp, movie).

The happy path is pandas' C parser with dtype specifications and vectorised checks; only when
those fail is the file read again to locate and describe the offending line (diagnostics).
"""

from __future__ import annotations

import csv
import warnings
from typing import Any

import numpy as np
import pandas as pd

from envs.data.movielens.diagnostics import diagnose_ratings, report_row
from envs.data.movielens.errors import DatasetError
from envs.data.movielens.formats import Format
from envs.data.movielens.layouts import rating_layout
from envs.data.movielens.lines import raise_if_cut_short
from envs.data.movielens.sources import Source
from envs.data.movielens.values import item_ranks, rating_ok


def parse_ratings(fmt: Format, source: Source, movie_ids: np.ndarray) -> pd.DataFrame:
    """The ratings frame; every rated movie id must be one of ``movie_ids``."""
    fname = fmt.ratings_file
    shown = source.display(fname)
    layout = rating_layout(fmt, source)
    names = layout.names
    dtypes: dict[str, Any] = {
        names[layout.cols["user"]]: "int64",
        names[layout.cols["item"]]: "int64",
        names[layout.cols["rating"]]: "float32",
        names[layout.cols["timestamp"]]: "int64",
    }
    for j in layout.fillers:
        dtypes[names[j]] = "str"
    kwargs: dict[str, Any] = {
        "sep": layout.sep,
        "dtype": dtypes,
        "na_filter": False,
        "index_col": False,
        "engine": "c",
        "encoding": fmt.encoding,
    }
    if layout.header is not None:
        kwargs.update(header=0)
    else:
        kwargs.update(header=None, names=list(names), quoting=csv.QUOTE_NONE)
    try:
        with source.open(fname) as f, warnings.catch_warnings():
            warnings.simplefilter("error", pd.errors.ParserWarning)
            raw = pd.read_csv(f, **kwargs)
    except DatasetError:
        raise  # the file could not be read (a damaged zip member): there is no line to blame
    except pd.errors.EmptyDataError as exc:
        raise DatasetError(f"{shown}: the file is empty") from exc
    except (ValueError, pd.errors.ParserWarning, UnicodeDecodeError) as exc:
        # A cut last line is the likeliest cause, and describing it as a wrong field count or a
        # bad number would hide that the file is incomplete: check for it first.
        raise_if_cut_short(source, fname)
        # Something did not parse: find and describe the first offending line.
        raise diagnose_ratings(fmt, source, layout, movie_ids, exc) from exc
    if not f.ends_with_line_break:
        # pandas accepts a last line without a line break, and a number cut short still parses;
        # only now re-read the file, to number that line.
        raise_if_cut_short(source, fname)
    if len(raw) == 0:
        if layout.header is None:
            raise DatasetError(f"{shown}: the file is empty (no ratings)")
        raise DatasetError(f"{shown}: the file has no ratings (only the header line)")

    n = len(raw)
    user = raw[names[layout.cols["user"]]].to_numpy(dtype=np.int64)
    item = raw[names[layout.cols["item"]]].to_numpy(dtype=np.int64)
    rating = raw[names[layout.cols["rating"]]].to_numpy(dtype=np.float32)
    ts = raw[names[layout.cols["timestamp"]]].to_numpy(dtype=np.int64)
    ranks = item_ranks(item, movie_ids)
    bad = ~rating_ok(rating, fmt)
    bad |= ranks < 0
    for j in layout.fillers:
        bad |= raw[names[j]].to_numpy() != ""
    del raw
    if bad.any():
        raise report_row(fmt, source, layout, movie_ids, int(np.argmax(bad)), None)

    order = _sort_order(user, ts, ranks)  # the rank orders like the movie id, in fewer bits
    return pd.DataFrame(
        {"user": user[order], "item": item[order], "rating": rating[order], "timestamp": ts[order]},
        index=pd.RangeIndex(n),
        copy=False,
    )


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
