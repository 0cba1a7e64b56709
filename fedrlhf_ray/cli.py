"""The ``fedrlhf`` command line.

User mistakes (bad config, bad flag, missing data) end with one ``fedrlhf: error: ...`` line
and exit status 2, never a traceback, and leave no run directory behind.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from fedrlhf_ray.config import ConfigError, ExperimentConfig, load_config
from fedrlhf_ray.tracking import read_jsonl
from fedrlhf_ray.tune import SweepError

EXIT_USER_ERROR = 2


class UserError(Exception):
    """Reported as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line instead of usage + message
        prefix = "" if self.prog == "fedrlhf" else f"{self.prog.removeprefix('fedrlhf ')}: "
        raise UserError(prefix + message)


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="experiment YAML file (see tune_configs/)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a field, e.g. --set federation.rounds=3 (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fedrlhf", description="Federated RLHF on Ray.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    config = sub.add_parser("config", help="show or check an experiment file")
    config_sub = config.add_subparsers(dest="action", required=True, parser_class=_Parser)
    _add_config_args(config_sub.add_parser("show", help="print the resolved config"))
    _add_config_args(config_sub.add_parser("check", help="validate the config"))
    config_sub.add_parser("reference", help="print every field with its default and meaning")

    data = sub.add_parser("data", help="inspect datasets")
    data_sub = data.add_subparsers(dest="action", required=True, parser_class=_Parser)
    info = data_sub.add_parser("info", help="load a MovieLens copy and print its statistics")
    info.add_argument("--dataset", required=True, help="ml-latest-small, ml-100k, ml-1m or ml-25m")
    info.add_argument("--path", help="extracted folder or official zip")
    info.add_argument("--cache-dir", help="cache directory (default $FEDRLHF_CACHE or ~/.cache/fedrlhf)")
    info.add_argument("--download", action="store_true", help="download the official archive if needed")
    info.add_argument("--heldout-fraction", type=float, default=0.2, help="held-out fraction per user")
    info.add_argument("--min-ratings", type=int, default=20, help="minimum ratings of an eligible user")

    run = sub.add_parser("run", help="federated RLHF (or a baseline) on Ray client actors")
    run.add_argument("config", nargs="?", help="experiment YAML file (not needed with --resume)")
    run.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a field, e.g. --set federation.baseline=centralized (repeatable)",
    )
    run.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint")
    run.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    run.add_argument("--out", default="runs", help="parent folder of the run directory (default runs/)")
    run.add_argument(
        "--tracking-uri",
        help="MLflow tracking URI (default: tracking.tracking_uri, $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)",
    )

    tune = sub.add_parser("tune", help="a Ray Tune sweep: every trial a federated run, tracked in MLflow")
    tune.add_argument("sweep", nargs="?", help="sweep YAML file (not needed with --resume)")
    tune.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="fix a field of the base experiment for every trial, e.g. --set env.data.path=DIR (repeatable)",
    )
    tune.add_argument("--resume", metavar="SWEEP_DIR", help="continue an interrupted sweep (Tune's restore)")
    tune.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    tune.add_argument("--tracking-uri", help="MLflow tracking URI (as for run)")
    tune.add_argument("--out", default="runs/sweeps", help="parent folder of the sweep directory (default runs/sweeps)")

    ui = sub.add_parser("ui", help="start the MLflow UI on the local tracking store")
    ui.add_argument("--tracking-uri", help="SQLite store to show (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    ui.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    ui.add_argument("--port", type=int, default=5000, help="port (default 5000)")

    train = sub.add_parser("train", help="single-client RLHF (feedback → reward model → PPO)")
    _add_config_args(train)
    train.add_argument("--client", type=int, default=0, help="which client to train (default 0)")
    train.add_argument("--out", default="runs", help="parent folder of the run directory (default runs/)")
    return parser


def _config_from(args: argparse.Namespace) -> ExperimentConfig:
    return load_config(args.config, args.overrides)


def cmd_config(args: argparse.Namespace) -> int:
    if args.action == "reference":
        from fedrlhf_ray.config import reference_markdown

        print(reference_markdown())
        return 0
    cfg = _config_from(args)
    if args.action == "show":
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
    else:
        print(f"{args.config}: OK")
    return 0


def cmd_data_info(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from envs.data.movielens import SUPPORTED_DATASETS, describe, load_movielens
    from envs.data.partition import temporal_split

    if args.dataset not in SUPPORTED_DATASETS:
        raise UserError(f"--dataset: got {args.dataset!r} — allowed: {', '.join(SUPPORTED_DATASETS)}")
    if not 0.0 < args.heldout_fraction < 1.0:
        raise UserError(f"--heldout-fraction: got {args.heldout_fraction} — must lie in (0, 1)")
    data = load_movielens(args.dataset, args.path, cache_dir=args.cache_dir, download=args.download)
    stats = describe(data)
    split = temporal_split(data.ratings, args.heldout_fraction, args.min_ratings)
    stats.update(
        {
            "eligible_users": int(split.users.size),
            "train_ratings": int(len(split.train)),
            "heldout_ratings": int(len(split.heldout)),
        }
    )
    table = Table(title=f"{data.name} ({data.source})")
    table.add_column("statistic")
    table.add_column("value", justify="right")
    for key, value in stats.items():
        table.add_row(key, f"{value:,}" if isinstance(value, int) else str(value))
    Console().print(table)
    return 0


def gap_closed(value: float, random: float, oracle: float) -> float:
    """Fraction of the random→oracle gap a policy's liked-hit rate closes."""
    return (value - random) / (oracle - random) if oracle > random else float("nan")


def _atomic_run_dir(parent: Path, name: str) -> tuple[Path, Path]:
    parent.mkdir(parents=True, exist_ok=True)
    final = parent / f"{name}-{datetime.now():%Y%m%d-%H%M%S}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=parent))
    return tmp, final


def _init_ray(cfg: ExperimentConfig, address: str | None = None) -> bool:
    """Connect to ``address`` (or $RAY_ADDRESS) if given, else start a local Ray; True when
    an existing cluster was joined."""
    import ray

    address = address or os.environ.get("RAY_ADDRESS")
    if ray.is_initialized():
        return bool(address)
    if address:
        try:
            ray.init(address=address, log_to_driver=False, logging_level="ERROR")
        except ConnectionError as err:
            raise UserError(f"--address {address}: no Ray cluster reachable ({err})") from None
        return True
    ray.init(
        num_cpus=cfg.ray.num_cpus,
        object_store_memory=cfg.ray.object_store_mb * 1024 * 1024,
        include_dashboard=False,
        log_to_driver=False,
        logging_level="ERROR",
    )
    return False


def cmd_train(args: argparse.Namespace) -> int:
    from fedrlhf_ray.clients_data import build_clients

    cfg = _config_from(args)
    if not 0 <= args.client < cfg.clients.num_clients:
        raise UserError(
            f"--client: got {args.client} — must lie in [0, {cfg.clients.num_clients - 1}]"
        )
    clients = build_clients(cfg)
    tmp, final = _atomic_run_dir(Path(args.out), cfg.name)
    try:
        _train_single(cfg, clients[args.client], cfg.client_lambdas()[args.client], tmp)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"run directory: {final}")
    return 0


def _train_single(cfg: ExperimentConfig, client, lam: float, run_dir: Path) -> dict[str, Any]:
    from rich.console import Console
    from rich.table import Table

    from fedrlhf_ray.evaluation import evaluate_client, random_score_fn
    from fedrlhf_ray.rllib_ppo import env_kwargs
    from fedrlhf_ray.rlhf_trainer import RLHFTrainer
    from fedrlhf_ray.seeding import derive_seed

    console = Console()
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    _init_ray(cfg)
    start = time.perf_counter()
    trainer = RLHFTrainer(cfg, [client], [lam])
    trainer.load_client(client.client_id, None)
    console.print(
        f"[bold]single-client RLHF[/bold] · env={cfg.env.name} · client {client.client_id} "
        f"({len(client.users)} user(s), {client.n_train} train / {client.n_heldout} held-out "
        f"interactions) · λ={lam:g} · {cfg.federation.rounds} rounds × "
        f"{cfg.ppo.local_iterations} PPO iterations"
    )
    random_eval = evaluate_client(
        random_score_fn(derive_seed(cfg.seed, "random_policy")),
        client,
        env_kwargs(cfg.env),
        episodes_per_user=cfg.evaluation.episodes_per_user,
        ndcg_k=cfg.evaluation.ndcg_k,
        seed=derive_seed(cfg.seed, "eval", client.client_id),
    )
    initial = trainer.evaluate()
    rows = []
    with (run_dir / "metrics.jsonl").open("w") as log:
        for rnd in range(1, cfg.federation.rounds + 1):
            steps, metrics = trainer.train(rnd)
            if cfg.evaluation_due(rnd):
                metrics.update(trainer.evaluate(rnd))
            metrics["round"] = rnd
            rows.append(metrics)
            log.write(json.dumps(metrics) + "\n")
            log.flush()
            console.print(
                f"round {rnd}/{cfg.federation.rounds}  steps {steps:5d}  "
                f"RM held-out acc {metrics['reward_model/heldout_pair_accuracy']:.3f}  "
                f"train return {metrics['train/episode_return_mean']:.2f}  "
                f"held-out liked-hit {metrics.get('eval/liked_hit_rate', float('nan')):.3f}  "
                f"({metrics['train/seconds']:.1f}s)"
            )
    final = rows[-1]
    trainer.stop()
    table = Table(title=f"held-out evaluation, client {client.client_id}")
    for col in ("metric", "random", "initial policy", "trained policy", "oracle"):
        table.add_column(col, justify="right" if col != "metric" else "left")
    table.add_row(
        "liked-hit rate",
        f"{random_eval['liked_hit_rate']:.3f}",
        f"{initial['eval/liked_hit_rate']:.3f}",
        f"{final['eval/liked_hit_rate']:.3f}",
        f"{final['eval/oracle_hit_rate']:.3f}",
    )
    for key, label in SUMMARY_METRICS:
        table.add_row(
            label, f"{random_eval[key]:.3f}", f"{initial['eval/' + key]:.3f}",
            f"{final['eval/' + key]:.3f}", "",
        )
    console.print(table)
    closed = gap_closed(
        final["eval/liked_hit_rate"], random_eval["liked_hit_rate"], final["eval/oracle_hit_rate"]
    )
    console.print(
        f"closed {closed:.0%} of the random→oracle gap in liked-hit rate "
        f"in {time.perf_counter() - start:.0f}s"
    )
    summary = {
        "random": random_eval,
        "initial": initial,
        "final": final,
        "gap_closed": closed,
        "lambda": lam,
        "client_id": client.client_id,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


RESUMABLE_OVERRIDES = ("federation.rounds",)


def _run_config(args: argparse.Namespace) -> tuple[ExperimentConfig, Path | None]:
    if args.resume:
        run_dir = Path(args.resume)
        for needed in ("config.yaml", "checkpoint.pkl"):
            if not (run_dir / needed).is_file():
                raise UserError(f"--resume {run_dir}: no {needed} there (not a run directory, or no round finished)")
        for text in args.overrides:
            if text.partition("=")[0].strip() not in RESUMABLE_OVERRIDES:
                raise UserError(
                    f"--set {text!r}: a resumed run keeps its config; only {', '.join(RESUMABLE_OVERRIDES)} may change"
                )
        return load_config(run_dir / "config.yaml", args.overrides), run_dir
    if not args.config:
        raise UserError("run: give an experiment file, or --resume RUN_DIR")
    return load_config(args.config, args.overrides), None


def _write_config(run_dir: Path, cfg: ExperimentConfig) -> None:
    tmp = run_dir / "config.yaml.tmp"
    tmp.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    os.replace(tmp, run_dir / "config.yaml")


def _write_status(run_dir: Path, state: str, **extra: Any) -> None:
    (run_dir / "status.json").write_text(json.dumps({"state": state, **extra}, indent=2))


def _start_tracking(cfg: ExperimentConfig, run_dir: Path, resume: bool, cli_uri: str | None):
    """The MLflow run of this run directory: a new one, or on resume the one it already has."""
    from fedrlhf_ray import tracking

    if not cfg.tracking.enabled:
        return None
    previous = tracking.load_tracker(run_dir, cfg.tracking.per_client) if resume else None
    uri = tracking.resolve_tracking_uri(cfg, cli_uri or (previous.tracking_uri if previous else None))
    check_tracking_uri(uri)
    if previous is not None and previous.tracking_uri == uri:
        previous.reopen()
        previous.set_tags(tracking.run_tags(cfg))
        return previous
    return tracking.start_run(cfg, run_dir, uri)


def check_tracking_uri(uri: str) -> None:
    """Fail in one line, at once, on a tracking server that does not answer (MLflow's own
    client would retry for minutes)."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=10) as reply:
            if reply.status == 200:
                return
            problem = f"HTTP {reply.status}"
    except (urllib.error.URLError, OSError) as err:
        problem = str(getattr(err, "reason", err))
    raise UserError(f"--tracking-uri {uri}: no MLflow server answers ({problem})")


def cluster_tracking_uri(uri: str | None, joined: bool) -> str | None:
    """The tracking URI as trials on any node must see it.

    On a cluster that was joined (``--address``; an autoscaler may add nodes at any time) or
    that has several nodes, a SQLite file exists on this node only and a server on loopback is
    this node's: the first is refused, the second is given this node's cluster address, where
    it must answer too."""
    import ray

    if uri is None or (not joined and sum(1 for n in ray.nodes() if n["Alive"]) < 2):
        return uri
    if uri.startswith("sqlite:"):
        raise UserError(
            f"--tracking-uri {uri}: a SQLite store is local to this node; on a Ray cluster give an "
            "MLflow server, e.g. --tracking-uri http://127.0.0.1:5000 on the head of cluster.yaml"
        )
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    if parts.hostname not in ("127.0.0.1", "localhost"):
        return uri
    netloc = ray.util.get_node_ip_address() + (f":{parts.port}" if parts.port else "")
    shared = urlunsplit(parts._replace(netloc=netloc))
    try:
        check_tracking_uri(shared)
    except UserError:
        raise UserError(
            f"--tracking-uri {uri}: trials on other nodes would reach it as {shared}, where no MLflow "
            "server answers; start it with --host 0.0.0.0 (as cluster.yaml's head does)"
        ) from None
    return shared


def _finish_tracking(tracker, run_dir: Path, status: str, driver=None, cfg: ExperimentConfig | None = None) -> None:
    """Artifacts (config, metrics files, plots, final global model) and the terminal status."""
    import ray

    from fedrlhf_ray.driver import CLIENT_METRICS, METRICS
    from fedrlhf_ray.tracking import plot_learning_curves

    try:
        names = ["config.yaml", METRICS, CLIENT_METRICS, "summary.json", "status.json"]
        if (run_dir / METRICS).exists():
            plot_learning_curves(run_dir, run_dir / "learning_curves.png", cfg.name if cfg else run_dir.name)
            names.append("learning_curves.png")
        if driver is not None:
            ray.get(driver.save_global_weights.remote(str(run_dir / "global_weights.npz")))
            tracker.log_artifacts(run_dir, ["global_weights.npz"], "model")
        tracker.log_artifacts(run_dir, names)
    finally:
        tracker.finish(status)


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C: the run is marked interrupted (MLflow: KILLED)."""


_sigterm_received: list[bool] = []  # Ray may re-raise the interrupt as a plain KeyboardInterrupt


def _raise_terminated(signum, frame) -> None:
    _sigterm_received.append(True)
    raise Terminated()


def cmd_run(args: argparse.Namespace) -> int:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from fedrlhf_ray.clients_data import build_clients
    from fedrlhf_ray.driver import DriverActor

    cfg, resume_dir = _run_config(args)
    build_clients(cfg)  # data problems surface here, before anything is created
    if resume_dir is None:
        run_dir = Path(args.out) / f"{cfg.name}-{datetime.now():%Y%m%d-%H%M%S}"
        run_dir.mkdir(parents=True, exist_ok=False)
    else:
        run_dir = resume_dir
    run_dir = run_dir.resolve()
    started_fresh = resume_dir is None
    tracker = driver = None
    placement: list[dict[str, Any]] = []
    try:
        _write_config(run_dir, cfg)  # on resume: a raised federation.rounds is kept
        tracker = _start_tracking(cfg, run_dir, not started_fresh, args.tracking_uri)
        if tracker is not None and not started_fresh:
            tracker.backfill(run_dir)
        _init_ray(cfg, args.address)
        signal.signal(signal.SIGTERM, _raise_terminated)  # after ray.init, which sets its own
        # The driver writes the run directory, so it runs on this node.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        driver = DriverActor.options(num_cpus=0, scheduling_strategy=here).remote(
            cfg, str(run_dir), resume=not started_fresh, tracker=tracker
        )
        placement = ray.get(driver.placement.remote())
        _write_status(run_dir, "running", placement=placement)
        if tracker is not None:
            tracker.set_tags({"fedrlhf.ray_nodes": str(len({p["node_id"] for p in placement}))})
        summary = _federated_loop(cfg, driver, run_dir, started_fresh)
    except BaseException as err:
        interrupted = isinstance(err, KeyboardInterrupt)
        has_round = (run_dir / "checkpoint.pkl").exists()
        status = "KILLED" if interrupted else "FAILED"
        nothing_to_resume = started_fresh and not has_round
        if nothing_to_resume:
            shutil.rmtree(run_dir, ignore_errors=True)  # leave nothing behind
        else:
            _write_status(run_dir, "interrupted" if interrupted else "failed", error=str(err)[:500])
            print(f"fedrlhf: run stopped; resume with: fedrlhf run --resume {run_dir}", file=sys.stderr)
        if tracker is not None:
            try:  # the error may be the tracking server's own: it must not hide the run's error
                if nothing_to_resume:
                    tracker.finish(status)
                    tracker.client().delete_run(tracker.run_id)
                else:
                    _finish_tracking(tracker, run_dir, status, cfg=cfg)
            except Exception as tracking_err:  # noqa: BLE001
                print(f"fedrlhf: could not close MLflow run {tracker.run_id}: {tracking_err}", file=sys.stderr)
        raise
    _write_status(run_dir, "completed", rounds=cfg.federation.rounds, placement=placement)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    if tracker is not None:
        _finish_tracking(tracker, run_dir, "FINISHED", driver, cfg)
        print(f"MLflow run {tracker.run_id} in {tracker.tracking_uri}")
    print(f"run directory: {run_dir}")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from fedrlhf_ray import tracking
    from fedrlhf_ray.clients_data import build_clients
    from fedrlhf_ray.tune import BEST_CONFIG, SWEEP_FILE, load_sweep, run_sweep, summarize_sweep

    if args.resume:
        sweep_dir = Path(args.resume).resolve()
        if not (sweep_dir / SWEEP_FILE).is_file():
            raise UserError(f"--resume {sweep_dir}: no {SWEEP_FILE} there (not a sweep directory)")
        if args.overrides:
            raise UserError("--set: a resumed sweep keeps its settings")
        sweep = load_sweep(sweep_dir / SWEEP_FILE)
    elif args.sweep:
        sweep = load_sweep(args.sweep, args.overrides)
        sweep_dir = None
    else:
        raise UserError("tune: give a sweep file, or --resume SWEEP_DIR")
    cfg = sweep.base_config
    build_clients(cfg)  # data problems surface here, before anything is created
    uri = None
    if cfg.tracking.enabled:
        previous = tracking.load_tracker(sweep_dir) if sweep_dir else None
        uri = tracking.resolve_tracking_uri(cfg, args.tracking_uri or (previous.tracking_uri if previous else None))
        check_tracking_uri(uri)
    fresh = sweep_dir is None
    if fresh:
        sweep_dir = (Path(args.out) / f"{sweep.settings.name}-{datetime.now():%Y%m%d-%H%M%S}").resolve()
        sweep_dir.mkdir(parents=True, exist_ok=False)
        (sweep_dir / SWEEP_FILE).write_text(yaml.safe_dump(sweep.to_dict(), sort_keys=False))
    console = Console()
    console.print(
        f"[bold]sweep {sweep.settings.name}[/bold] · {', '.join(sweep.settings.search_space)} · "
        f"{sweep.settings.metric} ({sweep.settings.mode}) · sweep dir {sweep_dir}"
    )
    start = time.perf_counter()
    # Tune's own Ctrl-C handler ends fit() as if the sweep were done: let it interrupt instead,
    # like SIGTERM, so that the sweep is marked KILLED and can be resumed.
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    try:
        joined = _init_ray(cfg, args.address)
        signal.signal(signal.SIGTERM, _raise_terminated)
        uri = cluster_tracking_uri(uri, joined)
        results, parent = run_sweep(sweep, sweep_dir, uri, resume=not fresh)
        summary = summarize_sweep(sweep, sweep_dir, results, parent)
    except SweepError:
        raise  # it ran to the end: nothing to resume
    except BaseException:
        if fresh and not any(p.is_dir() for p in sweep_dir.iterdir()):
            shutil.rmtree(sweep_dir, ignore_errors=True)  # no trial started: leave nothing behind
        else:
            print(f"fedrlhf: sweep stopped; resume with: fedrlhf tune --resume {sweep_dir}", file=sys.stderr)
        raise
    s = sweep.settings
    table = Table(title=f"{len(summary['trials'])} trials, ranked by {s.metric} ({s.mode}) at their last round")
    for col in ("trial", *s.search_space, "rounds", s.metric):
        table.add_column(col, justify="left" if col == "trial" else "right")
    sign = 1 if s.mode == "max" else -1  # best first; a trial without the metric (NaN) last
    ranked = sorted(summary["trials"], key=lambda r: sign * r[s.metric] if r[s.metric] == r[s.metric] else float("-inf"),
                    reverse=True)
    for row in ranked:
        table.add_row(
            str(row["trial_id"]) + (" (error)" if row["error"] else ""),
            *(f"{row[k]:.4g}" if isinstance(row[k], float) else str(row[k]) for k in s.search_space),
            str(row["rounds"]), f"{row[s.metric]:.4f}",
        )
    console.print(table)
    console.print(
        f"best: trial {summary['trial_id']} · {s.metric} = {summary['value']:.4f} · "
        f"{', '.join(f'{k}={v}' for k, v in summary['search_values'].items())} · "
        f"{time.perf_counter() - start:.0f}s"
    )
    print(f"best config: {sweep_dir / BEST_CONFIG}")
    if uri is not None:
        print(f"MLflow: experiment {s.mlflow_experiment or s.name} in {uri}")
    print(f"sweep directory: {sweep_dir}")
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    from fedrlhf_ray.tracking import DEFAULT_DB, local_artifact_root

    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{DEFAULT_DB}"
    if not uri.startswith("sqlite:///"):
        raise UserError(f"--tracking-uri {uri}: not a local SQLite store; a tracking server already serves its UI")
    db = Path(uri.removeprefix("sqlite:///")).resolve()
    if not db.is_file():
        raise UserError(f"--tracking-uri {uri}: no such store ({db}); run `fedrlhf run` here first")
    command = [
        "mlflow", "ui", "--backend-store-uri", f"sqlite:///{db}", "--host", args.host, "--port", str(args.port),
        "--artifacts-destination", local_artifact_root(f"sqlite:///{db}"),
        "--workers", "1",  # one user: starts in about half the time of MLflow's default 4
    ]
    print(f"MLflow UI on http://{args.host}:{args.port} for {db} (Ctrl-C stops it)", flush=True)
    os.execvp(command[0], command)
    return 0  # not reached: exec replaces this process


SUMMARY_METRICS = (
    ("engagement_rate", "engagement"),
    ("ndcg", "NDCG@k"),
    ("spearman", "Spearman ρ"),
    ("accuracy", "accuracy (liked)"),
)


def _federated_loop(cfg: ExperimentConfig, driver, run_dir: Path, fresh: bool) -> dict[str, Any]:
    import ray
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    console = Console()
    fed = cfg.federation
    done = ray.get(driver.completed_rounds.remote())
    console.print(
        f"[bold]{fed.baseline}[/bold] RLHF · env={cfg.env.name} · K={cfg.clients.num_clients} "
        f"clients · strategy={fed.strategy} · personalization={fed.personalization} · "
        f"{fed.rounds} rounds · run dir {run_dir}"
    )
    first = ray.get(driver.initial_evaluation.remote()) if fresh else _read_round(run_dir, 0)
    last = _last_evaluated(run_dir)
    start = time.perf_counter()
    with Progress(
        TextColumn("[bold]round"), MofNCompleteColumn(), BarColumn(), TimeElapsedColumn(),
        TextColumn("{task.description}"), console=console, transient=False,
    ) as progress:
        task = progress.add_task("", total=fed.rounds, completed=done)
        for _ in range(done, fed.rounds):
            metrics = ray.get(driver.run_round.remote())
            if "eval/liked_hit_rate/mean" in metrics:
                last = metrics
            progress.update(
                task, advance=1,
                description=(
                    f"clients {int(metrics['fed/clients_aggregated'])}/{int(metrics['fed/clients_sampled'])}"
                    f" · liked-hit {last.get('eval/liked_hit_rate/mean', float('nan')):.3f}"
                    f" (worst decile {last.get('eval/liked_hit_rate/worst_decile', float('nan')):.3f})"
                    f" · RM acc {metrics.get('reward_model/heldout_pair_accuracy/mean', float('nan')):.3f}"
                    f" · {metrics['fed/round_seconds']:.1f}s"
                ),
            )
    table = Table(title=f"held-out evaluation over {cfg.clients.num_clients} clients (mean · worst decile)")
    for col in ("metric", "random", "round 0", f"round {fed.rounds}", "oracle"):
        table.add_column(col, justify="left" if col == "metric" else "right")

    def cell(m: dict[str, float], key: str) -> str:
        return f"{m.get(f'eval/{key}/mean', float('nan')):.3f} · {m.get(f'eval/{key}/worst_decile', float('nan')):.3f}"

    table.add_row(
        "liked-hit rate", f"{last['eval/random_hit_rate/mean']:.3f}", cell(first, "liked_hit_rate"),
        cell(last, "liked_hit_rate"), f"{last['eval/oracle_hit_rate/mean']:.3f}",
    )
    for key, label in SUMMARY_METRICS:
        table.add_row(label, "", cell(first, key), cell(last, key), "")
    console.print(table)
    closed = gap_closed(
        last["eval/liked_hit_rate/mean"], last["eval/random_hit_rate/mean"], last["eval/oracle_hit_rate/mean"]
    )
    console.print(
        f"closed {closed:.0%} of the random→oracle gap in mean liked-hit rate; "
        f"{time.perf_counter() - start:.0f}s for {fed.rounds - done} rounds"
    )
    return {"initial": first, "final": last, "gap_closed": closed}


def _read_round(run_dir: Path, round_index: int) -> dict[str, float]:
    return next((row for row in read_jsonl(run_dir / "metrics.jsonl") if row.get("round") == round_index), {})


def _last_evaluated(run_dir: Path) -> dict[str, float]:
    return [row for row in read_jsonl(run_dir / "metrics.jsonl") if "eval/liked_hit_rate/mean" in row][-1]


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    try:
        args = build_parser().parse_args(argv)
        if args.command == "config":
            return cmd_config(args)
        if args.command == "data":
            return cmd_data_info(args)
        if args.command == "run":
            return cmd_run(args)
        if args.command == "tune":
            return cmd_tune(args)
        if args.command == "ui":
            return cmd_ui(args)
        return cmd_train(args)
    except (ConfigError, UserError) as err:
        print(f"fedrlhf: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except SweepError as err:
        print(f"fedrlhf: error: {err}", file=sys.stderr)
        return 1
    except ValueError as err:
        from envs.data.movielens import DatasetError

        if isinstance(err, DatasetError):
            print(f"fedrlhf: error: {err}", file=sys.stderr)
            return EXIT_USER_ERROR
        raise
    except KeyboardInterrupt as err:
        print("fedrlhf: interrupted", file=sys.stderr)
        return 143 if isinstance(err, Terminated) or _sigterm_received else 130
    except BrokenPipeError:  # output piped into e.g. `head`, which stopped reading
        sys.stdout = open(os.devnull, "w")
        return 0


if __name__ == "__main__":
    sys.exit(main())
