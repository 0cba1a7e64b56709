"""Client-level differential privacy (DP-FedAvg): clipping, noise, accounting, state (no Ray)."""

from __future__ import annotations

import dp_accounting
import numpy as np
import pytest
from dp_accounting.rdp import RdpAccountant
from scipy import stats

from fedrlhf_ray import privacy
from fedrlhf_ray.client_store import ClientStore
from fedrlhf_ray.config import validate_config
from fedrlhf_ray.errors import ConfigError
from fedrlhf_ray.local_trainer import ClientDP
from fedrlhf_ray.privacy.client_dp import UNCLIPPED_KEY, client_noise, privatize
from fedrlhf_ray.privacy.dp import DifferentialPrivacy, clipped_sum, noised_mean_step
from fedrlhf_ray.state_codec import StateFileError
from fedrlhf_ray.strategies import (
    FedAvg,
    FedProx,
    RejectNonFinite,
    RoundPlan,
    SumAggregator,
    delta_norms,
    make_strategy,
)

GLOBAL = {"w": np.zeros((4, 5), dtype=np.float32), "b": np.zeros(3, dtype=np.float32)}


def updates(n: int, scale: float, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{k: (scale * rng.standard_normal(v.shape)).astype(np.float32) for k, v in GLOBAL.items()} for _ in range(n)]


PLAN = RoundPlan(1, (0, 1), 2, 2)
SIZE = sum(v.size for v in GLOBAL.values())


def dp(**kw) -> DifferentialPrivacy:
    settings = {"noise_multiplier": 1.0, "clip_norm": 1.0, "delta": 1e-5, **kw}
    return DifferentialPrivacy(FedAvg(), **settings)


def run_rounds(strategy: DifferentialPrivacy, rounds: int, pool: int = 50, count: int = 10) -> dict:
    g = dict(GLOBAL)
    for r in range(1, rounds + 1):
        plan = strategy.plan_round(r, list(range(pool)), count, np.random.default_rng(r))
        g = strategy.aggregate(plan, g, updates(len(plan.sampled), 0.5, seed=r), [1] * len(plan.sampled))
    return g


def test_every_clipped_contribution_is_within_the_bound():
    ups = updates(8, 3.0)
    assert (delta_norms(GLOBAL, ups) > 1.0).all()
    for u in ups:
        total, norms = clipped_sum(GLOBAL, [u], clip_norm=1.0)
        assert np.sqrt(sum((v**2).sum() for v in total.values())) <= 1.0 + 1e-9 and norms[0] > 1.0
    small = updates(1, 0.01)
    total, _ = clipped_sum(GLOBAL, small, clip_norm=1.0)
    assert all(np.allclose(total[k], small[0][k]) for k in GLOBAL)  # under the bound: untouched


def test_noise_on_the_mean_has_std_sigma_c_over_m():
    sigma, clip, m = 1.3, 0.7, 10.0
    zero = {k: np.zeros(v.shape) for k, v in GLOBAL.items()}
    rng = np.random.default_rng(0)
    draws = np.concatenate([
        np.concatenate([v.ravel() for v in noised_mean_step(GLOBAL, zero, sigma * clip, m, rng.standard_normal(SIZE)).values()])
        for _ in range(2000)
    ])  # 46,000 values: the sample std is within 1 % of the true one with overwhelming probability
    assert draws.std() == pytest.approx(sigma * clip / m, rel=0.02)
    assert abs(draws.mean()) < 0.02 * sigma * clip / m * 10


def test_poisson_sampling_at_rate_count_over_pool():
    strategy = dp()
    plans = [strategy.plan_round(r, list(range(200)), 20, np.random.default_rng(r)) for r in range(400)]
    assert {(p.sampling_rate, p.expected) for p in plans} == {(0.1, 20.0)}
    sizes = [len(p.sampled) for p in plans]
    assert np.mean(sizes) == pytest.approx(20, rel=0.05)
    assert len(set(sizes)) > 5  # not a fixed size


def test_the_runs_epsilon_is_the_librarys_for_the_same_rounds():
    strategy = dp(noise_multiplier=1.1)
    run_rounds(strategy, 5)
    direct = RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
    direct.compose(dp_accounting.PoissonSampledDpEvent(10 / 50, dp_accounting.GaussianDpEvent(1.1)), 5)
    assert strategy.epsilon() == pytest.approx(direct.get_epsilon(1e-5), rel=1e-12)
    assert strategy.round_metrics()["privacy/epsilon"] == strategy.epsilon()


