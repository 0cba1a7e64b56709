"""Utility against ε and what the server can infer, on the paper's MovieLens setting.

How to run:  RAY_AUTH_MODE=disabled python bench/privacy_utility.py [--data ../shared/data/ml-latest-small]
             [--epsilons 8 4 1] [--out bench/results]
Starts a local Ray (2 CPUs), prints two tables and writes ``privacy_utility.json``.

``tune_configs/movielens_paper.yaml`` (ml-latest-small, K = 50 clients of one user, 5 rounds,
every client every round, seed 0), embedding rows averaged densely (``federation.sparse_rows:
false``, as DP and secure aggregation average):

1. **clip norm**: one plain audited round gives every client's update norm; C is their median
   (a non-private pilot: a deployment would use adaptive clipping or a public proxy task);
2. **σ for each ε**: the smallest noise multiplier whose 5 rounds (q = 1) spend at most ε at
   δ = 1e-5, by bisection on ``dp_accounting``'s RDP accountant;
3. **utility**: a full 5-round run per ε (central DP-FedAvg; distributed noise under secure
   aggregation has the same distribution) and without DP (ε = ∞): held-out liked-hit rate
   (mean, worst decile), NDCG@10 and Spearman ρ after round 5;
4. **leakage**: ``fedrlhf audit``'s attack after round 1 for plain FedAvg, secure aggregation,
   central DP and distributed DP under secure aggregation at each ε: membership AUC of each
   client's rated movies from the update the driver holds and from the released model.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, ClassVar

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import numpy as np  # noqa: E402
import ray  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from fedrlhf_ray.config import load_config  # noqa: E402
from fedrlhf_ray.experiment import run_experiment  # noqa: E402
from fedrlhf_ray.leakage_audit import AuditedDriver  # noqa: E402
from fedrlhf_ray.local_trainer import ClientUpdate  # noqa: E402
from fedrlhf_ray.privacy.dp import epsilon, round_event  # noqa: E402
from fedrlhf_ray.strategies import delta_norms  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ROUNDS, DELTA = 5, 1e-5


class NormAuditDriver(AuditedDriver):
    """The audit's driver, also keeping the norm of every plain update it receives."""

    norms: ClassVar[list[float]] = []

    def run_round(self) -> tuple[dict[str, float], list[dict[str, Any]]]:
        before = dict(self.global_weights)
        out = super().run_round()
        plain = [u.weights for u in self._round_updates if isinstance(u, ClientUpdate)]
        if plain:
            shared = {k: before[k] for k in plain[0]}
            NormAuditDriver.norms.extend(float(n) for n in delta_norms(shared, plain))
        return out


def sigma_for(target: float) -> float:
    """The smallest σ (to 0.1 %) whose ROUNDS rounds at q = 1 spend at most ``target``."""
    low, high = 0.05, 100.0
    while high / low > 1.001:
        mid = (low * high) ** 0.5
        low, high = (low, mid) if epsilon([round_event(1.0, mid, None)] * ROUNDS, DELTA) <= target else (mid, high)
    return high


def config(data: Path, *sets: str):
    base = [f"env.data.path={data}", "tracking.enabled=false", "federation.sparse_rows=false"]
    return load_config(ROOT / "tune_configs" / "movielens_paper.yaml", [*base, *sets])


def dp_sets(sigma: float, clip: float, distributed: bool = False) -> list[str]:
    sets = ["privacy.dp.enabled=true", f"privacy.dp.noise_multiplier={sigma}", f"privacy.dp.clip_norm={clip}",
            f"privacy.dp.delta={DELTA}"]
    return sets + (["privacy.dp.mode=distributed", "privacy.secure_aggregation=true"] if distributed else [])


def audit(data: Path, tmp: Path, name: str, *sets: str) -> dict[str, Any]:
    result = run_experiment(config(data, "federation.rounds=1", *sets), run_dir=tmp / f"audit-{name}",
                            driver_cls=NormAuditDriver)
    m = result.run_dir.round_metrics(1)
    return {"setting": name, "update_auc": m["audit/update/auc/mean"], "release_auc": m["audit/release/auc/mean"],
            "epsilon_1_round": m.get("privacy/epsilon")}


