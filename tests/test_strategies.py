"""Aggregation strategies: pure functions on hand-built weights (no Ray, no torch)."""

from __future__ import annotations

import dataclasses
import typing

import numpy as np
import pytest

from fedrlhf_ray.local_trainer import RoundInstructions
from fedrlhf_ray.schema import FederationConfig
from fedrlhf_ray.strategies import (
    STRATEGIES,
    STRATEGY_NAMES,
    FedAvg,
    FedProx,
    Krum,
    LocalOnly,
    Median,
    MultiKrum,
    NormBound,
    RejectNonFinite,
    RoundPlan,
    Strategy,
    SumAggregator,
    TrimmedMean,
    aggregate,
    coordinate_median,
    fedavg,
    make_strategy,
    merge,
    sparse_keys_of,
    split_personal,
    sums,
    trimmed_mean,
)

EMB = "scorer.item_embedding.weight"

PLAN = RoundPlan(1, (0, 1, 2), 3, 3)  # a round's plan; these strategies aggregate whatever it says


def _client(value: float) -> dict[str, np.ndarray]:
    return {
        "w": np.full((2, 3), value, dtype=np.float32),
        "b": np.array([value, -value], dtype=np.float32),
    }


def _random_updates(rng: np.random.Generator, n: int) -> list[dict[str, np.ndarray]]:
    return [
        {"w": rng.normal(size=(4, 3)).astype(np.float32), "b": rng.normal(size=(5,)).astype(np.float32)}
        for _ in range(n)
    ]


# ----------------------------------------------------------------------------- fedavg


def test_fedavg_is_the_sample_weighted_mean():
    updates = [_client(1.0), _client(4.0), _client(10.0)]
    out = fedavg(updates, [1, 2, 7])
    expected = (1 * 1.0 + 2 * 4.0 + 7 * 10.0) / 10  # 7.9
    np.testing.assert_allclose(out["w"], np.full((2, 3), expected), rtol=1e-6)
    np.testing.assert_allclose(out["b"], [expected, -expected], rtol=1e-6)
    assert set(out) == {"w", "b"}


def test_fedavg_client_with_zero_samples_has_no_influence():
    base = fedavg([_client(1.0), _client(3.0)], [2, 6])
    with_idle = fedavg([_client(1.0), _client(1e6), _client(3.0)], [2, 0, 6])
    for k in base:
        np.testing.assert_array_equal(with_idle[k], base[k])
    np.testing.assert_allclose(base["w"], 2.5)


def test_fedavg_all_zero_samples_or_no_updates_raise():
    with pytest.raises(ValueError, match="0 samples"):
        fedavg([_client(1.0), _client(2.0)], [0, 0])
    with pytest.raises(ValueError, match="no client updates"):
        fedavg([], [])
    with pytest.raises(ValueError, match="sample counts"):
        fedavg([_client(1.0), _client(2.0)], [1])
    with pytest.raises(ValueError, match=">= 0"):
        fedavg([_client(1.0), _client(2.0)], [3, -1])


def test_mismatched_keys_raise_naming_key_and_client():
    a, b = _client(1.0), _client(2.0)
    del b["b"]
    with pytest.raises(ValueError, match=r"client 1 lacks key 'b'"):
        fedavg([a, b], [1, 1])
    c = {**_client(2.0), "extra": np.zeros(2, np.float32)}
    with pytest.raises(ValueError, match=r"client 1 has key 'extra'"):
        coordinate_median([a, c])


def test_mismatched_shapes_raise_naming_key():
    a, b = _client(1.0), _client(2.0)
    b["w"] = np.zeros((3, 2), np.float32)
    for fn in (lambda u: fedavg(u, [1, 1]), coordinate_median, lambda u: trimmed_mean(u, 0.1)):
        with pytest.raises(ValueError, match=r"key 'w'.*shape"):
            fn([a, b])


def test_non_finite_update_raises():
    bad = _client(2.0)
    bad["w"][0, 0] = np.nan
    with pytest.raises(ValueError, match=r"key 'w'.*client 1.*non-finite"):
        fedavg([_client(1.0), bad], [1, 1])


# ----------------------------------------------------------------------------- median, trimmed mean


@pytest.mark.parametrize("n", [5, 7])
def test_median_matches_numpy(n):
    updates = _random_updates(np.random.default_rng(n), n)
    out = coordinate_median(updates)
    for k in ("w", "b"):
        np.testing.assert_allclose(out[k], np.median(np.stack([u[k] for u in updates]), axis=0), rtol=1e-6)