def test_epsilon_grows_with_rounds_and_shrinks_with_sigma():
    by_rounds = []
    for rounds in (1, 3, 10):
        s = dp()
        run_rounds(s, rounds)
        by_rounds.append(s.epsilon())
    assert by_rounds[0] < by_rounds[1] < by_rounds[2]
    by_sigma = []
    for sigma in (0.8, 1.5, 4.0):
        s = dp(noise_multiplier=sigma)
        run_rounds(s, 3)
        by_sigma.append(s.epsilon())
    assert by_sigma[0] > by_sigma[1] > by_sigma[2]


def test_target_epsilon_refuses_the_round_that_would_pass_it():
    free = dp()
    run_rounds(free, 4)
    eps = dp()
    run_rounds(eps, 3)
    target = (eps.epsilon() + free.epsilon()) / 2  # between 3 and 4 rounds' ε
    capped = dp(target_epsilon=target)
    run_rounds(capped, 3)
    reason = capped.stop_before(4, 50, 10)
    assert reason is not None and "target_epsilon" in reason and "round 4" in reason
    assert dp(target_epsilon=target).stop_before(1, 50, 10) is None


def test_state_resumes_the_accountant_and_the_clip_norm_exactly():
    a = dp(adaptive_clipping=True, clipped_count_stddev=2.0)
    run_rounds(a, 3)
    b = dp(adaptive_clipping=True, clipped_count_stddev=2.0)
    b.load_state(a.state())
    assert b.epsilon() == a.epsilon() and b.clip_norm == a.clip_norm
    ga, gb = run_rounds(a, 2), run_rounds(b, 2)
    assert all(np.array_equal(ga[k], gb[k]) for k in ga)
    assert a.epsilon() == b.epsilon()


def test_adaptive_clipping_tracks_the_update_norms():
    small, large = dp(adaptive_clipping=True, clipped_count_stddev=2.0), dp(
        adaptive_clipping=True, clipped_count_stddev=2.0, clip_norm=0.01
    )
    g = dict(GLOBAL)
    for r in range(1, 16):
        for s in (small, large):
            plan = s.plan_round(r, list(range(50)), 25, np.random.default_rng(r))
            s.aggregate(plan, g, updates(len(plan.sampled), 0.05, seed=r), [1] * len(plan.sampled))
    norm = float(np.median(delta_norms(GLOBAL, updates(200, 0.05))))
    # Both move towards the median update norm (≈ 0.24) from either side.
    assert small.clip_norm < 1.0 and large.clip_norm > 0.01
    assert abs(np.log(small.clip_norm / norm)) < abs(np.log(1.0 / norm))
    assert abs(np.log(large.clip_norm / norm)) < abs(np.log(0.01 / norm))
    # Splitting σ with the count query costs nothing extra: one round's ε matches σ alone.
    plain = dp()
    run_rounds(plain, 1)
    adaptive = dp(adaptive_clipping=True, clipped_count_stddev=2.0)
    run_rounds(adaptive, 1)
    assert adaptive.epsilon() == pytest.approx(plain.epsilon(), rel=0.02)


def test_layers_wrap_fedavg_and_fedprox_behind_the_filter():
    cfg = validate_config({"privacy": {"dp": {"enabled": True}}, "federation": {"strategy": "fedprox"}})
    strategy = make_strategy(cfg.federation, privacy=privacy.layers(cfg))
    assert isinstance(strategy, RejectNonFinite) and isinstance(strategy, SumAggregator)
    assert type(strategy.inner) is DifferentialPrivacy
    assert type(strategy.inner.inner) is FedProx and strategy.configure_train(PLAN).proximal_mu == 0.01
    assert privacy.layers(validate_config({})) is None


@pytest.mark.parametrize(
    ("raw", "start"),
    [
        ({"federation": {"strategy": "median"}}, "privacy.dp.enabled: got true —"),
        ({"federation": {"baseline": "centralized"}}, "privacy.dp.enabled: got true —"),
        ({"privacy": {"dp": {"target_epsilon": 0.01}}}, "privacy.dp.target_epsilon: got 0.01 —"),
        ({"privacy": {"dp": {"adaptive_clipping": True}}}, "privacy.dp.clipped_count_stddev: got 0.25 (the default"),
        ({"privacy": {"dp": {"noise_multiplier": 0}}}, "privacy.dp.noise_multiplier: got 0 "),
        ({"privacy": {"dp": {"delta": 1.0}}}, "privacy.dp.delta: got 1.0 "),
        ({"privacy": {"dp": {"mode": "local"}}}, "privacy.dp.mode: got 'local' "),
    ],
)
def test_impossible_dp_settings_are_one_line(raw, start):
    merged = {**raw, "privacy": {"dp": {"enabled": True, **raw.get("privacy", {}).get("dp", {})}}}
    with pytest.raises(ConfigError) as info:
        validate_config(merged)
    msg = str(info.value)
    assert msg.startswith(start) and "\n" not in msg, msg


