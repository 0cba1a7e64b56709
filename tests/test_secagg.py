"""Secure aggregation's protocol, pure (no Ray): masks cancel, dropouts recover, nothing leaks."""

from __future__ import annotations

import numpy as np
import pytest

from fedrlhf_ray.privacy.secagg import (
    MaskingClient,
    SecAggError,
    dequantize,
    neighbour_graph,
    quantize,
    secagg_plus_degree,
    share_threshold,
    unmask_sum,
)

FRACTION_BITS = 24


def run_round(n, length=2000, degree=None, drop=(), seed=0, threshold_fraction=0.5):
    """One round among n clients; ``drop`` leave after sharing. Returns (true vectors, masked,
    unmasked sum of the survivors, graph)."""
    rng = np.random.default_rng(seed)
    ids = list(range(10, 10 + n))
    graph = neighbour_graph(ids, degree, rng)
    clients = {c: MaskingClient(c, round_index=3) for c in ids}
    keys = {c: clients[c].public_keys() for c in ids}
    degree_used = min(len(v) for v in graph.values())
    t = share_threshold(degree_used, threshold_fraction)
    sealed = {c: clients[c].make_shares({j: keys[j] for j in graph[c]}, t) for c in ids}
    for c in ids:
        clients[c].keep_shares({sender: sealed[sender][c] for sender in ids if c in sealed[sender]})
    x = {c: rng.normal(0, 1, length) for c in ids}
    survivors = set(ids) - set(drop)
    masked = {c: clients[c].mask(quantize(x[c], FRACTION_BITS)) for c in survivors}
    masked_sum = np.zeros(length, dtype=np.uint64)
    for y in masked.values():
        masked_sum = masked_sum + y
    revealed = {u: clients[u].reveal(survivors) for u in survivors}
    total = unmask_sum(masked_sum, 3, graph, keys, survivors, revealed, t)
    return x, masked, total, survivors, graph


def test_masks_cancel_and_the_sum_is_exact_within_rounding():
    x, masked, total, survivors, _ = run_round(5)
    exact = np.zeros(2000, dtype=np.uint64)
    for c in survivors:
        exact = exact + quantize(x[c], FRACTION_BITS)
    assert np.array_equal(total, exact)  # integer arithmetic: the masks cancel exactly
    err = np.abs(dequantize(total, FRACTION_BITS) - sum(x.values()))
    assert err.max() <= 5 * 2.0 ** -(FRACTION_BITS + 1)  # the stated tolerance: n · 2^-(f+1)


def test_a_masked_update_is_uncorrelated_with_the_true_one():
    x, masked, *_ = run_round(5, length=20000)
    for c, y in masked.items():
        seen = dequantize(y, FRACTION_BITS)
        assert abs(np.corrcoef(seen, x[c])[0, 1]) < 0.03  # 20,000 values: chance level ~0.007
        assert np.abs(seen).mean() > 1e6  # uniform over the ring, nothing like the update


def test_one_of_five_dropping_after_masking_leaves_the_survivors_sum_exact():
    x, _, total, survivors, _ = run_round(5, drop=(12,))
    assert survivors == {10, 11, 13, 14}
    err = np.abs(dequantize(total, FRACTION_BITS) - sum(x[c] for c in survivors))
    assert err.max() <= 4 * 2.0 ** -(FRACTION_BITS + 1)


def test_secagg_plus_graph_is_sparse_and_still_exact_with_dropouts():
    n = 40
    degree = secagg_plus_degree(n)
    assert degree < n - 1 and degree % 2 == 0
    x, _, total, survivors, graph = run_round(n, length=500, degree=degree, drop=(10, 25, 33))
    assert all(len(v) == degree for v in graph.values())
    assert all(c in graph[j] for c in graph for j in graph[c])  # symmetric
    err = np.abs(dequantize(total, FRACTION_BITS) - sum(x[c] for c in survivors))
    assert err.max() <= n * 2.0 ** -(FRACTION_BITS + 1)


def test_too_many_dropouts_are_one_clear_error():
    with pytest.raises(SecAggError, match="too many dropouts"):
        run_round(5, drop=(10, 11, 12))


def test_a_tampered_share_does_not_decrypt():
    ids = [1, 2, 3]
    clients = {c: MaskingClient(c, round_index=1) for c in ids}
    keys = {c: clients[c].public_keys() for c in ids}
    sealed = {c: clients[c].make_shares({j: keys[j] for j in ids if j != c}, 2) for c in ids}
    forged = bytearray(sealed[1][2])
    forged[-1] ^= 1
    clients[2].keep_shares({1: bytes(forged), 3: sealed[3][2]})
    with pytest.raises(SecAggError, match="does not decrypt"):
        clients[2].reveal({1, 2, 3})


def test_values_outside_the_fixed_point_range_are_refused():
    with pytest.raises(SecAggError, match="fixed-point range"):
        quantize(np.array([2.0**40]), FRACTION_BITS)
    with pytest.raises(SecAggError):
        quantize(np.array([np.nan]), FRACTION_BITS)


@pytest.mark.parametrize(
    ("raw", "start"),
    [
        ({"federation": {"strategy": "median"}}, "privacy.secure_aggregation: got true — the driver then only"),
        ({"federation": {"strategy": "krum"}, "clients": {"num_clients": 6}},
         "privacy.secure_aggregation: got true — the driver then only"),
        ({"federation": {"baseline": "local"}}, "privacy.secure_aggregation: got true — the driver then only"),
        ({"clients": {"num_clients": 2}}, "privacy.secure_aggregation: got true — it needs at least 3 clients"),
        ({"privacy": {"secagg_fraction_bits": 60}}, "privacy.secagg_fraction_bits: got 60 "),
    ],
)
def test_combinations_that_cannot_work_are_refused_in_one_line(raw, start):
    from fedrlhf_ray.config import validate_config
    from fedrlhf_ray.errors import ConfigError

    merged = {**raw, "privacy": {"secure_aggregation": True, **raw.get("privacy", {})}}
    with pytest.raises(ConfigError) as info:
        validate_config(merged)
    msg = str(info.value)
    assert msg.startswith(start) and "\n" not in msg, msg
