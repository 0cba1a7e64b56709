"""What a valid field value is: integer ids and timestamps, ratings on the dataset's scale, movie
ids in the catalogue.

The fast path (pandas, pyarrow) and the line-by-line descriptions of a bad line share these
definitions, so a record the fast path rejects is described by the same rule.
"""

from __future__ import annotations

import math
import re
import struct

import numpy as np

from envs.data.movielens.formats import Format

# What counts as an integer id/timestamp ("5" or "5.0", as pandas' integer parser accepts) and as
# a number. Used both by the vectorised checks (pyarrow/RE2) and the line-by-line descriptions.
INT_PATTERN = r"^\s*[+-]?\d+(?:\.0*)?\s*$"
FLOAT_PATTERN = r"^\s*[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?\s*$"
INT_FULL = re.compile(INT_PATTERN)
FLOAT_FULL = re.compile(FLOAT_PATTERN)
_F32 = struct.Struct("<f")


def rating_ok(rating: np.ndarray, fmt: Format) -> np.ndarray:
    """Rating on the scale: within [min, max] and a whole number of steps (NaN fails)."""
    lo, hi = fmt.scale
    r = np.asarray(rating, dtype=np.float32)
    with np.errstate(invalid="ignore"):
        scaled = r * np.float32(1.0 / fmt.step)  # x2 or x1: exact in float32
        return (r >= lo) & (r <= hi) & (scaled == np.rint(scaled))


def rating_value_ok(value: float, fmt: Format) -> bool:
    """Scalar twin of :func:`rating_ok` (same float32 rounding), for the line-by-line checks."""
    try:
        v = _F32.unpack(_F32.pack(value))[0]
    except OverflowError:
        return False
    lo, hi = fmt.scale
    scaled = v / fmt.step
    return lo <= v <= hi and scaled == math.floor(scaled)


def item_ranks(item: np.ndarray, movie_ids: np.ndarray) -> np.ndarray:
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