def test_median_of_even_count_averages_middle_values():
    out = coordinate_median([_client(1.0), _client(2.0), _client(10.0), _client(100.0)])
    np.testing.assert_allclose(out["w"], 6.0)


def _trimmed_by_hand(values: list[float], trim: float) -> float:
    k = int(np.floor(trim * len(values) + 1e-9))
    kept = sorted(values)[k : len(values) - k]
    return sum(kept) / len(kept)


@pytest.mark.parametrize("n,trim", [(5, 0.2), (7, 0.2), (7, 0.3), (10, 0.3)])
def test_trimmed_mean_matches_sort_and_trim(n, trim):
    updates = _random_updates(np.random.default_rng(100 + n), n)
    out = trimmed_mean(updates, trim)
    for k in ("w", "b"):
        stack = np.stack([u[k] for u in updates]).astype(np.float64)
        expected = np.empty(stack.shape[1:])
        for idx in np.ndindex(*stack.shape[1:]):
            expected[idx] = _trimmed_by_hand([float(v) for v in stack[(slice(None), *idx)]], trim)
        np.testing.assert_allclose(out[k], expected, rtol=1e-5, atol=1e-6)


def test_trimmed_mean_drops_floor_of_fraction_times_n():
    # n=5, trim 0.2 → one value dropped at each end: mean(2, 3, 4) = 3.
    values = [1.0, 2.0, 3.0, 4.0, 1000.0]
    np.testing.assert_allclose(trimmed_mean([_client(v) for v in values], 0.2)["w"], 3.0)
    # n=4, trim 0.2 → floor(0.8) = 0 dropped: plain mean.
    np.testing.assert_allclose(trimmed_mean([_client(v) for v in values[:4]], 0.2)["w"], 2.5)


def test_trimmed_mean_with_zero_trim_is_the_unweighted_mean():
    updates = _random_updates(np.random.default_rng(3), 6)
    out = trimmed_mean(updates, 0.0)
    for k in ("w", "b"):
        np.testing.assert_allclose(out[k], np.mean(np.stack([u[k] for u in updates]), axis=0), rtol=1e-5, atol=1e-7)


def test_trim_fraction_out_of_range_raises():
    for bad in (-0.1, 0.5, 0.7):
        with pytest.raises(ValueError, match="trim_fraction"):
            trimmed_mean([_client(1.0), _client(2.0)], bad)
        with pytest.raises(ValueError, match="trim_fraction"):
            TrimmedMean(bad)


def test_one_outlier_barely_moves_median_and_trimmed_mean_but_moves_fedavg():
    rng = np.random.default_rng(7)
    honest = [_client(1.0 + 0.01 * rng.normal()) for _ in range(6)]
    updates = honest + [_client(1e6)]
    samples = [1] * len(updates)
    assert abs(float(coordinate_median(updates)["w"][0, 0]) - 1.0) < 0.05
    assert abs(float(trimmed_mean(updates, 0.2)["w"][0, 0]) - 1.0) < 0.05
    assert float(fedavg(updates, samples)["w"][0, 0]) > 1e5


# ----------------------------------------------------------------------------- sparse embedding rows


def _touch_tables():
    """Global table (4 rows); A touched rows {0, 1}, B rows {1, 2}, C none; row 3 untouched."""
    g = np.arange(12, dtype=np.float32).reshape(4, 3)
    a, b, c = g.copy(), g.copy(), g.copy()
    a[0] += 10.0
    a[1] += 20.0
    b[1] -= 40.0
    b[2] += 5.0
    return g, a, b, c


