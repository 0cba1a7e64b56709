"""Aggregation strategies: pure functions over named weight arrays, and thin strategy classes.

Weights are ``dict[str, numpy.ndarray]`` (a model's named parameters, typically float32). As
in Flower's ``flwr/server/strategy/aggregate.py``, the maths lives in plain functions —

* :func:`fedavg` — the mean weighted by each client's sample count (FedAvg; FedProx aggregates
  the same way, its proximal term lives in the clients' local loss);
* :func:`coordinate_median` — the element-wise median (unweighted);
* :func:`trimmed_mean` — per coordinate, drop the ``floor(trim_fraction * n)`` smallest and
  largest values and average the rest (unweighted);
* :func:`aggregate` — one of the above for dense parameters plus **sparse rows** for embedding
  tables: a client only moves the rows of the items it saw, so a row is aggregated over the
  clients that touched it (their row differs from the global row) instead of being diluted by
  every client that left it unchanged;
* :func:`split_personal` / :func:`merge` for personal parameters that never get aggregated;
* robust building blocks: :func:`finite_updates` (which updates are all finite),
  :func:`delta_norms` and :func:`clip_to_norm` (an update's change from the global model, and
  that change scaled down to an L2 bound), :func:`krum_scores` / :func:`krum_select`
  (Blanchard et al. 2017) —

and the strategy classes (:class:`FedAvg`, :class:`FedProx`, :class:`Median`,
:class:`TrimmedMean`, :class:`Krum`, :class:`MultiKrum`, :class:`NormBound`) are frozen
dataclasses that only hold settings and call them. Cross-cutting concerns compose as wrappers
that hold an inner :class:`Strategy` and delegate to it: :class:`RejectNonFinite` (always on:
an update with NaN or inf never reaches an aggregation) here, client-level DP in
``fedrlhf_ray.privacy``.

Everything is pure NumPy: no Ray, no torch. Floating dtypes are preserved (float32 in, float32
out; the sums are taken in float64); integer arrays come back as float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np

from fedrlhf_ray.local_trainer import RoundInstructions, Weights
from fedrlhf_ray.schema import ExperimentConfig, FederationConfig

METHODS = ("fedavg", "median", "trimmed_mean")
DEFAULT_SPARSE_SUFFIXES = ("item_embedding.weight",)

# floor(trim_fraction * n) must not lose a value to rounding: 0.29 * 100 = 28.999999999999996.
_FLOOR_EPS = 1e-9


# --------------------------------------------------------------------------- validation


def _check_updates(updates: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[dict[str, np.ndarray]]]:
    """Keys of the updates (client 0's order) and the updates as arrays; ValueError on mismatch."""
    if len(updates) == 0:
        raise ValueError("no client updates to aggregate")
    arrays = [{k: np.asarray(v) for k, v in u.items()} for u in updates]
    ref = arrays[0]
    keys = list(ref)
    for i, upd in enumerate(arrays[1:], start=1):
        for k in keys:
            if k not in upd:
                raise ValueError(f"update of client {i} lacks key {k!r} (client 0 has it)")
        for k in upd:
            if k not in ref:
                raise ValueError(f"update of client {i} has key {k!r} that client 0 lacks")
        for k in keys:
            if upd[k].shape != ref[k].shape:
                raise ValueError(
                    f"key {k!r}: client {i} has shape {upd[k].shape} but client 0 has {ref[k].shape}"
                )
    for i, upd in enumerate(arrays):
        for k in keys:
            a = upd[k]
            if np.issubdtype(a.dtype, np.inexact) and not np.isfinite(a).all():
                raise ValueError(f"key {k!r}: the update of client {i} has non-finite values (NaN or inf)")
            if not (np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_):
                raise ValueError(f"key {k!r}: client {i} sent a non-numeric array of dtype {a.dtype}")
    return keys, arrays


def _check_num_samples(num_samples: Sequence[float] | np.ndarray, n: int) -> np.ndarray:
    w = np.asarray(num_samples, dtype=np.float64).reshape(-1)
    if w.shape != (n,):
        raise ValueError(f"got {w.size} sample counts for {n} client updates")
    if not np.isfinite(w).all() or (w < 0).any():
        raise ValueError(f"sample counts must be finite and >= 0, got {w.tolist()}")
    return w


def _sample_weights(num_samples: Sequence[float] | np.ndarray, n: int) -> np.ndarray:
    """Sample counts as FedAvg weights summing to 1; ValueError when they are all zero."""
    w = _check_num_samples(num_samples, n)
    total = w.sum()
    if total <= 0:
        raise ValueError(
            f"all {n} client(s) report 0 samples: a sample-weighted average is undefined"
        )
    return w / total


def _check_trim(trim_fraction: float) -> float:
    t = float(trim_fraction)
    if not 0.0 <= t < 0.5:
        raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")
    return t


def _n_trim(trim_fraction: float, n):
    """floor(trim_fraction * n), for an int or an integer array n."""
    return np.floor(trim_fraction * np.asarray(n) + _FLOOR_EPS).astype(np.int64)


def _out_dtype(arrays: Iterable[np.ndarray]) -> np.dtype:
    dtype = np.result_type(*[a.dtype for a in arrays])
    return dtype if np.issubdtype(dtype, np.floating) else np.dtype(np.float64)


# --------------------------------------------------------------------------- one key, dense


def _fedavg_key(arrays: list[np.ndarray], weights: np.ndarray) -> np.ndarray:
    acc = np.zeros(arrays[0].shape, dtype=np.float64)
    for w, a in zip(weights, arrays, strict=True):
        if w > 0:
            acc += w * a
    return acc.astype(_out_dtype(arrays), copy=False)


def _median_key(arrays: list[np.ndarray]) -> np.ndarray:
    dtype = _out_dtype(arrays)
    return np.median(np.stack(arrays).astype(dtype, copy=False), axis=0).astype(dtype, copy=False)


def _trimmed_key(arrays: list[np.ndarray], trim_fraction: float) -> np.ndarray:
    dtype = _out_dtype(arrays)
    n = len(arrays)
    k = int(_n_trim(trim_fraction, n))
    stack = np.stack(arrays)
    if k > 0:
        stack = np.sort(stack, axis=0)[k : n - k]
    return stack.mean(axis=0, dtype=np.float64).astype(dtype, copy=False)


# --------------------------------------------------------------------------- one key, sparse rows


def _touched(global_rows: np.ndarray, client_rows: list[np.ndarray]) -> np.ndarray:
    """(n_clients, n_rows) mask: the client's row differs from the global row."""
    return np.stack([np.any(r != global_rows, axis=1) for r in client_rows])


def _sparse_key(
    global_table: np.ndarray,
    arrays: list[np.ndarray],
    method: str,
    samples: np.ndarray,
    trim_fraction: float,
) -> np.ndarray:
    """Aggregate a table row by row over the clients that touched each row (vectorised).

    Rows are along axis 0; a row touched by no client (or, for FedAvg, only by clients with 0
    samples) keeps its global value.
    """
    dtype = _out_dtype([global_table, *arrays])
    shape = global_table.shape
    n_rows = shape[0]
    g = global_table.reshape(n_rows, -1)
    rows = [a.reshape(n_rows, -1) for a in arrays]
    touched = _touched(g, rows)  # (n, R)
    out = g.astype(np.float64)

    if method == "fedavg":
        w = touched * samples[:, None]  # (n, R): a client's weight on the rows it touched
        denom = w.sum(axis=0)
        acc = np.zeros_like(out)
        for wi, r in zip(w, rows, strict=True):
            if wi.any():
                acc += wi[:, None] * r
        hit = denom > 0
        out[hit] = acc[hit] / denom[hit, None]
        return out.astype(dtype, copy=False).reshape(shape)

    # Order statistics over the touching clients only: untouched entries become NaN, which
    # np.sort puts last, so the c_r touching values of row r are sorted at positions 0..c_r-1.
    n = len(rows)
    count = touched.sum(axis=0)  # c_r, (R,)
    vals = np.stack(rows).astype(dtype, copy=False)  # (n, R, F)
    vals = np.where(touched[:, :, None], vals, np.nan)
    vals = np.sort(np.moveaxis(vals, 0, -1), axis=-1)  # (R, F, n), contiguous along clients
    hit = count > 0
    if method == "median":
        lo = np.maximum((count - 1) // 2, 0)
        hi = count // 2
        a = np.take_along_axis(vals, lo[:, None, None], axis=-1)[..., 0]
        b = np.take_along_axis(vals, hi[:, None, None], axis=-1)[..., 0]
        stat = (a.astype(np.float64) + b) / 2.0
    elif method == "trimmed_mean":
        k = _n_trim(trim_fraction, count)  # (R,)
        pos = np.arange(n)
        keep = (pos[None, :] >= k[:, None]) & (pos[None, :] < (count - k)[:, None])  # (R, n)
        total = np.where(keep[:, None, :], vals, 0.0).sum(axis=-1, dtype=np.float64)
        stat = total / np.maximum(count - 2 * k, 1)[:, None]
    else:  # pragma: no cover - aggregate() validates the method
        raise ValueError(f"unknown method {method!r}")
    out[hit] = stat[hit]
    return out.astype(dtype, copy=False).reshape(shape)


# --------------------------------------------------------------------------- public functions


def fedavg(updates: Sequence[Mapping[str, np.ndarray]], num_samples: Sequence[float]) -> Weights:
    """Mean of the updates weighted by ``num_samples`` (a client with 0 samples adds nothing).

    Raises ValueError when there are no updates, every count is 0, keys or shapes differ
    between clients (the message names the key and the client), or a value is NaN/inf.
    """
    keys, arrays = _check_updates(updates)
    w = _sample_weights(num_samples, len(arrays))
    return {k: _fedavg_key([u[k] for u in arrays], w) for k in keys}


def coordinate_median(updates: Sequence[Mapping[str, np.ndarray]]) -> Weights:
    """Element-wise median of the updates (unweighted; robust to a minority of outliers)."""
    keys, arrays = _check_updates(updates)
    return {k: _median_key([u[k] for u in arrays]) for k in keys}


def trimmed_mean(updates: Sequence[Mapping[str, np.ndarray]], trim_fraction: float) -> Weights:
    """Element-wise trimmed mean (unweighted).

    Per coordinate, the ``floor(trim_fraction * n)`` smallest and largest of the n client
    values are dropped and the rest averaged; ``trim_fraction`` is in [0, 0.5) and 0 gives the
    plain mean.
    """
    t = _check_trim(trim_fraction)
    keys, arrays = _check_updates(updates)
    return {k: _trimmed_key([u[k] for u in arrays], t) for k in keys}


def aggregate(
    global_weights: Mapping[str, np.ndarray],
    updates: Sequence[Mapping[str, np.ndarray]],
    num_samples: Sequence[float],
    *,
    method: str,
    trim_fraction: float = 0.1,
    sparse_keys: Collection[str] = (),
) -> Weights:
    """Aggregate client updates with ``method`` (``fedavg``, ``median`` or ``trimmed_mean``).

    Dense keys go to :func:`fedavg` / :func:`coordinate_median` / :func:`trimmed_mean`. Each key
    in ``sparse_keys`` is a table whose rows (axis 0) are, e.g., items; it is aggregated row by
    row over the clients whose row differs from ``global_weights[key]`` — so updates must be
    full weights, not deltas. A row no client touched keeps the global value; a row one client
    touched takes that client's row. FedAvg weights the touching clients by their samples
    (a row touched only by clients with 0 samples keeps the global value).

    ``num_samples`` must have one finite, non-negative count per update for every method;
    only FedAvg uses it. The result has the updates' keys.
    """
    if method not in METHODS:
        raise ValueError(f"unknown aggregation method {method!r} — allowed: {', '.join(METHODS)}")
    keys, arrays = _check_updates(updates)
    n = len(arrays)
    samples = _check_num_samples(num_samples, n)
    weights = _sample_weights(samples, n) if method == "fedavg" else samples
    t = _check_trim(trim_fraction) if method == "trimmed_mean" else float(trim_fraction)

    sparse = _as_keys(sparse_keys)
    for k in sparse:
        if k not in arrays[0]:
            raise ValueError(f"sparse key {k!r} is not in the client updates")
        if k not in global_weights:
            raise ValueError(f"sparse key {k!r} is not in the global weights")
        g = np.asarray(global_weights[k])
        if g.ndim < 1 or g.shape != arrays[0][k].shape:
            raise ValueError(
                f"sparse key {k!r}: global shape {g.shape} must be a table (ndim >= 1) "
                f"matching the updates' shape {arrays[0][k].shape}"
            )

    out: Weights = {}
    for k in keys:
        column = [u[k] for u in arrays]
        if k in sparse:
            out[k] = _sparse_key(np.asarray(global_weights[k]), column, method, samples, t)
        elif method == "fedavg":
            out[k] = _fedavg_key(column, weights)
        elif method == "median":
            out[k] = _median_key(column)
        else:
            out[k] = _trimmed_key(column, t)
    return out


def split_personal(
    weights: Mapping[str, np.ndarray], personal_prefixes: Collection[str]
) -> tuple[Weights, Weights]:
    """(shared, personal): a key is personal when it starts with one of ``personal_prefixes``."""
    prefixes = _as_keys(personal_prefixes)
    shared: Weights = {}
    personal: Weights = {}
    for k, v in weights.items():
        (personal if any(k.startswith(p) for p in prefixes) else shared)[k] = v
    return shared, personal


def merge(shared: Mapping[str, np.ndarray], personal: Mapping[str, np.ndarray]) -> Weights:
    """Inverse of :func:`split_personal`; ValueError if a key is in both."""
    both = [k for k in personal if k in shared]
    if both:
        raise ValueError(f"key {both[0]!r} is both shared and personal")
    return {**shared, **personal}


def sparse_keys_of(
    weights: Mapping[str, np.ndarray], suffixes: Collection[str] = DEFAULT_SPARSE_SUFFIXES
) -> list[str]:
    """Keys of ``weights`` that end with one of ``suffixes`` (item-embedding tables by default)."""
    ends = _as_keys(suffixes)
    return [k for k in weights if any(k.endswith(s) for s in ends)]


def _as_keys(keys: Collection[str]) -> tuple[str, ...]:
    if isinstance(keys, str):
        raise TypeError(f"expected a collection of key names, got the string {keys!r}")
    return tuple(keys)


# --------------------------------------------------------------------------- robust building blocks


def finite_updates(updates: Sequence[Mapping[str, Any]]) -> list[bool]:
    """Per update: every floating value is finite (an update with NaN or inf must not be averaged)."""
    out = []
    for u in updates:
        ok = True
        for v in u.values():
            a = np.asarray(v)
            if np.issubdtype(a.dtype, np.inexact) and not np.isfinite(a).all():
                ok = False
                break
        out.append(ok)
    return out


def _flat_deltas(global_weights: Mapping[str, np.ndarray], updates: Sequence[Mapping[str, np.ndarray]]) -> np.ndarray:
    """(n, d) float64: each update's change from the global weights, over the updates' keys."""
    keys, arrays = _check_updates(updates)
    missing = [k for k in keys if k not in global_weights]
    if missing:
        raise ValueError(f"key {missing[0]!r} of the updates is not in the global weights")
    g = np.concatenate([np.asarray(global_weights[k], dtype=np.float64).ravel() for k in keys])
    return np.stack([np.concatenate([u[k].astype(np.float64).ravel() for k in keys]) - g for u in arrays])


def delta_norms(global_weights: Mapping[str, np.ndarray], updates: Sequence[Mapping[str, np.ndarray]]) -> np.ndarray:
    """L2 norm of each update's change from the global weights, over all its keys together."""
    return np.linalg.norm(_flat_deltas(global_weights, updates), axis=1)


def clip_to_norm(global_weights: Mapping[str, np.ndarray], update: Mapping[str, np.ndarray], bound: float) -> Weights:
    """``global + delta · min(1, bound / ‖delta‖)``: the update with its change scaled down to
    L2 norm at most ``bound`` (dtypes kept)."""
    if not (math.isfinite(bound) and bound > 0):
        raise ValueError(f"the clipping bound must be finite and > 0, got {bound}")
    norm = float(delta_norms(global_weights, [update])[0])
    factor = min(1.0, bound / norm) if norm > 0 else 1.0
    out: Weights = {}
    for k, v in update.items():
        a = np.asarray(v)
        g = np.asarray(global_weights[k], dtype=np.float64)
        out[k] = (g + factor * (a.astype(np.float64) - g)).astype(_out_dtype([a]), copy=False)
    return out


def krum_scores(updates: Sequence[Mapping[str, np.ndarray]], num_byzantine: int) -> np.ndarray:
    """Krum's score of each update: the sum of squared distances to its ``n - f - 2`` nearest
    other updates (Blanchard et al. 2017; needs ``n > 2f + 2``)."""
    _, arrays = _check_updates(updates)
    n, f = len(arrays), int(num_byzantine)
    if f < 0 or n <= 2 * f + 2:
        raise ValueError(f"Krum with f={f} Byzantine clients needs more than 2f + 2 = {2 * f + 2} updates, got {n}")
    keys = list(arrays[0])
    flat = np.stack([np.concatenate([u[k].astype(np.float64).ravel() for k in keys]) for u in arrays])
    sq = (flat * flat).sum(axis=1)
    dist = np.maximum(sq[:, None] + sq[None, :] - 2.0 * flat @ flat.T, 0.0)
    np.fill_diagonal(dist, np.inf)
    nearest = np.sort(dist, axis=1)[:, : n - f - 2]
    return nearest.sum(axis=1)


def krum_select(updates: Sequence[Mapping[str, np.ndarray]], num_byzantine: int, num_selected: int = 1) -> list[int]:
    """Indices of the ``num_selected`` updates with the lowest Krum scores (ties: lower index)."""
    scores = krum_scores(updates, num_byzantine)
    if not 1 <= num_selected <= len(scores):
        raise ValueError(f"Multi-Krum selects between 1 and {len(scores)} updates, got {num_selected}")
    return sorted(int(i) for i in np.argsort(scores, kind="stable")[:num_selected])


# --------------------------------------------------------------------------- strategies


@dataclass(frozen=True)
class RoundPlan:
    """One round as its strategy planned it, passed explicitly to every later step of the round
    (configure, aggregate), so that no step depends on what an earlier call left behind.

    ``sampled``: the clients taking part, drawn from a pool of ``pool_size`` clients of which
    ``count`` were to be sampled (exactly, or in expectation under Poisson sampling)."""

    round_index: int
    sampled: tuple[int, ...]
    pool_size: int
    count: int

    @property
    def sampling_rate(self) -> float:
        """q: each client's chance to be sampled (what DP's accountant amplifies by)."""
        return min(1.0, self.count / self.pool_size)

    @property
    def expected(self) -> float:
        """q·|pool|: the clients expected (the fixed denominator of DP-FedAvg's mean)."""
        return self.sampling_rate * self.pool_size


@runtime_checkable
class Strategy(Protocol):
    """What the driver calls. A strategy owns its round: whether the round may run at all
    (:meth:`stop_before`: a reason to end the run first, e.g. a spent privacy budget), which
    clients take part (:meth:`plan_round`, from the round's generator: a :class:`RoundPlan`),
    what they are told (:meth:`configure_train`) and how their updates become the new global
    weights (:meth:`aggregate`, called every round, with no updates too: the global weights then
    stay, unless a wrapper adds noise). A round that failed after clients sent masked inputs is
    :meth:`spent` instead (the model stays; DP still accounts it). The plan is passed to every
    step of its round. Wrappers (DP, robust filters) implement it around an inner strategy."""

    @property
    def name(self) -> str: ...  # read-only: the strategies define it as a class variable

    def plan_round(
        self, round_index: int, pool: Sequence[int], count: int, rng: np.random.Generator
    ) -> RoundPlan: ...

    def stop_before(self, round_index: int, pool_size: int, count: int) -> str | None: ...

    def configure_train(self, plan: RoundPlan) -> RoundInstructions: ...

    def aggregate(
        self,
        plan: RoundPlan,
        global_weights: Mapping[str, np.ndarray],
        updates: Sequence[Mapping[str, np.ndarray]],
        num_samples: Sequence[float],
    ) -> Weights: ...

    def spent(self, plan: RoundPlan, contributors: int) -> None: ...

    def round_metrics(self) -> dict[str, float]: ...

    def state(self) -> dict[str, Any]: ...

    def load_state(self, state: Mapping[str, Any]) -> None: ...


@runtime_checkable
class SumAggregator(Protocol):
    """A strategy that can also turn a secure sum into the new model (what secure aggregation
    gives the driver: Σ w·θ over the survivors and Σ w, never an update): FedAvg, FedProx and
    DP-FedAvg. Secure aggregation and DP need one; :func:`sums` tells by capability."""

    def aggregate_sum(
        self, plan: RoundPlan, global_weights: Mapping[str, np.ndarray], weighted_sum: Mapping[str, np.ndarray],
        total_weight: float,
    ) -> Weights: ...


@dataclass(frozen=True)
class _Aggregation:
    """Settings only; ``aggregate`` calls the pure function :func:`aggregate`."""

    name: ClassVar[str]
    method: ClassVar[str]
    sparse_keys: tuple[str, ...] = field(default=(), kw_only=True)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sparse_keys", _as_keys(self.sparse_keys))

    def plan_round(
        self, round_index: int, pool: Sequence[int], count: int, rng: np.random.Generator
    ) -> RoundPlan:
        """``count`` clients of ``pool`` uniformly without replacement."""
        sampled = tuple(sorted(int(c) for c in rng.choice(pool, size=count, replace=False)))
        return RoundPlan(round_index, sampled, len(pool), count)

    def stop_before(self, round_index: int, pool_size: int, count: int) -> str | None:
        return None

    def configure_train(self, plan: RoundPlan) -> RoundInstructions:
        return RoundInstructions()

    def _options(self) -> dict[str, Any]:
        return {}

    def aggregate(
        self,
        plan: RoundPlan,
        global_weights: Mapping[str, np.ndarray],
        updates: Sequence[Mapping[str, np.ndarray]],
        num_samples: Sequence[float],
    ) -> Weights:
        if not updates:
            return dict(global_weights)
        return self._combine(global_weights, updates, num_samples)

    def _combine(
        self,
        global_weights: Mapping[str, np.ndarray],
        updates: Sequence[Mapping[str, np.ndarray]],
        num_samples: Sequence[float],
    ) -> Weights:
        """The new weights from at least one update."""
        return aggregate(
            global_weights, updates, num_samples,
            method=self.method, sparse_keys=self.sparse_keys, **self._options(),
        )

    def spent(self, plan: RoundPlan, contributors: int) -> None:
        return None

    def round_metrics(self) -> dict[str, float]:
        """What the last :meth:`aggregate` measured (wrappers report theirs, e.g. ``fed/rejected``)."""
        return {}

    def state(self) -> dict[str, Any]:
        """These strategies hold no mutable state; stateful wrappers checkpoint theirs here."""
        return {}

    def load_state(self, state: Mapping[str, Any]) -> None:
        return None


def mean_of_sum(
    global_weights: Mapping[str, np.ndarray], weighted_sum: Mapping[str, np.ndarray], total_weight: float
) -> Weights:
    """The weighted mean a secure sum (Σ w·θ over the survivors, Σ w) stands for, dense; the
    global weights when nobody survived."""
    if total_weight <= 0:
        return dict(global_weights)
    return {
        k: (np.asarray(weighted_sum[k], np.float64) / total_weight).astype(_out_dtype([np.asarray(v)]))
        for k, v in global_weights.items()
    }


@dataclass(frozen=True)
class FedAvg(_Aggregation):
    """Sample-weighted mean (McMahan et al. 2017); of a secure sum too."""

    name: ClassVar[str] = "fedavg"
    method: ClassVar[str] = "fedavg"

    def aggregate_sum(
        self, plan: RoundPlan, global_weights: Mapping[str, np.ndarray], weighted_sum: Mapping[str, np.ndarray],
        total_weight: float,
    ) -> Weights:
        return mean_of_sum(global_weights, weighted_sum, total_weight)


@dataclass(frozen=True)
class FedProx(FedAvg):
    """Aggregates like FedAvg and tells the clients to add μ/2·‖θ − θ_global‖² to their local
    loss (Li et al. 2020), as Flower's FedProx puts ``proximal-mu`` in its train config."""

    name: ClassVar[str] = "fedprox"
    method: ClassVar[str] = "fedavg"
    mu: float = 0.01

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (math.isfinite(self.mu) and self.mu >= 0):
            raise ValueError(f"FedProx mu must be finite and >= 0, got {self.mu}")

    def configure_train(self, plan: RoundPlan) -> RoundInstructions:
        return RoundInstructions(proximal_mu=float(self.mu))


@dataclass(frozen=True)
class Median(_Aggregation):
    """Coordinate-wise median (Yin et al. 2018)."""

    name: ClassVar[str] = "median"
    method: ClassVar[str] = "median"


@dataclass(frozen=True)
class TrimmedMean(_Aggregation):
    """Coordinate-wise trimmed mean (Yin et al. 2018)."""

    name: ClassVar[str] = "trimmed_mean"
    method: ClassVar[str] = "trimmed_mean"
    trim_fraction: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_trim(self.trim_fraction)

    def _options(self) -> dict[str, Any]:
        return {"trim_fraction": self.trim_fraction}


@dataclass(frozen=True)
class Krum(_Aggregation):
    """Krum (Blanchard et al. 2017): the one update closest to its ``n - f - 2`` nearest
    neighbours becomes the new model; tolerates ``f`` Byzantine clients when ``n > 2f + 2``
    (with fewer updates in a round it takes the coordinate median)."""

    name: ClassVar[str] = "krum"
    method: ClassVar[str] = "fedavg"
    num_byzantine: int = 1

    def _selected(self, updates: Sequence[Mapping[str, np.ndarray]]) -> list[int]:
        return krum_select(updates, self.num_byzantine, 1)

    def _combine(
        self,
        global_weights: Mapping[str, np.ndarray],
        updates: Sequence[Mapping[str, np.ndarray]],
        num_samples: Sequence[float],
    ) -> Weights:
        if len(updates) <= 2 * self.num_byzantine + 2:
            # Too few updates for Krum's guarantee (stragglers, rejected updates): the
            # coordinate median still resists a minority of attackers.
            return aggregate(global_weights, updates, num_samples, method="median", sparse_keys=self.sparse_keys)
        chosen = self._selected(updates)
        samples = _check_num_samples(num_samples, len(updates))
        return aggregate(
            global_weights, [updates[i] for i in chosen], [float(samples[i]) for i in chosen],
            method="fedavg", sparse_keys=self.sparse_keys,
        )


@dataclass(frozen=True)
class MultiKrum(Krum):
    """Multi-Krum: FedAvg over the ``num_selected`` updates with the lowest Krum scores."""

    name: ClassVar[str] = "multi_krum"
    num_selected: int = 2

    def _selected(self, updates: Sequence[Mapping[str, np.ndarray]]) -> list[int]:
        return krum_select(updates, self.num_byzantine, min(self.num_selected, len(updates)))


@dataclass(frozen=True)
class NormBound(_Aggregation):
    """Norm-bounded FedAvg (Sun et al. 2019): each update's change is clipped to L2 norm
    ``norm_bound`` before the sample-weighted mean, so no client can move the model further."""

    name: ClassVar[str] = "norm_bound"
    method: ClassVar[str] = "fedavg"
    norm_bound: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (math.isfinite(self.norm_bound) and self.norm_bound > 0):
            raise ValueError(f"norm_bound must be finite and > 0, got {self.norm_bound}")

    def _combine(
        self,
        global_weights: Mapping[str, np.ndarray],
        updates: Sequence[Mapping[str, np.ndarray]],
        num_samples: Sequence[float],
    ) -> Weights:
        clipped = [clip_to_norm(global_weights, u, self.norm_bound) for u in updates]
        return aggregate(global_weights, clipped, num_samples, method="fedavg", sparse_keys=self.sparse_keys)


@dataclass
class StrategyWrapper:
    """A layer around a strategy that delegates everything to it; layers (the non-finite
    filter here, DP in ``fedrlhf_ray.privacy.dp``) override what they change."""

    inner: Strategy

    @property
    def name(self) -> str:
        return self.inner.name

    def plan_round(
        self, round_index: int, pool: Sequence[int], count: int, rng: np.random.Generator
    ) -> RoundPlan:
        return self.inner.plan_round(round_index, pool, count, rng)

    def stop_before(self, round_index: int, pool_size: int, count: int) -> str | None:
        return self.inner.stop_before(round_index, pool_size, count)

    def configure_train(self, plan: RoundPlan) -> RoundInstructions:
        return self.inner.configure_train(plan)

    def aggregate(
        self,
        plan: RoundPlan,
        global_weights: Mapping[str, np.ndarray],
        updates: Sequence[Mapping[str, np.ndarray]],
        num_samples: Sequence[float],
    ) -> Weights:
        return self.inner.aggregate(plan, global_weights, updates, num_samples)

    def spent(self, plan: RoundPlan, contributors: int) -> None:
        self.inner.spent(plan, contributors)

    def round_metrics(self) -> dict[str, float]:
        return self.inner.round_metrics()

    def state(self) -> dict[str, Any]:
        return self.inner.state()

    def load_state(self, state: Mapping[str, Any]) -> None:
        self.inner.load_state(state)


@dataclass
class RejectNonFinite(StrategyWrapper):
    """Drops every update holding NaN or inf before the inner strategy sees any, and counts
    them (``fed/rejected``)."""

    rejected: int = 0

    def aggregate(
        self,
        plan: RoundPlan,
        global_weights: Mapping[str, np.ndarray],
        updates: Sequence[Mapping[str, np.ndarray]],
        num_samples: Sequence[float],
    ) -> Weights:
        keep = finite_updates(updates)
        self.rejected = keep.count(False)
        samples = list(num_samples)
        return self.inner.aggregate(
            plan,
            global_weights,
            [u for u, ok in zip(updates, keep, strict=True) if ok],
            [n for n, ok in zip(samples, keep, strict=True) if ok],
        )

    def spent(self, plan: RoundPlan, contributors: int) -> None:
        self.rejected = 0
        self.inner.spent(plan, contributors)

    def round_metrics(self) -> dict[str, float]:
        return {**self.inner.round_metrics(), "fed/rejected": float(self.rejected)}


@dataclass
class RejectNonFiniteOfSum(RejectNonFinite):
    """:class:`RejectNonFinite` around a :class:`SumAggregator`: a secure sum passes to it as it
    is (the clients drop a non-finite update out of the sum themselves)."""

    def aggregate_sum(
        self, plan: RoundPlan, global_weights: Mapping[str, np.ndarray], weighted_sum: Mapping[str, np.ndarray],
        total_weight: float,
    ) -> Weights:
        inner = self.inner
        assert isinstance(inner, SumAggregator)
        return inner.aggregate_sum(plan, global_weights, weighted_sum, total_weight)


@dataclass(frozen=True)
class LocalOnly(_Aggregation):
    """The local-only baseline: clients keep every parameter, the global model never moves."""

    name: ClassVar[str] = "local"
    method: ClassVar[str] = "fedavg"

    def configure_train(self, plan: RoundPlan) -> RoundInstructions:
        return RoundInstructions(keep_local=True)

    def _combine(
        self,
        global_weights: Mapping[str, np.ndarray],
        updates: Sequence[Mapping[str, np.ndarray]],
        num_samples: Sequence[float],
    ) -> Weights:
        return dict(global_weights)


STRATEGIES: dict[str, type[_Aggregation]] = {
    cls.name: cls for cls in (FedAvg, FedProx, Median, TrimmedMean, Krum, MultiKrum, NormBound)
}
STRATEGY_NAMES: tuple[str, ...] = tuple(STRATEGIES)


def make_strategy(
    federation_cfg: FederationConfig,
    sparse_keys: Collection[str] = (),
    privacy: Callable[[Strategy], Strategy] | None = None,
) -> Strategy:
    """The round's strategy for a :class:`FederationConfig`: the one ``strategy`` names (with
    its settings), or :class:`LocalOnly` for ``baseline: local``, wrapped by ``privacy`` (the
    privacy layers, e.g. ``fedrlhf_ray.privacy.dp``), behind :class:`RejectNonFinite`: no
    layer ever sees a non-finite update.

    ``personalization`` is not the strategy's concern: the client actors keep personal keys out
    of the updates with :func:`split_personal` and the driver puts them back with :func:`merge`.
    """
    base = _base_strategy(federation_cfg, _as_keys(sparse_keys))
    layered = privacy(base) if privacy is not None else base
    return RejectNonFiniteOfSum(layered) if isinstance(layered, SumAggregator) else RejectNonFinite(layered)


def sums(strategy_name: str) -> bool:
    """Whether the strategy ``strategy_name`` can aggregate a secure sum (a :class:`SumAggregator`)."""
    return issubclass(STRATEGIES[strategy_name], SumAggregator)


def _base_strategy(fed: FederationConfig, sparse_keys: tuple[str, ...]) -> Strategy:
    if fed.baseline == "local":
        return LocalOnly(sparse_keys=sparse_keys)
    name = fed.strategy
    if name == "fedprox":
        return FedProx(mu=float(fed.fedprox_mu), sparse_keys=sparse_keys)
    if name == "trimmed_mean":
        return TrimmedMean(trim_fraction=float(fed.trim_fraction), sparse_keys=sparse_keys)
    if name == "krum":
        return Krum(num_byzantine=int(fed.krum_byzantine), sparse_keys=sparse_keys)
    if name == "multi_krum":
        return MultiKrum(
            num_byzantine=int(fed.krum_byzantine), num_selected=int(fed.multi_krum_selected), sparse_keys=sparse_keys
        )
    if name == "norm_bound":
        return NormBound(norm_bound=float(fed.norm_bound), sparse_keys=sparse_keys)
    if name in STRATEGIES:
        return STRATEGIES[name](sparse_keys=sparse_keys)
    raise ValueError(f"federation.strategy: got {name!r} — allowed: {', '.join(STRATEGY_NAMES)}")


def check_config(cfg: ExperimentConfig) -> None:
    """The federation section against the clients it samples (raises ValueError naming the field)."""
    fed, k = cfg.federation, cfg.clients.num_clients
    per_round = fed.clients_per_round
    if per_round > 1.0 and per_round > k:
        raise ValueError(f"federation.clients_per_round ({int(per_round)}) exceeds clients.num_clients ({k})")
    # The centralized baseline trains one pooled client, so min_results is moot there.
    sampled = cfg.clients_per_round_count(k)
    if fed.baseline != "centralized" and fed.min_results > sampled:
        raise ValueError(
            f"federation.min_results: got {fed.min_results} — at most the {sampled} clients sampled per round "
            f"(federation.clients_per_round {per_round:g} of clients.num_clients {k})"
        )
    if fed.strategy in ("krum", "multi_krum") and fed.baseline == "federated":
        f = fed.krum_byzantine
        if sampled <= 2 * f + 2:
            raise ValueError(
                f"federation.krum_byzantine: got {f} — {fed.strategy} needs more than 2f + 2 = {2 * f + 2} "
                f"clients a round, and {sampled} are sampled (raise federation.clients_per_round or lower f)"
            )
        if fed.strategy == "multi_krum" and fed.multi_krum_selected > sampled - f:
            raise ValueError(
                f"federation.multi_krum_selected: got {fed.multi_krum_selected} — at most the {sampled} clients "
                f"sampled a round minus federation.krum_byzantine ({f}) = {sampled - f}"
            )
    if fed.personalization == "finetune" and fed.finetune_iterations == 0:
        raise ValueError(
            "federation.finetune_iterations: got 0 — must be >= 1 under personalization 'finetune' "
            "(or set federation.personalization: none)"
        )
    if fed.personalization == "personal_head" and fed.baseline == "centralized":
        # The pooled client trains the only personal layers there are; each real client would be
        # scored with its own, never trained (IMDb's README once reported such a score).
        raise ValueError(
            "federation.personalization: got 'personal_head' — the centralized baseline trains one pooled model, so "
            "no client's personal layers would ever be trained; set federation.personalization: none (or finetune)"
        )
    if fed.personalization == "personal_head" and not fed.personal_layers:
        raise ValueError(
            "federation.personal_layers: got [] — personalization 'personal_head' needs at least one "
            "parameter-name prefix to keep on the clients, e.g. scorer.score_head."
        )
