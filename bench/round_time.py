"""Federated RLHF round time, throughput, memory and engine overhead on MovieLens.

How to run:
    python bench/round_time.py [--data ../shared/data/ml-latest-small] [--out bench/results]
    python bench/round_time.py --only 50   # one K
    python bench/round_time.py --only 5 --rounds 1 --workers 1   # a quick check that it runs

For K ∈ {5, 50, 610 (every ml-latest-small user, 10% sampled per round)} and W ∈ {1, 2}
client actors it runs ``tune_configs/movielens_paper.yaml`` (one user per client, RLlib PPO
RLHF) through the experiment lifecycle (``run_experiment``, as ``fedrlhf run`` does, with
MLflow off: ``bench/tracking_overhead.py`` measures that) and reports:
  * setup seconds (Ray actors, RLlib builds, data, and the round-0 evaluation of every client
    that every run starts with) and seconds per round;
  * client-rounds per second;
  * overhead: the fraction of the training phase's actor time not spent in clients' local
    rounds (driver, serialization, scheduling, swapping virtual clients): 1 − Σ local seconds
    / (W × training-phase seconds);
  * the rest of a round's seconds: evaluation of every client (held-out), aggregation, metrics
    files and the driver's checkpoint (the clients' records are saved by the client actors in
    their training phase);
  * the client store's size per client (its latest record) and the driver's checkpoint size;
  * peak RSS of all Ray processes plus this driver (sampled every 0.25 s).
Targets on 2 cores: K=50 × 5 rounds end to end ≤ 3 min; K=610 in ≤ 4 GB; overhead ≤ 10%.
Prints a table and writes ``round_time.json``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import tempfile
import threading
import time
from pathlib import Path

import psutil
import ray
from rich.console import Console
from rich.table import Table

from fedrlhf_ray.client_store import ClientStore
from fedrlhf_ray.config import load_config
from fedrlhf_ray.experiment import Progress, run_experiment

ROOT = Path(__file__).resolve().parents[1]


class PeakRSS:
    """Peak summed RSS of this process and every Ray process, sampled in a thread."""

    def __init__(self, interval: float = 0.25) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        total = psutil.Process().memory_info().rss
        for proc in psutil.process_iter(["name", "cmdline", "memory_info"]):
            try:
                cmd = " ".join(proc.info["cmdline"] or [])
                name = proc.info["name"] or ""
                if proc.pid != os.getpid() and ("ray::" in cmd or "ray/" in cmd or name.startswith(("raylet", "gcs_server"))):
                    total += proc.info["memory_info"].rss
            except (psutil.NoSuchProcess, psutil.AccessDenied, TypeError):
                continue
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def run_case(data: str, k: int, workers: int, rounds: int) -> dict:
    overrides = [
        f"env.data.path={data}",
        f"clients.num_clients={k}",
        f"ray.num_workers={workers}",
        f"federation.rounds={rounds}",
        "tracking.enabled=false",
    ]
    if k > 50:
        overrides += ["env.data.min_ratings=20", "federation.clients_per_round=0.1"]
    cfg = load_config(ROOT / "tune_configs" / "movielens_paper.yaml", overrides)
    ray.init(num_cpus=2, object_store_memory=512 * 1024**2, include_dashboard=False,
             log_to_driver=False, logging_level="ERROR")
    marks: list[float] = []  # when the run started its rounds, then the end of each round
    rows: list[dict] = []

    def on_start(p: Progress) -> None:
        marks.append(time.perf_counter())

    def on_round(p: Progress) -> None:  # after the round's rows were appended and checkpointed
        marks.append(time.perf_counter())
        rows.append(p.metrics)

    try:
        with PeakRSS() as mem, tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            result = run_experiment(cfg, run_dir=Path(tmp) / "run", on_start=on_start, on_round=on_round)
            total = time.perf_counter() - start
            rd = result.run_dir
            store = ClientStore(rd / "clients")
            sizes = [(rd / "clients" / f"client-{c:06d}" / f"round-{v[0]:06d}.npz").stat().st_size
                     for c in range(k) if (v := store.versions(c))]
            checkpoint_bytes = rd.checkpoint_path(rd.checkpoint_rounds()[0]).stat().st_size
    finally:
        ray.shutdown()
    setup = marks[0] - start
    walls = [b - a for a, b in itertools.pairwise(marks)]
    train = [r["fed/train_seconds"] for r in rows]
    local = [r["train/seconds/mean"] * r["fed/clients_aggregated"] for r in rows]
    # Evaluation dominates; aggregation, metrics files and the driver's checkpoint are included.
    eval_s = [w - r["fed/train_seconds"] for w, r in zip(walls, rows, strict=True)]
    client_rounds = sum(r["fed/clients_aggregated"] for r in rows)
    overhead = 1.0 - sum(local) / (workers * sum(train))
    return {
        "K": k,
        "W": workers,
        "rounds": rounds,
        "clients_per_round": rows[0]["fed/clients_sampled"],
        "setup_s": setup,
        "train_s_per_round": sum(train) / rounds,
        "eval_s_per_round": sum(eval_s) / rounds,
        "round_s": sum(walls) / rounds,
        "end_to_end_s": total,
        "client_rounds_per_s": client_rounds / sum(train),
        "overhead_fraction": overhead,
        "peak_rss_gb": mem.peak / 1024**3,
        "final_liked_hit_rate": result.final.get("eval/liked_hit_rate/mean"),
        "record_bytes_per_client": sum(sizes) / max(1, len(sizes)),
        "store_save_ms_mean": sum(r["store/save_ms/mean"] for r in rows) / rounds,
        "checkpoint_bytes": checkpoint_bytes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "ml-latest-small"))
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--only", type=int, choices=(5, 50, 610))
    parser.add_argument("--rounds", type=int, help="rounds of every case (default: 5, 5 and 3)")
    parser.add_argument("--workers", type=int, nargs="+", choices=(1, 2), default=[1, 2], help="client actors W")
    args = parser.parse_args()
    if args.rounds is not None and args.rounds < 1:
        parser.error("--rounds must be >= 1")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    plan = [(5, 5), (50, 5), (610, 3)]
    results = []
    for k, planned in plan:
        if args.only and k != args.only:
            continue
        for workers in args.workers:
            results.append(run_case(args.data, k, workers, args.rounds or planned))
            print(json.dumps(results[-1]))

    table = Table(title="round_time: MovieLens ml-latest-small, one user per client, 2 cores")
    cols = ("K", "W", "per round", "setup s", "train s/round", "eval+persist s/round", "end-to-end s",
            "client-rounds/s", "overhead", "peak RSS GB", "record KiB", "ckpt KiB", "liked-hit")
    for col in cols:
        table.add_column(col, justify="right")
    for r in results:
        table.add_row(
            str(r["K"]), str(r["W"]), str(int(r["clients_per_round"])), f"{r['setup_s']:.1f}",
            f"{r['train_s_per_round']:.1f}", f"{r['eval_s_per_round']:.1f}", f"{r['end_to_end_s']:.0f}",
            f"{r['client_rounds_per_s']:.2f}", f"{r['overhead_fraction']:.1%}", f"{r['peak_rss_gb']:.2f}",
            f"{r['record_bytes_per_client'] / 1024:.0f}", f"{r['checkpoint_bytes'] / 1024:.0f}",
            f"{r['final_liked_hit_rate']:.3f}",
        )
    Console(width=200).print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "round_time.json").write_text(json.dumps(
        {"machine": {"python": platform.python_version(), "cpus": os.cpu_count()}, "results": results},
        indent=2,
    ))
    print(f"wrote {out / 'round_time.json'}")


if __name__ == "__main__":
    main()
