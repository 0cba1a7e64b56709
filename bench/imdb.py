"""The IMDb task on CPU: generation speed, PPO speed, round time of imdb_small, memory.

How to run (the models are prepared first if they are not cached, see `fedrlhf prepare imdb`):
    python bench/imdb.py [--config tune_configs/imdb_small.yaml] [--set env.imdb.path=DIR] [--out bench/results]
    python bench/imdb.py --rounds 1      # a quick check that it runs

Measures, with the config's LM and PPO settings:
  * generation tokens/s: the policy LM sampling continuations of 32 held-out prompts (batch 32,
    no KV cache), in this process, on one thread as in a client actor;
  * PPO iterations/s and env steps/s of one client's local training, in this process (no Ray
    actor): the RLlib env runner stepping the text env with the LM policy, then PPO's SGD with the
    KL-to-reference term;
  * round time of the config end to end through ``run_experiment`` (as ``fedrlhf run``, MLflow off):
    setup (Ray actors, RLlib builds, data, round-0 evaluation) and seconds per round;
  * memory: one client's record in its client store, the driver's checkpoint, the RSS of each
    client actor process and the peak summed RSS of all Ray processes and this driver.
Prints a table and writes ``imdb.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
from rich.console import Console
from rich.table import Table

from fedrlhf_ray.config import load_config

ROOT = Path(__file__).resolve().parents[1]


class PeakRSS:
    """Peak summed RSS of this process and its children (the local Ray), sampled in a thread."""

    def __init__(self, interval: float = 0.25) -> None:
        self.interval, self.peak, self.by_actor = interval, 0, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    rss = p.memory_info().rss
                    total += rss
                    if "ClientHost" in " ".join(p.cmdline()):
                        self.by_actor[p.pid] = max(self.by_actor.get(p.pid, 0), rss)
                except psutil.Error:
                    continue
            self.peak = max(self.peak, total)
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def local_speed(cfg) -> dict[str, float]:
    """Generation and PPO speed of one client in this process."""
    import torch

    from fedrlhf_ray.process_setup import install_process
    from fedrlhf_ray.tasks.text import ppo as text_ppo
    from fedrlhf_ray.tasks.text.generation import generate
    from fedrlhf_ray.tasks.text.policy import cached_lm
    from fedrlhf_ray.tasks.text.trainer import TextRLHFTrainer, build_text_clients, lm_source

    install_process()  # as in a client actor
    lm = cached_lm(lm_source(cfg))
    clients = build_text_clients(cfg, lm)[:1]
    trainer = TextRLHFTrainer(cfg, clients, [cfg.client_lambdas()[0]])
    trainer.load_client(0, None)
    module = text_ppo.acting_module(trainer.algo)
    prompts = clients[0].test_prompts[:32]
    g = cfg.imdb().generate_tokens
    generate(module.lm, module.reference, prompts[:2], max_tokens=2, eos_id=lm.eos_id, temperature=1.0, seed=0)
    start = time.perf_counter()
    gens = generate(module.lm, module.reference, prompts, max_tokens=g, eos_id=lm.eos_id, temperature=1.0, seed=0)
    gen_seconds = time.perf_counter() - start
    tokens = sum(len(c) for c in gens.continuations) + sum(1 for c in gens.continuations if len(c) < g)
    trainer.train(0)  # warm-up: the first iteration builds RLlib's connectors
    iterations = 3
    start = time.perf_counter()
    steps, _ = text_ppo.train_iterations(trainer.algo, iterations)
    ppo_seconds = time.perf_counter() - start
    trainer.stop()
    return {
        "torch_threads": float(torch.get_num_threads()),
        "generation_tokens_per_s": tokens / gen_seconds,
        "ppo_iterations_per_s": iterations / ppo_seconds,
        "ppo_env_steps_per_s": steps / ppo_seconds,
        "parameters": float(sum(p.numel() for p in module.lm.parameters())),
    }


def round_time(cfg) -> dict[str, float]:
    from fedrlhf_ray.experiment import run_experiment
    from fedrlhf_ray.rundir import CLIENT_STORE

    marks: list[float] = []
    with tempfile.TemporaryDirectory() as out, PeakRSS() as rss:
        start = time.perf_counter()
        result = run_experiment(cfg, out=out, on_start=lambda p: marks.append(time.perf_counter()),
                                on_round=lambda p: marks.append(time.perf_counter()))
        total = time.perf_counter() - start
        rd = result.run_dir
        record = max((rd.path / CLIENT_STORE / "client-000000").glob("round-*.npz"))
        checkpoint = rd.checkpoint_path(rd.checkpoint_rounds()[0])
        final = result.final
        rounds = len(marks) - 1
        return {
            "setup_s": marks[0] - start,
            "s_per_round": (marks[-1] - marks[0]) / max(1, rounds),
            "end_to_end_s": total,
            "rounds": float(rounds),
            "client_record_kib": record.stat().st_size / 1024,
            "checkpoint_kib": checkpoint.stat().st_size / 1024,
            "actor_rss_mib": float(np.mean(list(rss.by_actor.values()))) / 2**20 if rss.by_actor else float("nan"),
            "peak_rss_mib": rss.peak / 2**20,
            "sentiment_independent_round0": result.initial.get("eval/sentiment_independent/mean", float("nan")),
            "sentiment_independent_final": final.get("eval/sentiment_independent/mean", float("nan")),
            "fluency_round0": result.initial.get("eval/fluency/mean", float("nan")),
            "fluency_final": final.get("eval/fluency/mean", float("nan")),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "tune_configs" / "imdb_small.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--rounds", type=int, default=None, help="override federation.rounds")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args()
    overrides = list(args.overrides) + ["tracking.enabled=false"]
    if args.rounds is not None:
        overrides.append(f"federation.rounds={args.rounds}")
    cfg = load_config(args.config, overrides)
    from fedrlhf_ray.tasks.text.prepare import prepare

    prepare(cfg, progress=True)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    speed = local_speed(cfg)
    rounds = round_time(cfg)
    table = Table(title=f"IMDb task on {os.cpu_count()} CPU cores ({Path(args.config).name})")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for key, value in {**speed, **rounds}.items():
        table.add_row(key, f"{value:,.3f}" if abs(value) < 100 else f"{value:,.0f}")
    Console().print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "imdb.json").write_text(json.dumps({
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "config": args.config, "overrides": overrides, "local": speed, "run": rounds,
    }, indent=2))


if __name__ == "__main__":
    main()