def utility(data: Path, tmp: Path, name: str, *sets: str) -> dict[str, Any]:
    start = time.perf_counter()
    result = run_experiment(config(data, *sets), run_dir=tmp / f"run-{name}")
    f = result.final
    return {
        "setting": name, "epsilon": result.summary.get("privacy", {}).get("epsilon", float("inf")),
        "liked_hit": f["eval/liked_hit_rate/mean"], "liked_hit_worst_decile": f["eval/liked_hit_rate/worst_decile"],
        "ndcg": f["eval/ndcg/mean"], "spearman": f["eval/spearman/mean"], "random": f["eval/random_hit_rate/mean"],
        "oracle": f["eval/oracle_hit_rate/mean"], "wall_s": time.perf_counter() - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "ml-latest-small")
    parser.add_argument("--epsilons", type=float, nargs="*", default=[8.0, 4.0, 1.0])
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=512 * 1024**2, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory(prefix="privacy_utility_") as tmp_name:
            tmp = Path(tmp_name)
            audits = [audit(args.data, tmp, "plain")]
            clip = float(np.median(NormAuditDriver.norms))
            sigmas = {eps: sigma_for(eps) for eps in args.epsilons}
            audits.append(audit(args.data, tmp, "secure aggregation", "privacy.secure_aggregation=true"))
            for eps, sigma in sigmas.items():
                audits.append(audit(args.data, tmp, f"central DP ε={eps:g}", *dp_sets(sigma, clip)))
                audits.append(audit(args.data, tmp, f"distributed DP + SecAgg ε={eps:g}", *dp_sets(sigma, clip, True)))
            runs = [utility(args.data, tmp, "no DP (ε = ∞)")]
            runs += [utility(args.data, tmp, f"central DP ε={eps:g}", *dp_sets(s, clip)) for eps, s in sigmas.items()]
    finally:
        ray.shutdown()
    for r, eps in zip(runs[1:], sigmas, strict=True):
        r["sigma"] = sigmas[eps]
    console = Console(width=140)
    table = Table(title=f"utility against ε: MovieLens K=50, {ROUNDS} rounds, δ={DELTA:g}, C={clip:.3g} (median update norm)")
    for col in ("setting", "σ", "ε", "liked-hit (worst decile)", "NDCG@10", "Spearman ρ", "wall s"):
        table.add_column(col, justify="left" if col == "setting" else "right")
    for r in runs:
        table.add_row(r["setting"], f"{r.get('sigma', 0.0):.3g}" if "sigma" in r else "—", f"{r['epsilon']:.3g}",
                      f"{r['liked_hit']:.3f} ({r['liked_hit_worst_decile']:.3f})", f"{r['ndcg']:.3f}",
                      f"{r['spearman']:.3f}", f"{r['wall_s']:.0f}")
    console.print(table)
    console.print(f"random {runs[0]['random']:.3f} · oracle {runs[0]['oracle']:.3f}")
    table = Table(title="what the server infers after round 1: membership AUC of each client's rated movies (mean of 50)")
    for col in ("setting", "from the update it holds", "from the released model"):
        table.add_column(col, justify="left" if col == "setting" else "right")
    for a in audits:
        table.add_row(a["setting"], f"{a['update_auc']:.3f}", f"{a['release_auc']:.3f}")
    console.print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "ray": ray.__version__},
        "clip_norm": clip, "update_norms": {"median": clip, "p10": float(np.percentile(NormAuditDriver.norms, 10)),
                                            "p90": float(np.percentile(NormAuditDriver.norms, 90)),
                                            "mean": statistics.fmean(NormAuditDriver.norms)},
        "sigmas": {str(k): v for k, v in sigmas.items()}, "runs": runs, "audits": audits, "unix_time": time.time(),
    }
    (out / "privacy_utility.json").write_text(json.dumps(record, indent=2) + "\n")
    console.print(f"wrote {out / 'privacy_utility.json'}")


if __name__ == "__main__":
    main()
