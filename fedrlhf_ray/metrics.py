"""Pure metric functions the engine shares: summaries of per-client metrics over a round, and the
cosine similarity of two flat vectors (the audit's reconstruction measure)."""

from __future__ import annotations

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
