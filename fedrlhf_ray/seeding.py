"""One root seed; every other seed is derived from it, never from a global RNG."""

from __future__ import annotations

import zlib

import numpy as np


def derive_seed(root: int, *keys: int | str) -> int:
    """A 32-bit seed for the component named by ``keys`` (ints or short names)."""
    words = [int(root)] + [k if isinstance(k, int) else zlib.crc32(k.encode()) for k in keys]
    return int(np.random.SeedSequence(words).generate_state(1)[0])


def derive_rng(root: int, *keys: int | str) -> np.random.Generator:
    return np.random.default_rng(derive_seed(root, *keys))