def test_sparse_rows_fedavg_uses_only_touching_clients():
    g, a, b, c = _touch_tables()
    updates = [{EMB: a, "d": np.float32([1.0])}, {EMB: b, "d": np.float32([2.0])}, {EMB: c, "d": np.float32([3.0])}]
    samples = [1, 3, 4]
    out = aggregate({EMB: g, "d": np.float32([0.0])}, updates, samples, method="fedavg", sparse_keys=[EMB])
    emb = out[EMB]
    np.testing.assert_array_equal(emb[0], a[0])
    np.testing.assert_array_equal(emb[2], b[2])
    np.testing.assert_allclose(emb[1], (1 * a[1] + 3 * b[1]) / 4, rtol=1e-6)
    np.testing.assert_array_equal(emb[3], g[3])
    # Dense keys in the same call are plain FedAvg.
    np.testing.assert_allclose(out["d"], [(1 * 1 + 3 * 2 + 4 * 3) / 8], rtol=1e-6)

    # The dense average dilutes every row with the clients that never saw it.
    dense = fedavg(updates, samples)[EMB]
    np.testing.assert_allclose(dense[0], (1 * a[0] + 7 * g[0]) / 8, rtol=1e-6)
    assert not np.allclose(dense[0], emb[0])
    assert not np.allclose(dense[2], emb[2])


@pytest.mark.parametrize("method", ["median", "trimmed_mean"])
def test_sparse_rows_robust_methods_use_only_touching_clients(method):
    g, a, b, c = _touch_tables()
    updates = [{EMB: a}, {EMB: b}, {EMB: c}]
    out = aggregate({EMB: g}, updates, [1, 1, 1], method=method, trim_fraction=0.2, sparse_keys=[EMB])[EMB]
    np.testing.assert_array_equal(out[0], a[0])
    np.testing.assert_array_equal(out[2], b[2])
    np.testing.assert_allclose(out[1], (a[1] + b[1]) / 2, rtol=1e-6)
    np.testing.assert_array_equal(out[3], g[3])
    dense = coordinate_median(updates)[EMB] if method == "median" else trimmed_mean(updates, 0.2)[EMB]
    if method == "median":  # 2 of 3 clients left row 0 alone: the edit is lost
        np.testing.assert_array_equal(dense[0], g[0])
    else:  # n=3, trim 0.2 drops nothing: the edit is diluted by the 2 clients that never saw it
        np.testing.assert_allclose(dense[0], (a[0] + 2 * g[0]) / 3, rtol=1e-6)
    assert not np.allclose(dense[0], out[0])


@pytest.mark.parametrize("method", ["fedavg", "median", "trimmed_mean"])
def test_sparse_rows_equal_row_by_row_aggregation_over_touching_clients(method):
    rng = np.random.default_rng(11)
    n, rows, dim, trim = 7, 30, 4, 0.2
    g = rng.normal(size=(rows, dim)).astype(np.float32)
    touched = rng.random((n, rows)) < 0.5
    touched[:, 0] = False  # a row nobody touched
    touched[:, 1] = True  # a row everybody touched
    samples = rng.integers(0, 5, size=n).astype(float)
    samples[0] = 0.0
    samples[1] = 3.0
    tables = []
    for i in range(n):
        t = g.copy()
        t[touched[i]] += rng.normal(size=(int(touched[i].sum()), dim)).astype(np.float32)
        tables.append(t)
    out = aggregate({EMB: g}, [{EMB: t} for t in tables], samples, method=method, trim_fraction=trim, sparse_keys=[EMB])[EMB]

    for r in range(rows):
        who = np.flatnonzero(touched[:, r])
        row_updates = [{"r": tables[i][r]} for i in who]
        if method == "fedavg":
            if samples[who].sum() == 0:
                expected = g[r]
            else:
                expected = fedavg(row_updates, samples[who])["r"]
        elif len(who) == 0:
            expected = g[r]
        elif method == "median":
            expected = coordinate_median(row_updates)["r"]
        else:
            expected = trimmed_mean(row_updates, trim)["r"]
        np.testing.assert_allclose(out[r], expected, rtol=1e-5, atol=1e-6, err_msg=f"row {r}")
    np.testing.assert_array_equal(out[0], g[0])


@pytest.mark.parametrize("method", ["fedavg", "median", "trimmed_mean"])
def test_sparse_rows_large_table_many_clients(method):
    rng = np.random.default_rng(5)
    rows, dim, n = 10_000, 16, 50
    g = rng.normal(size=(rows, dim)).astype(np.float32)
    updates = []
    for _ in range(n):
        t = g.copy()
        seen = rng.choice(rows - 1, size=200, replace=False)  # the last row is never touched
        t[seen] += 0.1
        updates.append({EMB: t, "head": rng.normal(size=(16, 4)).astype(np.float32)})
    out = aggregate({EMB: g}, updates, [float(i + 1) for i in range(n)], method=method, sparse_keys=[EMB])
    assert out[EMB].shape == (rows, dim) and out[EMB].dtype == np.float32
    np.testing.assert_array_equal(out[EMB][-1], g[-1])
    moved = np.any(out[EMB] != g, axis=1)
    touched_any = np.any([np.any(u[EMB] != g, axis=1) for u in updates], axis=0)
    np.testing.assert_array_equal(moved, touched_any)
    # Every touching client moved the row by +0.1, so every method gives global + 0.1 there.
    np.testing.assert_allclose(out[EMB][touched_any], g[touched_any] + 0.1, atol=1e-5)


