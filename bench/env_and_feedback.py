"""Throughput of the building blocks: envs, feedback, reward-model fits, dataset loaders.

How to run:  python bench/env_and_feedback.py [--data ../shared/data] [--out bench/results]
Prints a table and writes ``env_and_feedback.json``. Single-threaded numbers (torch is
limited to one thread) so they compare across machines; target: ≥ 10,000 synthetic env
steps/s on one core.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from envs.data.movielens import load_movielens
from envs.data.partition import form_clients
from envs.rec_env import SlateRecEnv
from envs.synthetic import make_synthetic_clients
from fedrlhf_ray.tasks.rec.feedback import RandomQueries, SimulatedHuman, UncertaintyQueries, collect_feedback
from fedrlhf_ray.tasks.rec.reward_model import RewardModel


def env_steps_per_second(make_env, steps: int) -> float:
    env = make_env()
    rng = np.random.default_rng(0)
    env.reset(seed=0)
    actions = rng.integers(env.action_space.n, size=steps)
    start = time.perf_counter()
    for a in actions:
        _, _, terminated, _, _ = env.step(a)
        if terminated:
            env.reset()
    return steps / (time.perf_counter() - start)


def vector_steps_per_second(make_env, num_envs: int, steps: int) -> float:
    env = gym.vector.SyncVectorEnv([make_env] * num_envs)
    env.reset(seed=0)
    rng = np.random.default_rng(0)
    n_calls = steps // num_envs
    actions = rng.integers(env.single_action_space.n, size=(n_calls, num_envs))
    start = time.perf_counter()
    for a in actions:
        env.step(a)
    return n_calls * num_envs / (time.perf_counter() - start)


def timed(fn, repeat: int = 1) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--steps", type=int, default=50_000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows: list[tuple[str, float, str]] = []

    syn = make_synthetic_clients(num_clients=1, users_per_client=4, n_items=300, seed=0)[0]
    make_syn = lambda: SlateRecEnv(syn, seed=0)  # noqa: E731
    rows.append(("synthetic env, single", env_steps_per_second(make_syn, args.steps), "steps/s"))
    rows.append(("synthetic env, sync vector ×8", vector_steps_per_second(make_syn, 8, args.steps), "steps/s"))

    data_dir = Path(args.data)
    with tempfile.TemporaryDirectory() as cache:
        for name in ("ml-latest-small", "ml-100k"):
            cold = timed(lambda: load_movielens(name, data_dir / name, cache_dir=cache))
            cached = timed(lambda: load_movielens(name, data_dir / name, cache_dir=cache), repeat=3)
            rows.append((f"loader {name}, cold (parse + validate)", cold * 1000, "ms"))
            rows.append((f"loader {name}, cached (parquet)", cached * 1000, "ms"))
        data = load_movielens("ml-latest-small", data_dir / "ml-latest-small", cache_dir=cache)
    ml = form_clients(data.ratings, data.movies, data.genre_names, num_clients=5, seed=0)[0]
    make_ml = lambda: SlateRecEnv(ml, seed=0)  # noqa: E731
    rows.append(("MovieLens env, single", env_steps_per_second(make_ml, args.steps), "steps/s"))
    rows.append(("MovieLens env, sync vector ×8", vector_steps_per_second(make_ml, 8, args.steps), "steps/s"))

    human = SimulatedHuman(syn, beta=2.0, seed=0)
    n_queries = 20_000
    t = timed(lambda: collect_feedback(human, RandomQueries(), budget=n_queries, kind="pairwise"))
    rows.append(("feedback, random pairwise queries", n_queries / t, "queries/s"))
    t = timed(lambda: collect_feedback(human, RandomQueries(), budget=n_queries, kind="rating"))
    rows.append(("feedback, direct ratings", n_queries / t, "queries/s"))

    for n_pairs in (1_000, 10_000):
        log = collect_feedback(SimulatedHuman(syn, beta=2.0, seed=1), RandomQueries(), budget=n_pairs)
        model = RewardModel(syn.catalog, epochs=10, seed=0)
        t = timed(lambda: model.fit(log, syn))
        rows.append((f"reward model fit, {n_pairs:,} pairs × 10 epochs", t, "s"))
    model = RewardModel(ml.catalog, epochs=10, seed=0)
    log = collect_feedback(SimulatedHuman(ml, beta=2.0, seed=1), RandomQueries(), budget=1_000)
    model.fit(log, ml)
    t = timed(lambda: collect_feedback(human, UncertaintyQueries(pool_factor=5), budget=1_000,
                                       reward_model=RewardModel(syn.catalog, seed=0)))
    rows.append(("feedback, uncertainty queries (pool ×5)", 1_000 / t, "queries/s"))
    t = timed(lambda: model.reward_table(ml), repeat=3)
    rows.append((f"reward table, MovieLens ({ml.catalog.n_items:,} items)", t * 1000, "ms"))

    table = Table(title="env_and_feedback (1 thread)")
    table.add_column("measurement")
    table.add_column("value", justify="right")
    table.add_column("unit")
    for name, value, unit in rows:
        table.add_row(name, f"{value:,.1f}" if value < 1000 else f"{value:,.0f}", unit)
    Console().print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "machine": {"python": platform.python_version(), "processor": platform.processor(),
                    "torch_threads": torch.get_num_threads()},
        "results": [{"name": n, "value": v, "unit": u} for n, v, u in rows],
    }
    (out / "env_and_feedback.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {out / 'env_and_feedback.json'}")


if __name__ == "__main__":
    main()
