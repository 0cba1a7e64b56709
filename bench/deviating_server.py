"""What a server learns of each client when it deviates, in each privacy mode.

How to run:  RAY_AUTH_MODE=disabled python bench/deviating_server.py [--data ../shared/data/ml-latest-small]
             [--clients 6] [--modes plain secagg-hbc secagg dp dp+secagg] [--out bench/results]
Starts a local Ray (2 CPUs, no dashboard), prints a table and writes ``deviating_server.json``.

Each cell is one run of ``fedrlhf audit tune_configs/movielens_paper.yaml --set
clients.num_clients=6 [mode] [--deviate ATTACK]`` (1 round, the run's own client actors):
the mean over clients of the membership attack's ROC AUC on each client's rated items (0.5 is
chance), from what the server learned of that client's own update — passively (``passive``:
the update as it arrived, a masked vector read as weights under secure aggregation), or by
the deviation of its row (``privacy.deviations``). "refused" means a client refused the lie
in one line and the round was spent with nothing of it used; for the crafted evaluation a
number is how many clients' held-out metrics of the driver's own model came back in the clear.

Modes: ``plain`` (FedAvg); ``secagg-hbc`` and ``secagg`` (secure aggregation against an
honest-but-curious and a malicious server); ``dp`` (central DP-FedAvg, σ = 1, C = 1: its
server is trusted with the updates); ``dp+secagg`` (distributed DP under secure aggregation).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import ray  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from fedrlhf_ray.config import load_config, validate_config  # noqa: E402
from fedrlhf_ray.experiment import run_experiment  # noqa: E402
from fedrlhf_ray.leakage_audit import audit_driver  # noqa: E402
from fedrlhf_ray.privacy import DEVIATIONS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DP = {"enabled": True, "noise_multiplier": 1.0, "clip_norm": 1.0}
MODES: dict[str, list[str]] = {
    "plain": [],
    "secagg-hbc": ["privacy.secure_aggregation=true", "privacy.secagg_adversary=honest_but_curious"],
    "secagg": ["privacy.secure_aggregation=true"],
    "dp": [f"privacy.dp.{k}={str(v).lower()}" for k, v in DP.items()],
    "dp+secagg": ["privacy.secure_aggregation=true", "privacy.dp.mode=distributed",
                  *(f"privacy.dp.{k}={str(v).lower()}" for k, v in DP.items())],
}


def cell(data: str, clients: int, mode: str, attack: str | None, tmp: Path) -> dict[str, Any]:
    sets = [f"env.data.path={data}", f"clients.num_clients={clients}", "federation.rounds=1",
            "tracking.enabled=false", *MODES[mode]]
    cfg = validate_config(load_config(ROOT / "tune_configs" / "movielens_paper.yaml", sets).to_dict())
    result = run_experiment(cfg, run_dir=tmp / f"{mode}-{attack or 'passive'}", driver_cls=audit_driver(attack))
    m = result.run_dir.round_metrics(1)
    if attack is None:
        return {"mode": mode, "attack": "passive", "refused": False, "auc": m["audit/update/auc/mean"],
                "clients": clients, "evaluations": 0}
    return {
        "mode": mode, "attack": attack, "refused": m["audit/deviation/refused"] > 0,
        "auc": m["audit/deviation/auc/mean"], "clients": int(m["audit/deviation/clients"]),
        "evaluations": int(m["audit/deviation/evaluations"]),
    }


def shown(row: dict[str, Any]) -> str:
    if row["refused"]:
        return "refused"
    if row["attack"] == "crafted-evaluation":
        return f"{row['evaluations']} clients' metrics"
    return f"{row['auc']:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "ml-latest-small"))
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--modes", nargs="*", choices=list(MODES), default=list(MODES))
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=256 * 1024**2, log_to_driver=False)
    rows = []
    try:
        with tempfile.TemporaryDirectory(prefix="deviating_bench_") as tmp:
            for mode in args.modes:
                for attack in (None, *DEVIATIONS):
                    rows.append(cell(args.data, args.clients, mode, attack, Path(tmp)))
    finally:
        ray.shutdown()
    by = {(r["mode"], r["attack"]): r for r in rows}
    table = Table(title=f"membership AUC of each client's rated items from what the server learns of its update "
                  f"(MovieLens, K = {args.clients}, 1 round; 0.5 = chance)")
    table.add_column("server")
    for mode in args.modes:
        table.add_column(mode, justify="right")
    for attack in ("passive", *DEVIATIONS):
        table.add_row(attack, *(shown(by[(mode, attack)]) for mode in args.modes))
    console = Console(width=140)
    console.print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
                    "ray": ray.__version__},
        "clients": args.clients,
        "rows": rows,
        "unix_time": time.time(),
    }
    (out / "deviating_server.json").write_text(json.dumps(record, indent=2) + "\n")
    console.print(f"wrote {out / 'deviating_server.json'}")


if __name__ == "__main__":
    main()
