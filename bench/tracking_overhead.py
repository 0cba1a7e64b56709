"""What MLflow tracking costs the driver per round, by number of clients, store and per-client series.

How to run:  python bench/tracking_overhead.py [--clients 5 50 200] [--rounds 5] [--no-server] [--out bench/results]
Prints a table and writes ``tracking_overhead.json`` (machine info, per-configuration numbers,
per-round times).

Workload: the metric rows of a real round. The bench first runs a 2-client, 1-round
``fedrlhf run`` of the quickstart experiment with tracking off. It then replays that round's
global row, and the client rows of its 2 clients copied to K client ids, through
``RunTracker.log_round``, the call the driver makes once per round. Each configuration is a
fresh MLflow run. It is timed over ``--rounds`` rounds, after one round that is not counted
(the first request opens the store's connection). Stores: the embedded SQLite default, and
an ``mlflow server`` on loopback (SQLite behind it, one worker, as in the tests and on
``cluster.yaml``'s head), left out with ``--no-server``.

Columns: K clients; per-client series (``client/<id>/...``) on or off; metrics logged and
requests made per round (MLflow takes ≤ 1000 metrics a request); milliseconds per round (mean
and max); ms per 1000 metrics.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from fedrlhf_ray.config import load_config
from fedrlhf_ray.rundir import RunDir
from fedrlhf_ray.tracking import MAX_METRICS_PER_BATCH, round_metrics, start_run

ROOT = Path(__file__).resolve().parents[1]

QUICKSTART = ROOT / "tune_configs" / "quickstart.yaml"
SOURCE_RUN = [
    "clients.num_clients=2", "ray.num_workers=1", "ppo.train_batch_size=400", "ppo.minibatch_size=200",
    "ppo.local_iterations=1", "evaluation.episodes_per_user=1", "federation.rounds=1", "tracking.enabled=false",
]


def real_round(work: Path) -> tuple[dict, list[dict]]:
    """Round 1's global row and client rows from a real (tiny) federated run."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    sets = [a for s in SOURCE_RUN for a in ("--set", s)]
    subprocess.run([sys.executable, "-m", "fedrlhf_ray.cli", "run", str(QUICKSTART), *sets, "--out", str(work / "runs")],
                   cwd=work, env=env, check=True, capture_output=True, text=True)
    (run_dir,) = (work / "runs").iterdir()
    rd = RunDir(run_dir)
    return next(r for r in rd.metrics() if r["round"] == 1), [r for r in rd.client_metrics() if r["round"] == 1]


def scaled(client_rows: list[dict], num_clients: int) -> list[dict]:
    """The source clients' rows, copied round-robin to client ids 0..K-1."""
    ids = sorted({r["client"] for r in client_rows})
    return [{**row, "client": k} for k in range(num_clients) for row in client_rows if row["client"] == ids[k % len(ids)]]


def start_server(root: Path) -> tuple[subprocess.Popen, str]:
    import socket
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
         "--artifacts-destination", str(root / "server-artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(uri + "/health", timeout=5):
                return proc, uri
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"mlflow server did not start at {uri}")


def measure(uri: str, work: Path, label: str, num_clients: int, per_client: bool, rounds: int,
            metrics: dict, client_rows: list[dict]) -> dict:
    cfg = load_config(QUICKSTART, [f"tracking.experiment=bench-{label}", f"tracking.per_client={per_client}"])
    run_dir = work / f"{label}-{num_clients}-{per_client}"
    run_dir.mkdir()
    tracker = start_run(cfg, run_dir, uri)
    rows = scaled(client_rows, num_clients)
    count = len(round_metrics(metrics, rows, per_client))
    times = []
    for r in range(rounds + 1):
        start = time.perf_counter()
        tracker.log_round(r, {**metrics, "round": r}, [{**row, "round": r} for row in rows])
        if r:  # round 0 opens the store's connection
            times.append(time.perf_counter() - start)
    tracker.finish("FINISHED")
    mean_ms = 1000 * statistics.mean(times)
    return {
        "store": label, "clients": num_clients, "per_client": per_client, "metrics_per_round": count,
        "requests_per_round": math.ceil(count / MAX_METRICS_PER_BATCH), "ms_per_round_mean": mean_ms,
        "ms_per_round_max": 1000 * max(times), "ms_per_1000_metrics": 1000 * mean_ms / count,
        "round_seconds": times,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[5, 50, 200])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-server", action="store_true", help="only the embedded SQLite store")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args()

    console = Console()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        console.print("a real round: 2-client quickstart run, 1 round ...")
        metrics, client_rows = real_round(work)
        stores = {"sqlite": f"sqlite:///{work / 'mlflow.db'}"}
        server = None
        if not args.no_server:
            server, stores["server"] = start_server(work)
        try:
            results = [
                measure(uri, work, label, k, per_client, args.rounds, metrics, client_rows)
                for label, uri in stores.items() for k in args.clients for per_client in (False, True)
            ]
        finally:
            if server is not None:
                server.terminate()
                server.wait(timeout=30)

    table = Table(title=f"MLflow tracking per round (RunTracker.log_round), mean of {args.rounds} rounds")
    for col in ("store", "K", "per-client", "metrics", "requests", "ms/round", "max ms", "ms/1k metrics"):
        table.add_column(col, justify="left" if col == "store" else "right")
    for r in results:
        table.add_row(r["store"], str(r["clients"]), "yes" if r["per_client"] else "no", str(r["metrics_per_round"]),
                      str(r["requests_per_round"]), f"{r['ms_per_round_mean']:.1f}", f"{r['ms_per_round_max']:.1f}",
                      f"{r['ms_per_1000_metrics']:.1f}")
    console.print(table)

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "python": platform.python_version()},
        "rounds": args.rounds,
        "results": results,
    }
    path = out_dir / "tracking_overhead.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