def test_sparse_key_errors():
    g, a, b, _ = _touch_tables()
    with pytest.raises(ValueError, match="sparse key 'nope'"):
        aggregate({EMB: g}, [{EMB: a}, {EMB: b}], [1, 1], method="fedavg", sparse_keys=["nope"])
    with pytest.raises(ValueError, match=f"sparse key '{EMB}' is not in the global"):
        aggregate({}, [{EMB: a}, {EMB: b}], [1, 1], method="fedavg", sparse_keys=[EMB])
    with pytest.raises(ValueError, match="shape"):
        aggregate({EMB: g[:2]}, [{EMB: a}, {EMB: b}], [1, 1], method="median", sparse_keys=[EMB])
    with pytest.raises(ValueError, match="unknown aggregation method 'mean'"):
        aggregate({EMB: g}, [{EMB: a}], [1], method="mean")
    with pytest.raises(TypeError, match="string"):
        aggregate({EMB: g}, [{EMB: a}], [1], method="fedavg", sparse_keys=EMB)


def test_sparse_keys_of():
    weights = {EMB: np.zeros((3, 2)), "scorer.item_encoder.0.weight": np.zeros(2), "bias": np.zeros(1)}
    assert sparse_keys_of(weights) == [EMB]
    assert sparse_keys_of(weights, suffixes=("bias", "0.weight")) == ["scorer.item_encoder.0.weight", "bias"]
    assert sparse_keys_of({"a": np.zeros(1)}) == []


# ----------------------------------------------------------------------------- personalization


def test_split_personal_and_merge_round_trip():
    weights = {
        "scorer.score_head.0.weight": np.ones((2, 2), np.float32),
        "scorer.score_head.2.bias": np.ones(1, np.float32),
        "scorer.item_encoder.0.weight": np.zeros((2, 2), np.float32),
        "value_head.0.bias": np.zeros(2, np.float32),
    }
    shared, personal = split_personal(weights, ["scorer.score_head.", "value_head."])
    assert set(personal) == {"scorer.score_head.0.weight", "scorer.score_head.2.bias", "value_head.0.bias"}
    assert set(shared) == {"scorer.item_encoder.0.weight"}
    merged = merge(shared, personal)
    assert set(merged) == set(weights)
    for k in weights:
        np.testing.assert_array_equal(merged[k], weights[k])
    assert split_personal(weights, ()) == (weights, {})
    with pytest.raises(ValueError, match="both shared and personal"):
        merge(weights, {"value_head.0.bias": np.zeros(2)})


# ----------------------------------------------------------------------------- strategies


STRATEGY_VALUES = typing.get_args(FederationConfig.model_fields["strategy"].annotation)


@pytest.mark.parametrize("value", STRATEGY_VALUES)
def test_make_strategy_maps_every_config_value(value):
    cfg = FederationConfig(strategy=value, fedprox_mu=0.3, trim_fraction=0.2, krum_byzantine=2,
                           multi_krum_selected=3, norm_bound=0.7)
    wrapped = make_strategy(cfg, sparse_keys=[EMB])
    # Every strategy sits behind the non-finite filter; the strategies that can average a secure
    # sum (and only those) can still do so through it.
    assert isinstance(wrapped, RejectNonFinite) and isinstance(wrapped, Strategy)
    assert isinstance(wrapped, SumAggregator) == (value in ("fedavg", "fedprox")) == sums(value)
    strategy = wrapped.inner
    expected_type = {"fedavg": FedAvg, "fedprox": FedProx, "median": Median, "trimmed_mean": TrimmedMean,
                     "krum": Krum, "multi_krum": MultiKrum, "norm_bound": NormBound}[value]
    assert type(strategy) is expected_type and wrapped.name == value
    assert strategy.name == value
    assert isinstance(strategy, Strategy)
    assert strategy.sparse_keys == (EMB,)
    assert strategy.state() == {}
    # The strategy tells the round's clients what to do: FedProx's μ, nothing else here.
    for r in (1, 7):
        assert strategy.configure_train(PLAN) == RoundInstructions(proximal_mu=0.3 if value == "fedprox" else 0.0)
    if value == "trimmed_mean":
        assert strategy.trim_fraction == 0.2
    if value in ("krum", "multi_krum"):
        assert strategy.num_byzantine == 2
    if value == "multi_krum":
        assert strategy.num_selected == 3
    if value == "norm_bound":
        assert strategy.norm_bound == 0.7
    assert set(STRATEGY_VALUES) == set(STRATEGIES) == set(STRATEGY_NAMES)


