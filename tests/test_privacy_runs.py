"""DP and Byzantine clients in real runs: Ray client actors, the lifecycle, checkpoints, resume.

The MLP trainer keeps these runs to seconds; the learning checks on the synthetic RLHF world
are in ``test_robust_learning.py``.
"""

from __future__ import annotations

import numpy as np
import pytest

from fedrlhf_ray.attacks import malicious_clients
from fedrlhf_ray.config import validate_config
from fedrlhf_ray.errors import UserError
from fedrlhf_ray.experiment import resume_config, run_experiment
from fedrlhf_ray.privacy.dp import epsilon, round_event
from fedrlhf_ray.torch_trainer import mlp_trainer_factory

K, SEED = 8, 4


def cfg_for(rounds=4, **sections):
    raw = {
        "seed": SEED,
        "clients": {"num_clients": K},
        "federation": {"rounds": rounds, "clients_per_round": 0.5},
        "ray": {"num_workers": 2},
        "tracking": {"enabled": False},
    }
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    return validate_config(raw)


def run(cfg, run_dir, **kw):
    return run_experiment(cfg, run_dir=run_dir, trainer_factory=mlp_trainer_factory(K, seed=SEED, lr_decay=0.8), **kw)


def instrumented_run(cfg, run_dir, **kw):
    """A run whose driver is in this process, where the test's patches of its classes apply."""
    return run(cfg, run_dir, in_process_driver=True, **kw)


DP = {"dp": {"enabled": True, "noise_multiplier": 1.2, "clip_norm": 0.5}}


def test_dp_run_reports_epsilon_every_round_and_resumes_its_accountant_exactly(ray_session, tmp_path):
    import shutil

    whole = run(cfg_for(privacy=DP), tmp_path / "whole")
    rows = whole.run_dir.metrics()
    eps = [r["privacy/epsilon"] for r in rows if r["round"] >= 1]
    assert len(eps) == 4 and all(a < b for a, b in zip(eps, eps[1:], strict=False))
    # The library's ε for 4 Poisson-sampled Gaussian rounds (q = 4/8, σ = 1.2).
    assert eps[-1] == pytest.approx(epsilon([round_event(0.5, 1.2, None)] * 4, 1e-5), rel=1e-12)
    assert whole.summary["privacy"]["epsilon"] == eps[-1]
    # Who was sampled is secret: counts are logged, no client's training row.
    assert all(r["kind"] == "eval" for r in whole.run_dir.client_metrics())
    # Interrupted after 2 rounds (and copied), then each copy resumed to 4: the same model and ε.
    half = run(cfg_for(rounds=2, privacy=DP), tmp_path / "a")
    assert half.summary["privacy"]["epsilon"] == eps[1]
    shutil.copytree(half.run_dir.path, tmp_path / "b")
    ends = []
    for name in ("a", "b"):
        resumed = run(resume_config(tmp_path / name, ["federation.rounds=4"]), tmp_path / name, resume=True)
        assert resumed.summary["privacy"]["epsilon"] == eps[-1]
        ends.append(resumed.run_dir.load_checkpoint(4)["global_weights"])
    for k in ends[0]:
        np.testing.assert_array_equal(ends[0][k], ends[1][k], err_msg=k)
    # The same seed, another run: another secret, so another sample and other noise.
    first = whole.run_dir.load_checkpoint(4)["global_weights"]
    assert any(not np.array_equal(first[k], ends[0][k]) for k in first)


def test_target_epsilon_ends_the_run_before_the_round_that_would_pass_it(ray_session, tmp_path):
    three = epsilon([round_event(0.5, 1.2, None)] * 3, 1e-5)
    four = epsilon([round_event(0.5, 1.2, None)] * 4, 1e-5)
    cfg = cfg_for(rounds=6, privacy={"dp": {**DP["dp"], "target_epsilon": (three + four) / 2}})
    result = run(cfg, tmp_path / "capped")
    assert result.status == "completed" and result.rounds == 3
    assert result.summary["rounds"] == 3 and "target_epsilon" in result.summary["stopped"]
    assert result.summary["privacy"]["epsilon"] == pytest.approx(three, rel=1e-12)
    assert three <= cfg.privacy.dp.target_epsilon
    assert result.final  # the last round run was evaluated
    with pytest.raises(UserError, match="it cannot go on"):
        resume_config(result.run_dir.path, ["federation.rounds=8"])


