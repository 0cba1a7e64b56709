"""Summaries of per-client metrics: what the driver reports for a round over its clients."""

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
