"""What privacy costs a round: secure aggregation and DP against plain FedAvg.

How to run:  RAY_AUTH_MODE=disabled python bench/privacy_overhead.py [--rounds 4] [--out bench/results]
             [--mlp-clients 5 50 200] [--rlhf-clients 5 50] [--modes plain secagg-hbc secagg dp dp+secagg]
Starts a local Ray (2 CPUs, no dashboard), prints a table and writes ``privacy_overhead.json``.

Configurations, each a real run of the lifecycle (client actors, driver, client store):

* ``plain``: FedAvg with dense rows (``federation.sparse_rows: false``, what secure aggregation
  computes, so the three move the same model);
* ``secagg-hbc``: ``privacy.secure_aggregation: true`` against an honest-but-curious server
  (``privacy.secagg_adversary: honest_but_curious``; default SecAgg+ neighbour count);
* ``secagg``: the default, against a malicious server: key advertisements signed with the
  clients' Ed25519 identities and checked against the registry, and the consistency round
  (every survivor signs the survivor set; each checks its neighbours' signatures);
* ``dp``: central DP-FedAvg (σ = 1, C = 1; clipping and noise on the driver);
* ``dp+secagg``: distributed DP under secure aggregation (each client clips and adds its share
  of the noise from its own secret, then masks).

Trainers: the MLP trainer of ``bench/engine_overhead.py`` (50 clients' worth of tiny SGD: the
protocol's own cost shows), and the RLHF trainer on the synthetic world of
``tune_configs/quickstart.yaml`` (1 PPO iteration per round: a real policy's parameter count).
Every client takes part in every round; W = 2 client actors. Seconds per round are the mean of
rounds 2..R−1 (round 1 warms up, round R also evaluates). "uplink bytes / client" is the pickled size of everything the driver receives from
the client actors in a round (updates, or keys + sealed shares + masked vector + revealed shares)
divided by the clients; "expansion" is that over the plain run's, next to the 1.73× Bonawitz et
al. report for 2^10 clients and 2^16-value vectors of 16-bit values (their Table 2): here values
are 64-bit ring elements against float32, so the vector alone doubles.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, ClassVar

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import ray  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from fedrlhf_ray.config import load_config, validate_config  # noqa: E402
from fedrlhf_ray.driver import FederatedDriver  # noqa: E402
from fedrlhf_ray.experiment import run_experiment  # noqa: E402
from fedrlhf_ray.torch_trainer import mlp_trainer_factory  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODES: dict[str, dict[str, Any]] = {
    "plain": {},
    "secagg-hbc": {"privacy": {"secure_aggregation": True, "secagg_adversary": "honest_but_curious"}},
    "secagg": {"privacy": {"secure_aggregation": True}},
    "dp": {"privacy": {"dp": {"enabled": True, "noise_multiplier": 1.0, "clip_norm": 1.0}}},
    "dp+secagg": {"privacy": {"secure_aggregation": True,
                              "dp": {"enabled": True, "noise_multiplier": 1.0, "clip_norm": 1.0, "mode": "distributed"}}},
}


class CountingDriver(FederatedDriver):
    """Counts the pickled bytes of everything received from client actors, per round."""

    received_bytes: ClassVar[dict[int, int]] = {}

    def _received(self, obj: Any) -> Any:
        rnd = getattr(self, "round", 0) + 1  # the initial weights arrive before round 1
        CountingDriver.received_bytes[rnd] = CountingDriver.received_bytes.get(rnd, 0) + len(
            pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        )
        return super()._received(obj)


def merged(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = merged(out.get(k, {}), v) if isinstance(v, dict) else v
    return out


def mlp_config(k: int, rounds: int, mode: str):
    raw = {
        "seed": 0,
        "clients": {"num_clients": k},
        "federation": {"rounds": rounds, "clients_per_round": 1.0, "sparse_rows": False},
        "evaluation": {"every_n_rounds": 1000},
        "ray": {"num_workers": 2},
        "tracking": {"enabled": False},
    }
    return validate_config(merged(raw, MODES[mode]))


def rlhf_config(k: int, rounds: int, mode: str):
    sets = [
        f"clients.num_clients={k}", f"federation.rounds={rounds}", "federation.sparse_rows=false",
        "ppo.local_iterations=1", "evaluation.every_n_rounds=1000", "tracking.enabled=false", "ray.num_workers=2",
    ]
    cfg = load_config(ROOT / "tune_configs" / "quickstart.yaml", sets)
    return validate_config(merged(cfg.to_dict(), MODES[mode]))


def measure(trainer: str, k: int, rounds: int, mode: str, tmp: Path) -> dict[str, Any]:
    CountingDriver.received_bytes = {}
    cfg = (mlp_config if trainer == "mlp" else rlhf_config)(k, rounds, mode)
    factory = mlp_trainer_factory(k, seed=0) if trainer == "mlp" else None
    start = time.perf_counter()
    result = run_experiment(cfg, run_dir=tmp / f"{trainer}-{k}-{mode}", trainer_factory=factory,
                            driver_cls=CountingDriver, in_process_driver=True)  # the counts stay here
    wall = time.perf_counter() - start
    # Rounds 2..R-1: round 1 warms up, the last one also evaluates.
    rows = [r for r in result.run_dir.metrics() if 2 <= r["round"] < rounds]
    per_round = statistics.fmean(r["fed/round_seconds"] for r in rows)
    uplink = statistics.fmean(CountingDriver.received_bytes[int(r["round"])] for r in rows) / k
    return {"trainer": trainer, "clients": k, "mode": mode, "seconds_per_round": per_round,
            "uplink_bytes_per_client": uplink, "wall_s": wall,
            "epsilon": rows[-1].get("privacy/epsilon"), "neighbours": rows[-1].get("secagg/neighbours")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--mlp-clients", type=int, nargs="*", default=[5, 50, 200])
    parser.add_argument("--rlhf-clients", type=int, nargs="*", default=[5, 50])
    parser.add_argument("--modes", nargs="*", choices=list(MODES), default=list(MODES))
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    if "plain" not in args.modes:
        parser.error("--modes must include plain (the other modes are reported against it)")
    if args.rounds < 3:
        parser.error("--rounds must be at least 3 (round 1 warms up, the last one evaluates)")
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=256 * 1024**2, log_to_driver=False)
    rows = []
    try:
        with tempfile.TemporaryDirectory(prefix="privacy_bench_") as tmp:
            for trainer, ks in (("mlp", args.mlp_clients), ("rlhf", args.rlhf_clients)):
                for k in ks:
                    for mode in args.modes:
                        rows.append(measure(trainer, k, args.rounds, mode, Path(tmp)))
    finally:
        ray.shutdown()
    base = {(r["trainer"], r["clients"]): r for r in rows if r["mode"] == "plain"}
    for r in rows:
        b = base[(r["trainer"], r["clients"])]
        r["time_ratio"] = r["seconds_per_round"] / b["seconds_per_round"]
        r["byte_expansion"] = r["uplink_bytes_per_client"] / b["uplink_bytes_per_client"]

    table = Table(title=f"privacy overhead, rounds 2–{args.rounds - 1}, every client every round, W = 2")
    for col in ("trainer", "K", "mode", "s/round", "× plain", "uplink bytes / client", "expansion", "d", "ε"):
        table.add_column(col, justify="left" if col in ("trainer", "mode") else "right")
    for r in rows:
        table.add_row(
            r["trainer"], str(r["clients"]), r["mode"], f"{r['seconds_per_round']:.3f}", f"{r['time_ratio']:.2f}",
            f"{r['uplink_bytes_per_client']:,.0f}", f"{r['byte_expansion']:.2f}",
            "" if r["neighbours"] is None else f"{r['neighbours']:.0f}",
            "" if r["epsilon"] is None else f"{r['epsilon']:.2f}",
        )
    console = Console(width=140)
    console.print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
                    "ray": ray.__version__},
        "rounds": args.rounds,
        "rows": rows,
        "unix_time": time.time(),
    }
    (out / "privacy_overhead.json").write_text(json.dumps(record, indent=2) + "\n")
    console.print(f"wrote {out / 'privacy_overhead.json'}")


if __name__ == "__main__":
    main()
