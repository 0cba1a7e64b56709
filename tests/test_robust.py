"""Byzantine clients and robust aggregation: pure functions, strategies, attacks (no Ray)."""

from __future__ import annotations

import numpy as np
import pytest

from fedrlhf_ray.attacks import Attack, attacked_update, malicious_clients
from fedrlhf_ray.config import validate_config
from fedrlhf_ray.errors import ConfigError
from fedrlhf_ray.strategies import (
    Krum,
    MultiKrum,
    NormBound,
    RejectNonFinite,
    RoundPlan,
    clip_to_norm,
    delta_norms,
    fedavg,
    finite_updates,
    krum_scores,
    krum_select,
    make_strategy,
)
from fedrlhf_ray.tasks.rec.feedback import SimulatedHuman, random_pairs
from tests.test_feedback import make_client

GLOBAL = {"w": np.zeros((3, 2), dtype=np.float32), "b": np.zeros(2, dtype=np.float32)}

PLAN = RoundPlan(1, (0, 1, 2), 3, 3)  # a round's plan; these strategies aggregate whatever it says


def honest(n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """n honest updates: the same small step plus a little per-client noise."""
    rng = np.random.default_rng(seed)
    return [
        {k: (0.1 + 0.01 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in GLOBAL.items()}
        for _ in range(n)
    ]


def test_finite_updates_and_reject_non_finite_counts():
    ups = honest(4)
    ups[1] = {**ups[1], "b": np.array([np.nan, 0.0], dtype=np.float32)}
    ups[3] = {**ups[3], "w": np.full((3, 2), np.inf, dtype=np.float32)}
    assert finite_updates(ups) == [True, False, True, False]
    strategy = make_strategy(validate_config({}).federation)
    assert isinstance(strategy, RejectNonFinite)
    out = strategy.aggregate(PLAN, GLOBAL, ups, [1, 1, 1, 1])
    expected = fedavg([ups[0], ups[2]], [1, 1])
    assert all(np.array_equal(out[k], expected[k]) for k in GLOBAL)
    assert strategy.round_metrics() == {"fed/rejected": 2.0}
    # Nothing finite left: the global model stays as it was.
    nan = [{k: np.full(v.shape, np.nan, dtype=np.float32) for k, v in GLOBAL.items()}] * 3
    same = strategy.aggregate(PLAN, GLOBAL, nan, [1, 1, 1])
    assert all(np.array_equal(same[k], GLOBAL[k]) for k in GLOBAL) and strategy.round_metrics()["fed/rejected"] == 3


def test_clip_to_norm_bounds_the_change_and_leaves_small_ones():
    big = {k: np.full(v.shape, 5.0, dtype=np.float32) for k, v in GLOBAL.items()}
    clipped = clip_to_norm(GLOBAL, big, 1.0)
    assert delta_norms(GLOBAL, [clipped])[0] == pytest.approx(1.0, rel=1e-6)
    assert all(clipped[k].dtype == np.float32 for k in clipped)
    small = honest(1)[0]
    kept = clip_to_norm(GLOBAL, small, 100.0)
    assert all(np.array_equal(kept[k], small[k]) for k in small)
    with pytest.raises(ValueError, match="finite and > 0"):
        clip_to_norm(GLOBAL, small, 0.0)


def test_krum_never_picks_the_outlier_and_multi_krum_averages_the_honest():
    ups = honest(5)
    attacker = {k: np.full(v.shape, -50.0, dtype=np.float32) for k, v in GLOBAL.items()}
    ups = ups[:2] + [attacker] + ups[2:]
    scores = krum_scores(ups, num_byzantine=1)
    assert int(np.argmax(scores)) == 2
    assert 2 not in krum_select(ups, 1, num_selected=5)
    out = MultiKrum(num_byzantine=1, num_selected=5).aggregate(PLAN, GLOBAL, ups, [1] * 6)
    expected = fedavg([u for i, u in enumerate(ups) if i != 2], [1] * 5)
    assert all(np.allclose(out[k], expected[k]) for k in GLOBAL)
    single = Krum(num_byzantine=1).aggregate(PLAN, GLOBAL, ups, [1] * 6)
    assert any(all(np.array_equal(single[k], u[k]) for k in GLOBAL) for u in ups if u is not attacker)


def test_krum_with_too_few_updates_takes_the_median():
    ups = honest(3) + [{k: np.full(v.shape, 99.0, dtype=np.float32) for k, v in GLOBAL.items()}]
    with pytest.raises(ValueError, match="more than 2f \\+ 2"):
        krum_scores(ups, num_byzantine=1)
    out = Krum(num_byzantine=1).aggregate(PLAN, GLOBAL, ups, [1] * 4)
    assert all(np.abs(out[k]).max() < 1.0 for k in GLOBAL)  # the 99s did not win


def test_norm_bound_limits_a_scaled_attacker():
    ups = honest(4)
    attacker = attacked_update("scale", GLOBAL, ups[0], 1000.0, np.random.default_rng(0))
    plain = fedavg([*ups, attacker], [1] * 5)
    bounded = NormBound(norm_bound=0.5).aggregate(PLAN, GLOBAL, [*ups, attacker], [1] * 5)
    assert delta_norms(GLOBAL, [plain])[0] > 50
    assert delta_norms(GLOBAL, [bounded])[0] <= 0.5 + 1e-6


def test_attacked_updates():
    up = honest(1)[0]
    rng = np.random.default_rng(0)
    flip = attacked_update("sign_flip", GLOBAL, up, 2.0, rng)
    assert all(np.allclose(flip[k], -2.0 * up[k]) for k in up)
    scaled = attacked_update("scale", GLOBAL, up, 10.0, rng)
    assert all(np.allclose(scaled[k], 10.0 * up[k]) for k in up)
    noise = attacked_update("gaussian", GLOBAL, up, 3.0, rng)
    assert 1.5 < np.concatenate([v.ravel() for v in noise.values()]).std() < 4.5
    assert not any(finite_updates([attacked_update("nan", GLOBAL, up, 1.0, rng)]))
    with pytest.raises(ValueError, match="unknown update attack"):
        attacked_update("flipped_feedback", GLOBAL, up, 1.0, rng)


def test_malicious_clients_are_seeded_and_counted():
    chosen = malicious_clients(seed=3, num_clients=50, fraction=0.2)
    assert len(chosen) == 10 and chosen == malicious_clients(3, 50, 0.2)
    assert chosen != malicious_clients(4, 50, 0.2)
    assert malicious_clients(0, 5, 0.0) == frozenset()
    cfg = validate_config({"clients": {"num_clients": 5}, "attack": {"kind": "scale", "scale": 10.0}})
    attack = Attack.from_config(cfg)
    assert attack is not None and len(attack.malicious) == 1
    (bad,) = attack.malicious
    up = honest(1)[0]
    assert attack.apply(1, bad, GLOBAL, up)["w"][0, 0] == pytest.approx(10 * up["w"][0, 0])
    good = next(c for c in range(5) if c != bad)
    assert attack.apply(1, good, GLOBAL, up) is up
    assert Attack.from_config(validate_config({})) is None


def test_flipped_human_answers_the_wrong_way_round():
    client = make_client()
    users, a, b = random_pairs(SimulatedHuman(client, seed=1), 500, np.random.default_rng(2))
    honest_answers = SimulatedHuman(client, seed=1).answer_pairs(users, a, b)
    flipped = SimulatedHuman(client, seed=1, flipped=True).answer_pairs(users, a, b)
    assert np.array_equal(flipped, 1.0 - honest_answers)
    lo, hi = client.rating_scale
    items = SimulatedHuman(client, seed=1).known_items(0)[:10]
    r = SimulatedHuman(client, seed=4).rate(0, items)
    r_flip = SimulatedHuman(client, seed=4, flipped=True).rate(0, items)
    assert np.allclose(r + r_flip, lo + hi)


@pytest.mark.parametrize(
    ("raw", "start"),
    [
        ({"clients": {"num_clients": 4}, "federation": {"strategy": "krum"}}, "federation.krum_byzantine: got 1 —"),
        ({"clients": {"num_clients": 8}, "federation": {"strategy": "multi_krum", "multi_krum_selected": 8}},
         "federation.multi_krum_selected: got 8 —"),
        ({"federation": {"baseline": "centralized"}, "attack": {"kind": "nan"}}, "attack.kind: got 'nan' —"),
        ({"attack": {"kind": "label_flip"}}, "attack.kind: got 'label_flip' "),
        ({"attack": {"fraction": 1.5}}, "attack.fraction: got 1.5 "),
    ],
)
def test_impossible_robustness_settings_are_one_line(raw, start):
    with pytest.raises(ConfigError) as info:
        validate_config(raw)
    msg = str(info.value)
    assert msg.startswith(start) and "\n" not in msg, msg