@pytest.mark.parametrize("value", STRATEGY_VALUES)
def test_local_baseline_is_the_local_only_strategy(value):
    """``baseline: local`` overrides the configured strategy: clients keep every parameter and
    the global model never moves."""
    cfg = FederationConfig(strategy=value, baseline="local")
    strategy = make_strategy(cfg, sparse_keys=[EMB]).inner
    assert type(strategy) is LocalOnly and isinstance(strategy, Strategy)
    assert strategy.configure_train(PLAN) == RoundInstructions(keep_local=True)
    g = {"w": np.zeros((2, 3), np.float32), "b": np.zeros(2, np.float32)}
    out = strategy.aggregate(PLAN, g, [_client(1.0), _client(2.0)], [1, 1])
    assert out.keys() == g.keys()
    for k in g:
        np.testing.assert_array_equal(out[k], g[k])
    assert strategy.state() == {}
    assert "local" not in STRATEGY_NAMES  # a baseline, not a value of federation.strategy
    for baseline in ("federated", "centralized"):
        assert type(make_strategy(FederationConfig(strategy=value, baseline=baseline)).inner) is not LocalOnly


def test_make_strategy_rejects_unknown_name():
    class Cfg:
        strategy, fedprox_mu, trim_fraction, baseline = "bulyan", 0.0, 0.1, "federated"

    with pytest.raises(ValueError, match="'bulyan'.*fedavg"):
        make_strategy(Cfg())


def test_strategy_classes_call_the_pure_functions():
    rng = np.random.default_rng(9)
    updates = _random_updates(rng, 5)
    samples = [1, 2, 3, 0, 4]
    g = {"w": np.zeros((4, 3), np.float32), "b": np.zeros(5, np.float32)}
    pairs = [
        (FedAvg(), fedavg(updates, samples)),
        (FedProx(0.5), fedavg(updates, samples)),
        (Median(), coordinate_median(updates)),
        (TrimmedMean(0.2), trimmed_mean(updates, 0.2)),
    ]
    for strategy, expected in pairs:
        out = strategy.aggregate(PLAN, g, updates, samples)
        for k in expected:
            np.testing.assert_array_equal(out[k], expected[k], err_msg=strategy.name)
    assert FedProx(0.5).mu == 0.5
    with pytest.raises(dataclasses.FrozenInstanceError):
        FedProx(0.5).mu = 1.0
    with pytest.raises(ValueError, match="mu"):
        FedProx(-1.0)


def test_strategy_sparse_keys_field_is_used():
    g, a, b, c = _touch_tables()
    updates = [{EMB: a}, {EMB: b}, {EMB: c}]
    sparse = FedAvg(sparse_keys=[EMB]).aggregate(PLAN, {EMB: g}, updates, [1, 1, 1])[EMB]
    dense = FedAvg().aggregate(PLAN, {EMB: g}, updates, [1, 1, 1])[EMB]
    np.testing.assert_array_equal(sparse[0], a[0])
    assert not np.allclose(dense[0], a[0])


# ----------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("method", ["fedavg", "median", "trimmed_mean"])
def test_dtype_is_preserved(dtype, method):
    g, a, b, c = (t.astype(dtype) for t in _touch_tables())
    updates = [{EMB: t, "d": t[:, :2].copy()} for t in (a, b, c)]
    out = aggregate({EMB: g}, updates, [1, 2, 3], method=method, sparse_keys=[EMB])
    assert out[EMB].dtype == dtype and out["d"].dtype == dtype
    for fn_out in (fedavg(updates, [1, 2, 3]), coordinate_median(updates), trimmed_mean(updates, 0.2)):
        assert all(v.dtype == dtype for v in fn_out.values())
