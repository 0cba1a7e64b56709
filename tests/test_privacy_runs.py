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


DP = {"dp": {"enabled": True, "noise_multiplier": 1.2, "clip_norm": 0.5}}


def test_dp_run_reports_epsilon_every_round_and_resumes_its_accountant_exactly(ray_session, tmp_path):
    whole = run(cfg_for(privacy=DP), tmp_path / "whole")
    rows = whole.run_dir.metrics()
    eps = [r["privacy/epsilon"] for r in rows if r["round"] >= 1]
    assert len(eps) == 4 and all(a < b for a, b in zip(eps, eps[1:], strict=False))
    # The library's ε for 4 Poisson-sampled Gaussian rounds (q = 4/8, σ = 1.2).
    assert eps[-1] == pytest.approx(epsilon([round_event(0.5, 1.2, None)] * 4, 1e-5), rel=1e-12)
    assert whole.summary["privacy"]["epsilon"] == eps[-1]
    # Interrupted after 2 rounds, then resumed to 4: the same model and the same ε.
    half = run(cfg_for(rounds=2, privacy=DP), tmp_path / "half")
    assert half.summary["privacy"]["epsilon"] == eps[1]
    resumed = run(resume_config(half.run_dir.path, ["federation.rounds=4"]), half.run_dir.path, resume=True)
    assert resumed.summary["privacy"]["epsilon"] == eps[-1]
    a = whole.run_dir.load_checkpoint(4)["global_weights"]
    b = resumed.run_dir.load_checkpoint(4)["global_weights"]
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


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
