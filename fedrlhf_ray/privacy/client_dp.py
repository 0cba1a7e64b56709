"""The client's side of differential privacy: clip its own update and add its share of the noise.

Used when the clients clip (``privacy.dp.mode: distributed``, or any DP under secure
aggregation); the driver's side, sampling and accounting, is ``fedrlhf_ray.privacy.dp``. The
noise comes from a secret only the client holds (kept in its client-side store), never from
the run's seed, which the driver knows and could use to subtract it.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from collections.abc import Mapping

import numpy as np

from fedrlhf_ray.local_trainer import ClientDP, Weights
from fedrlhf_ray.privacy.secagg import prg

# The weight name under which a clipping client sends its (noised) not-clipped bit: one more
# coordinate of its update, summed like the others (also inside a secure sum).
UNCLIPPED_KEY = "privacy/unclipped"


def client_noise(secret: bytes, round_index: int, size: int) -> np.ndarray:
    """``size`` standard normal draws only the holder of ``secret`` can know: the ChaCha20
    keystream (``cryptography``) under HMAC-SHA256(secret, round), by Box–Muller on 53-bit
    uniforms. The same for a round retried after a crash, so a resume stays exact; a
    non-cryptographic generator's output could be predicted from its seed or past draws."""
    seed = hmac.new(secret, f"fedrlhf-dp-noise round {round_index}".encode(), hashlib.sha256).digest()
    half = (size + 1) // 2
    bits = prg(seed, 2 * half, b"dp-noise") >> np.uint64(11)
    u1 = (bits[:half].astype(np.float64) + 1.0) * 2.0**-53  # (0, 1]: log(u1) is finite
    u2 = bits[half:].astype(np.float64) * 2.0**-53
    radius = np.sqrt(-2.0 * np.log(u1))
    angle = 2.0 * np.pi * u2
    return np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:size]


def privatize(
    global_shared: Mapping[str, np.ndarray],
    shared: Mapping[str, np.ndarray],
    dp: ClientDP,
    normals: np.ndarray,
) -> tuple[Weights, float]:
    """A client's DP update: global + clip(Δ, C) + noise per key, and with ``dp.count`` the
    noised not-clipped bit under :data:`UNCLIPPED_KEY`; also ‖Δ‖. ``normals``: standard normal
    draws, one per coordinate of ``shared`` (keys sorted) plus one for the bit."""
    keys = sorted(shared)
    base = {k: np.asarray(global_shared[k], np.float64) for k in keys}
    delta = {k: np.asarray(shared[k], np.float64) - base[k] for k in keys}
    norm = math.sqrt(sum(float(np.vdot(d, d)) for d in delta.values()))
    clip = dp.clip
    factor = min(1.0, clip / norm) if norm > 0 else 1.0
    out: Weights = {}
    offset = 0
    for k in keys:
        size = delta[k].size
        noise = dp.noise_stddev * normals[offset : offset + size].reshape(delta[k].shape)
        offset += size
        g = np.asarray(global_shared[k])
        dtype = g.dtype if np.issubdtype(g.dtype, np.floating) else np.dtype(np.float64)
        out[k] = (base[k] + factor * delta[k] + noise).astype(dtype, copy=False)
    if dp.count:
        out[UNCLIPPED_KEY] = np.array([float(norm <= clip) + dp.count_stddev * normals[offset]])
    return out, norm