# --------------------------------------------------------------------------- distributed noise


def test_client_noise_is_standard_normal_and_a_function_of_the_secret_and_round():
    secret = bytes(range(32))
    draws = client_noise(secret, 3, 200_001)
    assert draws.shape == (200_001,) and np.isfinite(draws).all()
    # Fixed secret: a deterministic draw, tested against N(0, 1) like any sample of that size.
    assert stats.kstest(draws, "norm").pvalue > 1e-3
    assert abs(draws.mean()) < 0.01 and draws.std() == pytest.approx(1.0, rel=0.01)
    np.testing.assert_array_equal(draws, client_noise(secret, 3, 200_001))
    assert abs(np.corrcoef(draws[:1000], client_noise(secret, 4, 1000))[0, 1]) < 0.15
    assert abs(np.corrcoef(draws[:1000], client_noise(bytes(32), 3, 1000))[0, 1]) < 0.15


def test_the_client_clips_its_own_change_and_adds_its_share_of_the_noise():
    rng = np.random.default_rng(1)
    big = {k: (3.0 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in GLOBAL.items()}
    size = sum(v.size for v in GLOBAL.values())
    clip_only = ClientDP(clip=1.0, noise_stddev=0.0, count=True)
    sent, norm = privatize(GLOBAL, big, clip_only, np.zeros(size + 1))
    assert norm > 1.0 and sent[UNCLIPPED_KEY].tolist() == [0.0]  # clipped: its bit is 0
    sent.pop(UNCLIPPED_KEY)
    assert delta_norms(GLOBAL, [sent])[0] == pytest.approx(1.0, rel=1e-6)
    assert all(sent[k].dtype == GLOBAL[k].dtype for k in GLOBAL)
    small = {k: v + np.float32(1e-3) for k, v in GLOBAL.items()}
    sent, _ = privatize(GLOBAL, small, clip_only, np.zeros(size + 1))
    assert sent[UNCLIPPED_KEY].tolist() == [1.0] and np.allclose(sent["w"], small["w"])
    noisy = ClientDP(clip=1.0, noise_stddev=0.5)
    draws = np.concatenate([
        np.concatenate([v.ravel() for v in privatize(GLOBAL, GLOBAL, noisy, client_noise(b"k" * 32, r, size))[0].values()])
        for r in range(500)
    ])
    assert draws.std() == pytest.approx(0.5, rel=0.03)


def test_distributed_shares_sum_to_the_central_noise_on_the_mean():
    """m clients each add N(0, σ²C²/m): the released mean's noise is σC/(qK), as in central mode."""
    sigma, clip, pool, count = 1.3, 0.7, 20, 10
    size = sum(v.size for v in GLOBAL.values())
    steps = []
    for r in range(1, 301):
        strategy = dp(noise_multiplier=sigma, clip_norm=clip, mode="distributed")
        plan = strategy.plan_round(r, list(range(pool)), count, np.random.default_rng(r))
        picked = plan.sampled
        told = strategy.configure_train(plan)
        assert told.dp.clip == clip and told.dp.noise_stddev == pytest.approx(sigma * clip / np.sqrt(len(picked)))
        sent = [privatize(GLOBAL, GLOBAL, told.dp, client_noise(bytes([c]) * 32, r, size))[0] for c in picked]
        new = strategy.aggregate(plan, GLOBAL, sent, [1.0] * len(sent))
        steps.append(np.concatenate([new[k].ravel() for k in sorted(new)]).astype(np.float64))
    assert np.concatenate(steps).std() == pytest.approx(sigma * clip / (0.5 * pool), rel=0.03)
    assert strategy.round_metrics()["privacy/noise_stddev"] == pytest.approx(sigma * clip / (0.5 * pool))


def test_dropouts_take_their_noise_along_and_are_accounted():
    strategy = dp(noise_multiplier=1.0, mode="distributed")
    plan = strategy.plan_round(1, list(range(50)), 10, np.random.default_rng(0))
    m = len(plan.sampled)
    zero = {k: np.zeros(v.shape) for k, v in GLOBAL.items()}
    strategy.aggregate_sum(plan, GLOBAL, zero, total_weight=m // 2)  # half dropped after masking
    rate, noise, _ = strategy.steps[-1]
    assert noise == pytest.approx(np.sqrt((m // 2) / m))
    full = dp(noise_multiplier=1.0, mode="distributed")
    full.aggregate_sum(plan, GLOBAL, zero, total_weight=m)
    assert full.steps[-1] == (rate, 1.0, None) and strategy.epsilon() > full.epsilon()
    # Nobody at all: the driver releases the whole noise itself (an empty sample's mechanism).
    empty = dp(noise_multiplier=1.0, mode="distributed")
    released = empty.aggregate_sum(plan, GLOBAL, zero, total_weight=0)
    assert np.concatenate([v.ravel() for v in released.values()]).std() > 0.01
    assert empty.steps[-1] == (rate, 1.0, None)


def test_under_secure_aggregation_clients_clip_and_the_driver_noises_the_sum_in_central_mode():
    strategy = dp(noise_multiplier=1.0, clip_norm=0.5, clients_clip=True)
    plan = strategy.plan_round(1, list(range(10)), 10, np.random.default_rng(0))
    told = strategy.configure_train(plan)
    assert told.dp.clip == 0.5 and told.dp.noise_stddev == 0.0 and not told.dp.count
    zero = {k: np.zeros(v.shape) for k, v in GLOBAL.items()}
    released = strategy.aggregate_sum(plan, GLOBAL, zero, total_weight=10)
    assert np.concatenate([v.ravel() for v in released.values()]).std() == pytest.approx(0.05, rel=0.5)
    adaptive = dp(noise_multiplier=1.0, mode="distributed", adaptive_clipping=True, clipped_count_stddev=5.0)
    told = adaptive.configure_train(plan)
    assert told.dp.count and told.dp.count_stddev == pytest.approx(5.0 / np.sqrt(10))


def test_the_noise_secret_is_made_once_kept_and_checked(tmp_path):
    store = ClientStore(tmp_path)
    first = store.noise_secret(3)
    assert len(first) == 32 and store.noise_secret(3) == first and ClientStore(tmp_path).noise_secret(3) == first
    assert store.noise_secret(4) != first
    (tmp_path / "client-000003" / "noise.key").write_bytes(b"short")
    with pytest.raises(StateFileError, match="damaged"):
        ClientStore(tmp_path).noise_secret(3)


def test_central_noise_and_sampling_are_secret_from_whoever_knows_the_seed():
    """The release minus the noise an attacker recomputes from the config's seed (as the noise
    once was drawn) keeps all of the true noise; two strategies draw different secrets; the
    secret is in the checkpointed state only, never in the metrics."""
    from fedrlhf_ray.seeding import derive_rng

    releases = []
    for _ in range(2):
        strategy = dp(noise_multiplier=1.0, clip_norm=1.0)
        plan = RoundPlan(1, tuple(range(10)), 10, 10)
        new = strategy.aggregate(plan, GLOBAL, [], [])
        releases.append(np.concatenate([(new[k] - GLOBAL[k]).ravel() for k in GLOBAL]).astype(np.float64))
        guessed = derive_rng(0, "dp-noise", 1)
        recomputed = np.concatenate([guessed.standard_normal(v.shape).ravel() for v in GLOBAL.values()]) / 10
        residual = releases[-1] - recomputed
        assert residual.std() > 0.9 * releases[-1].std()  # the guess removes none of the noise
        assert "privacy/secret" not in strategy.round_metrics()
        assert bytes.fromhex(strategy.state()["secret"]) == strategy.secret
    assert not np.allclose(releases[0], releases[1])
    # Sampling ignores the public generator it is handed.
    a, b = dp(), dp()
    public = [a.plan_round(r, list(range(40)), 20, np.random.default_rng(0)).sampled for r in range(1, 6)]
    assert public != [b.plan_round(r, list(range(40)), 20, np.random.default_rng(0)).sampled for r in range(1, 6)]


def test_a_restored_strategy_repeats_its_noise_and_sample():
    first = dp(noise_multiplier=1.0)
    second = dp(noise_multiplier=1.0)
    second.load_state(first.state())
    plan_a = first.plan_round(3, list(range(30)), 10, np.random.default_rng(1))
    plan_b = second.plan_round(3, list(range(30)), 10, np.random.default_rng(2))
    assert plan_a == plan_b
    ups = updates(len(plan_a.sampled), 0.3, seed=3)
    out_a = first.aggregate(plan_a, GLOBAL, ups, [1] * len(ups))
    out_b = second.aggregate(plan_b, GLOBAL, ups, [1] * len(ups))
    assert all(np.array_equal(out_a[k], out_b[k]) for k in GLOBAL)
    with pytest.raises(ValueError, match="lacks its secret"):
        dp().load_state({k: v for k, v in first.state().items() if k != "secret"})
