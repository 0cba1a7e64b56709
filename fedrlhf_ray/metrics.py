"""Pure metric functions the engine shares: summaries of per-client metrics over a round, the
cosine similarity of two flat vectors (the audit's reconstruction measure), and the encoding of
scalar metrics for a secure sum and its means."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def summarize(values: list[float] | np.ndarray, prefix: str) -> dict[str, float]:
    """mean, median, std and worst decile (10th percentile) of per-client values."""
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[~np.isnan(arr)]
    if arr.size == 0:
        return {f"{prefix}/{s}": float("nan") for s in ("mean", "median", "std", "worst_decile")}
    return {
        f"{prefix}/mean": float(arr.mean()),
        f"{prefix}/median": float(np.median(arr)),
        f"{prefix}/std": float(arr.std()),
        f"{prefix}/worst_decile": float(np.percentile(arr, 10)),
    }


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two flat vectors (0 if either is 0)."""
    denom = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b) / denom if denom > 0 else 0.0


def metric_block(metrics: Mapping[str, float], names: Sequence[str]) -> np.ndarray:
    """Scalar metrics as values ‖ present flags, for a secure sum of them (absent: non-finite)."""
    values = np.array([metrics[k] for k in names], dtype=np.float64)
    present = np.isfinite(values)
    return np.concatenate([np.where(present, values, 0.0), present.astype(np.float64)])


def metric_means(flat: np.ndarray, names: Sequence[str]) -> dict[str, float]:
    """Each metric's mean over the clients that had it, from the sum of their :func:`metric_block`."""
    sums, counts = flat[: len(names)], np.rint(flat[len(names) : 2 * len(names)])
    return {name: float(v / n) if n > 0 else float("nan") for name, v, n in zip(names, sums, counts, strict=True)}