def test_nan_attackers_never_reach_the_aggregate(ray_session, tmp_path):
    cfg = cfg_for(federation={"clients_per_round": 1.0}, attack={"kind": "nan", "fraction": 0.25})
    bad = malicious_clients(SEED, K, 0.25)
    result = run(cfg, tmp_path / "nan")
    rows = [r for r in result.run_dir.metrics() if r["round"] >= 1]
    assert [r["fed/rejected"] for r in rows] == [float(len(bad))] * 4
    assert [r["fed/clients_aggregated"] for r in rows] == [float(K - len(bad))] * 4  # received, not aggregated
    weights = result.run_dir.load_checkpoint(4)["global_weights"]
    assert all(np.isfinite(v).all() for v in weights.values())


def test_robust_strategies_shrug_off_a_scaled_attacker_that_drags_fedavg(ray_session, tmp_path):
    attack = {"kind": "scale", "fraction": 0.125, "scale": 50.0}  # one of 8 clients, ×50
    clean = run(cfg_for(rounds=2, federation={"clients_per_round": 1.0}), tmp_path / "clean").run_dir
    base = clean.load_checkpoint(2)["global_weights"]

    def norm(weights):
        return float(np.sqrt(sum((weights[k].astype(np.float64) ** 2).sum() for k in base)))

    step = norm({k: base[k] - clean.load_checkpoint(1)["global_weights"][k] for k in base})  # one clean round

    def distance(strategy):
        # norm_bound: twice a clean round's movement; trimmed_mean drops 1 of 8 at each end.
        fed = {"clients_per_round": 1.0, "strategy": strategy, "norm_bound": 2 * step, "trim_fraction": 0.2}
        got = run(cfg_for(rounds=2, federation=fed, attack=attack), tmp_path / strategy).run_dir
        return norm({k: got.load_checkpoint(2)["global_weights"][k] - base[k] for k in base}) / step

    distances = {s: distance(s) for s in ("fedavg", "krum", "median", "trimmed_mean", "norm_bound")}
    # The attacker drags FedAvg by many clean rounds; the robust strategies stay within what
    # choosing among honest updates costs (Krum keeps one client's update, not their mean).
    assert distances["fedavg"] > 10.0, distances
    for strategy in ("krum", "median", "trimmed_mean", "norm_bound"):
        assert distances[strategy] < 3.0, distances


SECAGG = {"secure_aggregation": True}


def dense(rounds=4, **sections):
    return cfg_for(rounds=rounds, federation={"clients_per_round": 1.0, "sparse_rows": False}, **sections)


def test_secure_aggregation_ends_with_the_plain_dense_runs_model(ray_session, tmp_path):
    plain_run = run(dense(), tmp_path / "plain")
    plain = plain_run.run_dir.load_checkpoint(4)["global_weights"]
    masked = run(dense(privacy=SECAGG), tmp_path / "secagg")
    got = masked.run_dir.load_checkpoint(4)["global_weights"]
    for k in plain:
        # Fixed-point rounding (2^-25 per weighted value) is all that differs, through 4 rounds of SGD.
        np.testing.assert_allclose(got[k], plain[k], rtol=0, atol=1e-5, err_msg=k)
    # Against an honest-but-curious server (no signatures, no consistency round): the same sums.
    hbc = run(dense(privacy={**SECAGG, "secagg_adversary": "honest_but_curious"}), tmp_path / "hbc")
    assert not (hbc.run_dir.path / "clients" / "pki").exists() and (masked.run_dir.path / "clients" / "pki").is_dir()
    same = hbc.run_dir.load_checkpoint(4)["global_weights"]
    assert all(np.array_equal(same[k], got[k]) for k in got)
    rows = [r for r in masked.run_dir.metrics() if r["round"] >= 1]
    assert all(r["fed/dropouts"] == 0 and r["fed/clients_aggregated"] == K for r in rows)
    # Held-out metrics too are a secure sum: the same means as the plain run's, no client's row.
    assert not [r for r in masked.run_dir.client_metrics() if r["kind"] == "eval"]
    final, plain_final = masked.run_dir.metrics()[-1], plain_run.run_dir.metrics()[-1]
    assert final["eval/clients"] == K and not any(k.endswith("/worst_decile") for k in final)
    for key in ("eval/loss/mean", "eval/accuracy/mean"):
        assert final[key] == pytest.approx(plain_final[key], abs=1e-4), key


