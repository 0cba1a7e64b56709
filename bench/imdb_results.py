"""The README's IMDb results: per-client λ, sentiment and fluency for federated, centralized and
local runs of ``tune_configs/imdb_small.yaml``, as a table (and JSON) and one plot.

How to run (each run ~6–9 min on 2 cores once `fedrlhf prepare imdb` is cached):
    fedrlhf run tune_configs/imdb_small.yaml --set env.imdb.path=DATA --out runs/imdb
    fedrlhf run tune_configs/imdb_small.yaml --set env.imdb.path=DATA --out runs/imdb \\
        --set federation.baseline=centralized --set federation.personalization=none
    fedrlhf run tune_configs/imdb_small.yaml --set env.imdb.path=DATA --out runs/imdb \\
        --set federation.baseline=local --set federation.personalization=none
    python bench/imdb_results.py federated=RUN_DIR centralized=RUN_DIR local=RUN_DIR [--plot docs/imdb_results.png]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from rich.console import Console
from rich.table import Table

from fedrlhf_ray.config import load_config
from fedrlhf_ray.rundir import CONFIG, RunDir

ROOT = Path(__file__).resolve().parents[1]
KEYS = ("sentiment_independent", "sentiment", "fluency", "reward", "kl_to_reference", "distinct_2")


def per_client(run_dir: Path) -> tuple[list[float], dict[int, dict[str, float]], list[dict]]:
    rd = RunDir(run_dir)
    cfg = load_config(run_dir / CONFIG)
    rows = [r for r in rd.client_metrics() if r["kind"] == "eval"]
    last = max(r["round"] for r in rows)
    final = {r["client"]: {k: r[f"eval/{k}"] for k in KEYS} for r in rows if r["round"] == last}
    first = {r["client"]: r for r in rows if r["round"] == 0}
    for c, m in final.items():
        m["sentiment_independent_round0"] = first[c]["eval/sentiment_independent"]
        m["fluency_round0"] = first[c]["eval/fluency"]
    return cfg.client_lambdas(), final, rd.metrics()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="LABEL=RUN_DIR")
    parser.add_argument("--plot", default=str(ROOT / "docs" / "imdb_results.png"))
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "imdb_results.json"))
    args = parser.parse_args()
    runs = dict(item.split("=", 1) for item in args.runs)
    table = Table(title="IMDb, K = 5: held-out prompts after the last round (round 0 in brackets)")
    for col in ("run", "client", "λ", "sentiment (independent)", "sentiment (own RM)", "fluency", "reward", "KL",
                "distinct-2"):
        table.add_column(col, justify="left" if col == "run" else "right")
    out: dict[str, dict] = {}
    fig, (curves, scatter) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, path in runs.items():
        lams, final, metrics = per_client(Path(path))
        out[label] = {"lambdas": lams, "clients": final}
        for c in sorted(final):
            m = final[c]
            table.add_row(label, str(c), f"{lams[c]:.1f}",
                          f"{m['sentiment_independent']:.3f} ({m['sentiment_independent_round0']:.3f})",
                          f"{m['sentiment']:.3f}", f"{m['fluency']:.3f} ({m['fluency_round0']:.3f})",
                          f"{m['reward']:.3f}", f"{m['kl_to_reference']:.1f}", f"{m['distinct_2']:.3f}")
        rounds = [r["round"] for r in metrics if "eval/sentiment_independent/mean" in r]
        line = curves.plot(rounds, [r["eval/sentiment_independent/mean"] for r in metrics
                                    if "eval/sentiment_independent/mean" in r], label=f"{label}: sentiment")[0]
        curves.plot(rounds, [r["eval/fluency/mean"] for r in metrics if "eval/fluency/mean" in r], "--",
                    color=line.get_color(), label=f"{label}: fluency")
        scatter.scatter([final[c]["fluency"] for c in sorted(final)],
                        [final[c]["sentiment_independent"] for c in sorted(final)], color=line.get_color(), label=label)
        for c in sorted(final):
            scatter.annotate(f"λ={lams[c]:.1f}", (final[c]["fluency"], final[c]["sentiment_independent"]), fontsize=7)
    curves.set(xlabel="round", ylabel="mean over clients", title="sentiment (independent judge) and fluency")
    curves.legend(fontsize=7)
    scatter.set(xlabel="fluency (1 − NLL/ln V)", ylabel="sentiment (independent judge)",
                title="each client after the last round")
    scatter.legend(fontsize=7)
    fig.tight_layout()
    Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.plot, dpi=110)
    Console().print(table)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