def test_the_driver_never_holds_an_unmasked_update(ray_session, tmp_path, monkeypatch):
    from fedrlhf_ray.driver import FederatedDriver
    from fedrlhf_ray.local_trainer import ClientUpdate, MaskedUpdate

    seen: list = []
    original = FederatedDriver._received
    monkeypatch.setattr(FederatedDriver, "_received", lambda self, obj: seen.append(obj) or original(self, obj))
    secure_run = instrumented_run(dense(privacy=SECAGG), tmp_path / "secagg")
    plain_updates: list[ClientUpdate] = []
    monkeypatch.setattr(
        FederatedDriver, "_received",
        lambda self, obj: plain_updates.extend(u for u in (obj if isinstance(obj, list) else []) if isinstance(u, ClientUpdate))
        or original(self, obj),
    )
    instrumented_run(dense(), tmp_path / "plain")

    def flat(objs):
        for obj in objs:
            yield from (obj if isinstance(obj, list) else [obj])

    received = list(flat(seen))
    assert not any(isinstance(o, ClientUpdate) for o in received)
    masked = [o for o in received if isinstance(o, MaskedUpdate) and o.kind == "update"]
    assert len(masked) == 4 * K and all(o.masked.dtype == np.uint64 for o in masked)
    evaluations = [o for o in received if isinstance(o, MaskedUpdate) and o.kind == "evaluation"]
    assert len(evaluations) == 5 * K  # rounds 0–4, and no client's metrics in the clear:
    assert not any(isinstance(o, dict) and any(str(k).startswith("eval/") for k in o) for o in received)
    # Each masked vector against the same client's true update of the same round (the plain
    # dense run computes exactly those): no correlation, and nothing like its scale.
    true = {(i // K + 1, u.client_id): u for i, u in enumerate(plain_updates)}
    for i, m in enumerate(masked):
        u = true[(i // K + 1, m.client_id)]
        x = np.concatenate([u.weights[k].ravel() for k in sorted(u.weights)])
        seen_values = m.masked[: x.size].view(np.int64).astype(np.float64)
        assert abs(np.corrcoef(seen_values, x)[0, 1]) < 0.1
        assert np.abs(seen_values).mean() > 1e15
        # Its training metrics are masked too: only their names travel in the clear.
        assert set(m.names) == set(u.metrics) and not m.metrics
        assert m.masked.size == x.size + 1 + 2 * len(m.names)
    # The round's logged means are the plain run's (the same updates, summed securely).
    secure_round_2 = next(r for r in secure_run.run_dir.metrics() if r["round"] == 2)
    plain_loss = np.mean([u.metrics["train/loss"] for u in plain_updates[K : 2 * K]])
    assert secure_round_2["train/loss/mean"] == pytest.approx(plain_loss, abs=1e-5)


def test_a_host_lost_after_sharing_drops_its_clients_and_the_round_still_aggregates(ray_session, tmp_path):
    crash = {"round": 2, "client": 3, "times": 1, "marker": str(tmp_path / "attempts"), "how": "sigkill"}
    factory = mlp_trainer_factory(K, seed=SEED, lr_decay=0.8, crash=crash)
    # Four hosts: losing client 3's host (clients 3 and 7) leaves 6 of 8, and every survivor
    # still has the 4 of its 7 neighbours that rebuilding a secret needs.
    cfg = dense(privacy=SECAGG, ray={"num_workers": 4, "cpus_per_worker": 0.5})
    result = run_experiment(cfg, run_dir=tmp_path / "drop", trainer_factory=factory)
    rows = {int(r["round"]): r for r in result.run_dir.metrics()}
    assert rows[2]["fed/dropouts"] == 2 and rows[2]["fed/clients_aggregated"] == 6
    assert rows[2]["fed/actor_restarts"] == 1 and rows[2]["secagg/threshold"] == 4
    assert all(rows[r]["fed/dropouts"] == 0 for r in (1, 3, 4))
    weights = result.run_dir.load_checkpoint(4)["global_weights"]
    assert all(np.isfinite(v).all() for v in weights.values())


def test_a_secure_round_that_fails_after_its_masked_inputs_is_spent_never_run_again(
    ray_session, tmp_path, monkeypatch
):
    """Two hosts: losing one in round 2 leaves too few shares to unmask. Running the round again
    over the other clients would hand the driver a difference of two sums; instead the round is
    spent (model unchanged) and round 3 starts anew, and no client sends two masked inputs for
    one round."""
    from collections import Counter

    from fedrlhf_ray.driver import FederatedDriver
    from fedrlhf_ray.local_trainer import MaskedUpdate

    seen: list = []
    original = FederatedDriver._received
    monkeypatch.setattr(FederatedDriver, "_received", lambda self, obj: seen.append(obj) or original(self, obj))
    crash = {"round": 2, "client": 3, "times": 1, "marker": str(tmp_path / "attempts"), "how": "sigkill"}
    factory = mlp_trainer_factory(K, seed=SEED, lr_decay=0.8, crash=crash)
    models = {}
    result = run_experiment(
        dense(privacy=SECAGG), run_dir=tmp_path / "half", trainer_factory=factory, in_process_driver=True,
        on_round=lambda p: models.setdefault(p.completed_rounds, p.run_dir.load_checkpoint(p.completed_rounds)),
    )
    assert result.status == "completed"
    rows = {int(r["round"]): r for r in result.run_dir.metrics()}
    assert rows[2]["fed/round_failed"] == 1 and rows[2]["fed/clients_aggregated"] == 0
    assert rows[2]["fed/round_seconds"] > 0  # the progress line prints it
    assert all("fed/round_failed" not in rows[r] and rows[r]["fed/clients_aggregated"] == K for r in (1, 3, 4))
    one, two, three = (models[r]["global_weights"] for r in (1, 2, 3))
    assert all(np.array_equal(one[k], two[k]) for k in one)
    assert any(not np.array_equal(two[k], three[k]) for k in two)
    masked = [u for obj in seen for u in (obj if isinstance(obj, list) else [obj])
              if isinstance(u, MaskedUpdate) and u.kind == "update"]
    per_client = Counter(u.client_id for u in masked)
    assert max(per_client.values()) == 4 and len(masked) > 3 * K  # round 2 sent some, once each


DISTRIBUTED = {**SECAGG, "dp": {**DP["dp"], "mode": "distributed"}}


def test_a_resume_never_reruns_a_secure_round_whose_masked_inputs_were_asked_for(ray_session, tmp_path):
    """The driver died in round 3 after asking for masked inputs (its note says so): the resume
    spends round 3, charging ε for the fewest clients its sum could have held, and trains round 4."""
    import json

    from fedrlhf_ray.driver import SECURE_ROUND

    half = run(dense(rounds=2, privacy=DISTRIBUTED), tmp_path / "run")
    path = half.run_dir.path
    assert json.loads((path / SECURE_ROUND).read_text())["round"] == 2
    (path / SECURE_ROUND).write_text(json.dumps({"round": 3, "fewest": 4}))
    two = half.run_dir.load_checkpoint(2)["global_weights"]
    done = run(resume_config(path, ["federation.rounds=4"]), path, resume=True)
    rows = {int(r["round"]): r for r in done.run_dir.metrics()}
    assert rows[3]["fed/round_failed"] == 1 and "fed/round_failed" not in rows[4]
    three, four = (done.run_dir.load_checkpoint(r)["global_weights"] for r in (3, 4))
    assert all(np.array_equal(two[k], three[k]) for k in two)
    assert any(not np.array_equal(three[k], four[k]) for k in two)
    full, spent = round_event(1.0, 1.2, None), round_event(1.0, 1.2 * np.sqrt(4 / K), None)
    assert done.summary["privacy"]["epsilon"] == pytest.approx(epsilon([full, full, spent, full], 1e-5))
    # A note that does not parse is one line: which rounds were sent is unknown.
    (path / SECURE_ROUND).write_text("{")
    with pytest.raises(UserError, match="secure_round.json is damaged"):
        run(resume_config(path, ["federation.rounds=5"]), path, resume=True)


def test_distributed_dp_under_secure_aggregation_the_driver_only_sees_a_noised_sum(ray_session, tmp_path, monkeypatch):
    from fedrlhf_ray.privacy.dp import DifferentialPrivacy

    sums = []
    original = DifferentialPrivacy.aggregate_sum

    def spy(self, plan, global_weights, weighted_sum, total_weight):
        sums.append((dict(global_weights), dict(weighted_sum), total_weight, self._step_of(plan)[1]))
        return original(self, plan, global_weights, weighted_sum, total_weight)

    monkeypatch.setattr(DifferentialPrivacy, "aggregate_sum", spy)
    result = instrumented_run(dense(privacy=DISTRIBUTED), tmp_path / "distributed")
    assert len(sums) == 4
    for g, total, weight, sigma in sums:
        assert weight == K
        # Σθ − K·g = Σ clip(Δ) (norm ≤ K·C) + the clients' noise (norm ≈ σC√d ≫ K·C here): the
        # sum the driver unmasks is the noise's, to within the clipped signal.
        excess = np.concatenate([(np.asarray(total[k]) - weight * np.asarray(g[k], np.float64)).ravel() for k in g])
        expected = sigma * 0.5 * np.sqrt(excess.size)
        assert 0.1 * expected > K * 0.5
        assert np.linalg.norm(excess) == pytest.approx(expected, rel=0.1)
    # Accounted like central DP with the same q and σ (no dropouts).
    assert result.summary["privacy"]["epsilon"] == pytest.approx(epsilon([round_event(1.0, 1.2, None)] * 4, 1e-5))
    rows = [r for r in result.run_dir.metrics() if r["round"] >= 1]
    assert all(r["fed/dropouts"] == 0 and r["privacy/noise_stddev"] == pytest.approx(1.2 * 0.5 / K) for r in rows)


def test_distributed_noise_comes_from_the_clients_kept_secrets_so_a_resume_is_exact(ray_session, tmp_path):
    import shutil

    half = run(dense(rounds=2, privacy=DISTRIBUTED), tmp_path / "a")
    keys = sorted(p.name for p in (half.run_dir.path / "clients").glob("client-*/noise.key"))
    assert len(keys) == K
    shutil.copytree(half.run_dir.path, tmp_path / "b")
    ends = []
    for name in ("a", "b"):
        path = tmp_path / name
        done = run(resume_config(path, ["federation.rounds=4"]), path, resume=True)
        ends.append(done.run_dir.load_checkpoint(4)["global_weights"])
    for k in ends[0]:
        np.testing.assert_array_equal(ends[0][k], ends[1][k], err_msg=k)
    # A fresh run draws fresh secrets: its noise, and so its model, differ.
    other = run(dense(privacy=DISTRIBUTED), tmp_path / "c").run_dir.load_checkpoint(4)["global_weights"]
    assert any(not np.array_equal(other[k], ends[0][k]) for k in other)


def test_distributed_dp_without_secure_aggregation_sends_clipped_noised_updates(ray_session, tmp_path, monkeypatch):
    from fedrlhf_ray.driver import FederatedDriver
    from fedrlhf_ray.local_trainer import ClientUpdate

    seen: list = []
    original = FederatedDriver._received
    monkeypatch.setattr(FederatedDriver, "_received", lambda self, obj: seen.append(obj) or original(self, obj))
    cfg = dense(privacy={"dp": {**DP["dp"], "mode": "distributed", "adaptive_clipping": True,
                                "clipped_count_stddev": 2.0}})
    result = instrumented_run(cfg, tmp_path / "plain")
    updates = [u for obj in seen for u in (obj if isinstance(obj, list) else [obj]) if isinstance(u, ClientUpdate)]
    assert len(updates) == 4 * K
    assert all("privacy/unclipped" in u.weights for u in updates)
    rows = [r for r in result.run_dir.metrics() if r["round"] >= 1]
    assert all(np.isfinite(r["privacy/unclipped_share_noised"]) for r in rows)
    clips = [r["privacy/clip_norm"] for r in rows]
    assert len(set(clips)) == 4  # adaptive: C moved every round


PERSONAL_FEDPROX = {"personalization": "personal_head", "personal_layers": ["4."], "strategy": "fedprox",
                    "fedprox_mu": 0.1}


def test_secure_aggregation_with_fedprox_and_a_personal_head_resumes_exactly(ray_session, tmp_path):
    """Masks cancel exactly, so a resumed secure run ends bit for bit as the uninterrupted one;
    personal layers stay on the clients and out of the masked vectors."""
    def cfg(rounds):
        return cfg_for(rounds=rounds, privacy=SECAGG,
                       federation={"clients_per_round": 1.0, "sparse_rows": False, **PERSONAL_FEDPROX})

    whole = run(cfg(4), tmp_path / "whole")
    half = run(cfg(2), tmp_path / "half")
    resumed = run(resume_config(half.run_dir.path, ["federation.rounds=4"]), half.run_dir.path, resume=True)
    a = whole.run_dir.load_checkpoint(4)["global_weights"]
    b = resumed.run_dir.load_checkpoint(4)["global_weights"]
    before = whole.run_dir.load_checkpoint(3)["global_weights"]
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert all(np.array_equal(a[k], before[k]) for k in a if k.startswith("4."))  # never aggregated
    assert any(not np.array_equal(a[k], before[k]) for k in a if not k.startswith("4."))
    shared = sum(v.size for k, v in a.items() if not k.startswith("4."))
    rows = [r for r in whole.run_dir.metrics() if r["round"] >= 1]
    # train/loss, train/seconds, store/record_bytes and store/save_ms: value and present flag each.
    metrics = 2 * 4
    assert all(r["fed/update_bytes"] == K * 8 * (shared + 1 + metrics) for r in rows)  # w·θ_shared ‖ w ‖ …, 64-bit


def test_distributed_dp_composes_with_fedprox_a_personal_head_and_adaptive_clipping(ray_session, tmp_path):
    privacy_cfg = {**SECAGG, "dp": {**DISTRIBUTED["dp"], "adaptive_clipping": True, "clipped_count_stddev": 2.0}}
    cfg = cfg_for(privacy=privacy_cfg, federation={"clients_per_round": 1.0, **PERSONAL_FEDPROX})
    result = run(cfg, tmp_path / "all")
    weights = result.run_dir.load_checkpoint(4)["global_weights"]
    shared = sum(v.size for k, v in weights.items() if not k.startswith("4."))
    rows = [r for r in result.run_dir.metrics() if r["round"] >= 1]
    # The masked vector: the shared weights, the not-clipped bit, the weight, 4 metrics × 2.
    assert all(r["fed/update_bytes"] == K * 8 * (shared + 2 + 8) for r in rows)
    assert len({r["privacy/clip_norm"] for r in rows}) == 4
    assert result.summary["privacy"]["mode"] == "distributed" and result.summary["privacy"]["epsilon"] > 0


@pytest.mark.slow
def test_the_quickstart_under_dp_still_beats_random(ray_session, tmp_path, monkeypatch):
    from fedrlhf_ray.config import load_config
    from fedrlhf_ray.privacy import dp
    from tests.conftest import REPO_ROOT

    # DP's noise comes from a secret drawn per run; this test fixes it (its driver runs in this
    # process) so that its learning check is deterministic.
    monkeypatch.setattr(dp, "new_secret", lambda: bytes(range(32)))
    sets = ["tracking.enabled=false", "privacy.dp.enabled=true", "privacy.dp.noise_multiplier=0.5",
            "privacy.dp.clip_norm=0.2", "evaluation.every_n_rounds=100"]  # rounds 0 and 8 evaluate
    result = run_experiment(load_config(REPO_ROOT / "tune_configs" / "quickstart.yaml", sets), run_dir=tmp_path / "dp",
                            in_process_driver=True)
    final = result.final
    # Measured against random 0.294 after the 8 rounds, over secrets: σ = 0.5 (ε = 41.7 at
    # δ = 1e-5) 0.417, 0.470, 0.497; σ = 1.0 (ε = 16.5) 0.305-0.420 over five, too close to
    # random for a claim.
    assert final["eval/liked_hit_rate/mean"] > final["eval/random_hit_rate/mean"] + 0.10
    assert result.summary["privacy"]["epsilon"] == pytest.approx(
        epsilon([round_event(1.0, 0.5, None)] * 8, 1e-5), rel=1e-12
    )
