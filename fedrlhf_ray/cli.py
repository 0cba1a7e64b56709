"""The ``fedrlhf`` command line: it parses, dispatches to the library and prints.

User mistakes (bad config, bad flag, missing data, an unusable output folder, tracking store or
Ray address) end with one ``fedrlhf: error: ...`` line and exit status 2, never a traceback, and
leave nothing behind. The experiment itself runs in :func:`fedrlhf_ray.experiment.run_experiment`.
"""

from __future__ import annotations

import argparse
import os
import shlex
import socket
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import yaml

from fedrlhf_ray.config import load_config
from fedrlhf_ray.errors import UserError
from fedrlhf_ray.privacy import DEVIATIONS
from fedrlhf_ray.schema import ExperimentConfig

if TYPE_CHECKING:
    from fedrlhf_ray.tasks import ResultTable, Task

EXIT_USER_ERROR = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line instead of usage + message
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


def _port(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise argparse.ArgumentTypeError(f"got {text!r} — a port is a whole number in 1..65535")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    from fedrlhf_ray.tasks import all_tasks

    parser = _Parser(prog="fedrlhf", description="Federated RLHF on Ray.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    config = sub.add_parser("config", help="show or check an experiment file")
    config_sub = config.add_subparsers(dest="action", required=True, parser_class=_Parser)
    _add_config_args(config_sub.add_parser("show", help="print the resolved config"))
    _add_config_args(config_sub.add_parser("check", help="validate the config"))
    config_sub.add_parser("reference", help="print every field with its default and meaning")

    data = sub.add_parser("data", help="inspect datasets")
    data_sub = data.add_subparsers(dest="action", required=True, parser_class=_Parser)
    info = data_sub.add_parser("info", help="load a copy of a dataset and print its statistics")
    datasets = [d for task in all_tasks() for d in task.datasets]
    info.add_argument("--dataset", required=True, help=", ".join(datasets[:-1]) + f" or {datasets[-1]}")
    info.add_argument("--path", help="extracted folder or official archive (or a folder of part archives)")
    info.add_argument("--cache-dir", help="cache directory (default $FEDRLHF_CACHE or ~/.cache/fedrlhf)")
    info.add_argument("--download", action="store_true", help="download the official archive if needed")
    info.add_argument("--heldout-fraction", type=float, default=0.2, help="held-out fraction per user")
    info.add_argument("--min-ratings", type=int, default=20, help="minimum ratings of an eligible user")

    prep = sub.add_parser("prepare", help="build a task's public models once (a text task: tokenizer, LM, evaluator)")
    prep.add_argument(
        "task", choices=[e for task in all_tasks() if task.prepares for e in task.env_names],
        help="the env whose task to prepare",
    )
    prep.add_argument("config", nargs="?", help="experiment YAML file whose env and lm settings to use "
                      "(default: the built-in ones)")
    prep.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a field, e.g. --set lm.pretrain_steps=500 (repeatable)",
    )

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
    ui.add_argument("--port", type=_port, default=5000, help="port (default 5000)")

    train = sub.add_parser("train", help="single-client RLHF (feedback → reward model → PPO)")
    _add_config_args(train)
    train.add_argument("--client", type=int, default=0, help="which client to train (default 0)")
    train.add_argument("--out", default="runs", help="parent folder of the run directory (default runs/)")

    report = sub.add_parser("report", help="summarise runs over their seeds: intervals, paired differences, figures")
    report.add_argument("sources", nargs="*", metavar="SOURCE",
                        help="run directories, folders holding them (sweep directories), report folders, or "
                             "mlflow:EXPERIMENT")
    report.add_argument("--out", type=Path, help="folder of the report (default report/)")
    report.add_argument("--reference", metavar="GROUP",
                        help="the group the others are compared with, run for run by seed (a group's name)")
    report.add_argument("--tracking-uri", help="MLflow store of mlflow:EXPERIMENT sources "
                                               "(default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    report.add_argument("--from", dest="from_results", type=Path, metavar="RESULTS",
                        help="make every report in RESULTS (folders holding runs.json) again from its summaries")
    report.add_argument("--docs", action="store_true",
                        help="with --from: also rewrite the marked tables of README.md and docs/ beside RESULTS")

    audit = sub.add_parser("audit", help="leakage audit: the server attacks each client's update")
    _add_config_args(audit)
    audit.add_argument("--rounds", type=_positive, default=1, help="rounds to run and audit (default 1)")
    audit.add_argument(
        "--deviate", choices=DEVIATIONS, metavar="ATTACK",
        help=f"play a server that deviates from the protocol ({', '.join(DEVIATIONS)}); "
        "default: the honest-but-curious server",
    )
    audit.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    audit.add_argument("--out", default="runs", help="parent folder of the run directory (default runs/)")
    audit.add_argument("--tracking-uri", help="MLflow tracking URI (as for run)")
    return parser


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"got {text!r} — a whole number of rounds, 1 or more")
    return value


def _config_from(args: argparse.Namespace) -> ExperimentConfig:
    return load_config(args.config, args.overrides)


def cmd_config(args: argparse.Namespace) -> int:
    if args.action == "reference":
        from fedrlhf_ray.config_reference import reference_markdown

        print(reference_markdown())
        return 0
    cfg = _config_from(args)
    if args.action == "show":
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
    else:
        print(f"{args.config}: OK")
    return 0


def cmd_data_info(args: argparse.Namespace) -> int:
    from fedrlhf_ray.tasks import all_tasks, task_for_dataset

    task = task_for_dataset(args.dataset)
    if task is None:
        allowed = ", ".join(d for t in all_tasks() for d in t.datasets)
        raise UserError(f"--dataset: got {args.dataset!r} — allowed: {allowed}")
    options = {"path": args.path, "cache_dir": args.cache_dir, "download": args.download,
               "heldout_fraction": args.heldout_fraction, "min_ratings": args.min_ratings}
    _print_table(task.data_info(args.dataset, options))
    return 0


def _print_table(table: ResultTable, console: Any = None) -> None:
    """A task's table with rich: the first column left-aligned, the others right."""
    from rich.console import Console
    from rich.table import Table

    out = Table(title=table.title)
    for i, col in enumerate(table.columns):
        out.add_column(col, justify="left" if i == 0 else "right")
    for row in table.rows:
        out.add_row(*row)
    (console or Console()).print(out)



class RunView:
    """What ``fedrlhf run`` / ``train`` print: a header, a live progress bar, the task's result table."""

    def __init__(self, title: str, task: Task) -> None:
        from rich.console import Console

        self.console = Console()
        self.task_plugin = task
        self.title = title
        self.progress: Any = None
        self.task: Any = None
        self.run_dir: Path | None = None
        self.start = time.perf_counter()
        self.first_round = 0

    def on_start(self, p: Any) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.run_dir = p.run_dir.path
        self.first_round = p.completed_rounds
        self.console.print(f"{self.title} · run dir {p.run_dir}")
        self.progress = Progress(
            TextColumn("[bold]round"), MofNCompleteColumn(), BarColumn(), TimeElapsedColumn(),
            TextColumn("{task.description}"), console=self.console, transient=False,
        )
        self.progress.start()
        self.task = self.progress.add_task("", total=p.total_rounds, completed=p.completed_rounds)
        self.start = time.perf_counter()

    def on_round(self, p: Any) -> None:
        m = p.metrics
        self.progress.update(
            self.task, completed=p.completed_rounds,
            description=(
                f"clients {int(m['fed/clients_aggregated'])}/{int(m['fed/clients_sampled'])}"
                f" · {self.task_plugin.progress(m, p.last_eval)}"
                f" · {m['fed/round_seconds']:.1f}s"
            ),
        )

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def result(self, result: Any, num_clients: int) -> None:
        self.close()
        table = self.task_plugin.result_table(result.initial, result.final, result.rounds, num_clients, result.summary)
        _print_table(table, self.console)
        elapsed = f"{time.perf_counter() - self.start:.0f}s for {result.rounds - self.first_round} rounds"
        self.console.print("; ".join([*table.notes, elapsed]))
        self._result_footer(result)

    def _result_footer(self, result: Any) -> None:
        dp = result.summary.get("privacy")
        if dp is not None:
            self.console.print(
                f"client-level DP ({dp['mode']} noise): ε = {dp['epsilon']:.3g} at δ = {dp['delta']:g} "
                f"after {result.rounds} round(s)"
            )
        if "stopped" in result.summary:
            self.console.print(f"stopped early: {result.summary['stopped']}")
        if result.tracker is not None:
            print(f"MLflow run {result.tracker.run_id} in {result.tracker.tracking_uri}")
        print(f"run directory: {result.run_dir}")


def _run(cfg: ExperimentConfig, view: RunView, resume_dir: Path | None, args: argparse.Namespace, **kwargs: Any) -> int:
    from fedrlhf_ray.experiment import run_experiment
    from fedrlhf_ray.rundir import RunDir

    try:
        result = run_experiment(
            cfg, out=getattr(args, "out", "runs"), run_dir=resume_dir, resume=resume_dir is not None,
            tracking_uri=getattr(args, "tracking_uri", None), address=getattr(args, "address", None),
            on_start=view.on_start, on_round=view.on_round, handle_sigterm=True, **kwargs,
        )
    except BaseException as err:
        view.close()
        run_dir = view.run_dir or resume_dir
        if run_dir is not None and RunDir(run_dir).checkpoint_rounds() and getattr(err, "resumable", True):
            hint = f"resume with: fedrlhf run --resume {run_dir}"
            if isinstance(err, UserError):
                raise UserError(f"{err}; {hint}") from None
            print(f"fedrlhf: run stopped; {hint}", file=sys.stderr)
        raise
    view.result(result, 1 if kwargs.get("only_clients") else cfg.clients.num_clients)
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from fedrlhf_ray.config import apply_overrides, validate_config

    task = _task(args.task)
    if args.config:
        cfg = load_config(args.config, args.overrides)
    else:
        cfg = validate_config(apply_overrides({"env": {"name": args.task}}, args.overrides))
    if cfg.env.name != args.task:
        raise UserError(
            f"prepare {args.task}: {args.config} is an env.name {cfg.env.name!r} experiment, not {args.task}"
        )
    _print_table(task.prepare(cfg))
    return 0


def _task(env_name: str) -> Task:
    from fedrlhf_ray.tasks import task_for

    return task_for(env_name)


def cmd_run(args: argparse.Namespace) -> int:
    from fedrlhf_ray.experiment import resume_config

    if args.resume and args.config:
        raise UserError("run: give an experiment file or --resume RUN_DIR, not both (a resumed run keeps its config)")
    if args.resume:
        resume_dir = Path(args.resume).resolve()
        cfg = resume_config(resume_dir, args.overrides)
    elif args.config:
        resume_dir = None
        cfg = load_config(args.config, args.overrides)
    else:
        raise UserError("run: give an experiment file, or --resume RUN_DIR")
    fed = cfg.federation
    view = RunView(
        f"[bold]{fed.baseline}[/bold] RLHF · env={cfg.env.name} · K={cfg.clients.num_clients} clients · "
        f"strategy={fed.strategy} · personalization={fed.personalization} · {fed.rounds} rounds",
        _task(cfg.env.name),
    )
    return _run(cfg, view, resume_dir, args)


def cmd_train(args: argparse.Namespace) -> int:
    """Single-client RLHF: the same lifecycle with one client actor serving one client."""
    cfg = _config_from(args)
    k = cfg.clients.num_clients
    if not 0 <= args.client < k:
        raise UserError(f"--client: got {args.client} — must lie in [0, {k - 1}]")
    # One client's federation is that client training alone: the global model is its own.
    cfg = cfg.model_copy(update={"federation": cfg.federation.model_copy(update={"baseline": "federated"})})
    lam = cfg.client_lambdas()[args.client]
    view = RunView(
        f"[bold]single-client RLHF[/bold] · env={cfg.env.name} · client {args.client} · λ={lam:g} · "
        f"{cfg.federation.rounds} rounds × {cfg.ppo.local_iterations} PPO iterations",
        _task(cfg.env.name),
    )
    return _run(cfg, view, None, args, only_clients=[args.client])


def cmd_tune(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from fedrlhf_ray.sweeps.lifecycle import tune_sweep
    from fedrlhf_ray.sweeps.schema import BEST_CONFIG

    console = Console()

    def announce(sweep, sweep_dir: Path) -> None:
        s = sweep.settings
        console.print(
            f"[bold]sweep {s.name}[/bold] · {', '.join(s.search_space)} · {s.metric} ({s.mode}) · sweep dir {sweep_dir}"
        )

    # Tune's own Ctrl-C handler ends fit() as if the sweep were done: let it interrupt instead,
    # like SIGTERM, so that the sweep is marked KILLED and can be resumed.
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"  # see sweeps.runner.run_sweep
    outcome = tune_sweep(
        args.sweep, args.overrides, resume=args.resume, address=args.address, tracking_uri=args.tracking_uri,
        out=args.out, on_start=announce,
    )
    sweep, sweep_dir, summary, uri = outcome.sweep, outcome.sweep_dir, outcome.summary, outcome.tracking_uri
    s = sweep.settings
    table = Table(title=f"{len(summary['trials'])} trials, ranked by {s.metric} ({s.mode}) at their last round")
    for col in ("trial", *s.search_space, "rounds", s.metric):
        table.add_column(col, justify="left" if col == "trial" else "right")
    sign = 1 if s.mode == "max" else -1  # best first; a trial without the metric (NaN) last
    ranked = sorted(
        summary["trials"],
        key=lambda r: sign * r[s.metric] if r[s.metric] == r[s.metric] else float("-inf"),
        reverse=True,
    )
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
        f"{outcome.seconds:.0f}s"
    )
    print(f"best config: {sweep_dir / BEST_CONFIG}")
    if uri is not None:
        print(f"MLflow: experiment {s.mlflow_experiment or s.name} in {uri}")
    print(f"sweep directory: {sweep_dir}")
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    from fedrlhf_ray.tracking import DEFAULT_DB, check_sqlite_path, local_artifact_root

    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{DEFAULT_DB}"
    if not uri.startswith("sqlite:///"):
        raise UserError(f"--tracking-uri {uri}: not a local SQLite store; a tracking server already serves its UI")
    db = Path(uri.removeprefix("sqlite:///")).resolve()
    if not db.is_file():
        raise UserError(f"--tracking-uri {uri}: no such store ({db}); run `fedrlhf run` here first")
    check_sqlite_path(f"sqlite:///{db}")
    _check_port_free(args.host, args.port)
    command = [
        "mlflow", "ui", "--backend-store-uri", f"sqlite:///{db}", "--host", args.host, "--port", str(args.port),
        "--artifacts-destination", str(local_artifact_root(f"sqlite:///{db}")),
        "--workers", "1",  # one user: starts in about half the time of MLflow's default 4
    ]
    print(f"MLflow UI on http://{args.host}:{args.port} for {db} (Ctrl-C stops it)", flush=True)
    os.execvp(command[0], command)
    return 0  # not reached: exec replaces this process


def _check_port_free(host: str, port: int) -> None:
    """MLflow would print a page of server logs and keep running on a taken port."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise UserError(f"--host {host}: not an address of this machine ({err.strerror})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        try:
            probe.bind(address)
        except OSError as err:
            raise UserError(
                f"--port {port}: cannot listen on {host}:{port} ({err.strerror}); choose another --port"
            ) from None


def cmd_audit(args: argparse.Namespace) -> int:
    """Run the first ``--rounds`` rounds with the auditing (or deviating) driver and print its table."""
    from rich.table import Table

    from fedrlhf_ray.experiment import run_experiment
    from fedrlhf_ray.leakage_audit import audit_driver

    cfg = _config_from(args)
    task = _task(cfg.env.name)
    problem = task.audit_problem(cfg)
    if problem is None and cfg.federation.baseline != "federated":
        problem = (
            f"federation.baseline is {cfg.federation.baseline!r} — the audit attacks the updates clients "
            "send to the server, so it needs baseline: federated"
        )
    if problem is not None:
        raise UserError(f"audit: {problem}")
    cfg = cfg.model_copy(update={"federation": cfg.federation.model_copy(update={"rounds": args.rounds})})
    dp = cfg.privacy.dp
    mode = f"DP ({dp.mode}) σ={dp.noise_multiplier:g} C={dp.clip_norm:g}" if dp.enabled else "no DP"
    if cfg.privacy.secure_aggregation:
        mode += f" · SecAgg ({cfg.privacy.secagg_adversary.replace('_', '-')})"
    server = f"deviating server: {args.deviate}" if args.deviate else "leakage audit"
    view = RunView(
        f"[bold]{server}[/bold] · env={cfg.env.name} · K={cfg.clients.num_clients} · "
        f"strategy={cfg.federation.strategy} · {mode} · {args.rounds} round(s)",
        task,
    )
    try:
        result = run_experiment(
            cfg, out=args.out, tracking_uri=args.tracking_uri, address=args.address,
            on_start=view.on_start, on_round=view.on_round, handle_sigterm=True,
            extra_tags={"fedrlhf.audit": args.deviate or "true"}, driver_cls=audit_driver(args.deviate),
        )
    finally:
        view.close()
    m = result.run_dir.round_metrics(result.rounds)
    kind = "deviation" if args.deviate else "audit"
    rows = [r for r in result.run_dir.client_metrics() if r.get("kind") == kind and r["round"] == result.rounds]
    if args.deviate:
        table = Table(title=f"what the deviating server learns of each client's update in round {result.rounds} "
                      "(membership of rated items)")
        columns = [("rated / items", "deviation/base_rate"), ("AUC", "deviation/auc"),
                   ("P@n", "deviation/precision_at_n"), ("p-value", "deviation/p_value")]
    else:
        table = Table(title=f"what the server learns in round {result.rounds} "
                      "(membership of rated items · reconstruction)")
        columns = [("rated / items", "base_rate"), ("update AUC", "update/auc"),
                   ("update P@n", "update/precision_at_n"), ("update cosine", "update/cosine"),
                   ("release AUC", "release/auc"), ("release P@n", "release/precision_at_n"),
                   ("release cosine", "release/cosine")]
    table.add_column("client", justify="right")
    for title, _ in columns:
        table.add_column(title, justify="right")
    nan = float("nan")
    for r in sorted(rows, key=lambda r: r["client"]):
        table.add_row(str(r["client"]), *(f"{r.get(f'audit/{key}', nan):.3f}" for _, key in columns))
    if rows:
        table.add_row("mean", *(f"{m.get(f'audit/{key}/mean', nan):.3f}" for _, key in columns), style="bold")
        view.console.print(table)
    if args.deviate:
        refused = m.get("audit/deviation/refused", 0.0) > 0
        learned = [f"the updates of {int(m.get('audit/deviation/clients', 0))} client(s) as above"]
        if m.get("audit/deviation/evaluations", 0) > 0:
            learned.append(f"per-client metrics of its crafted model from {int(m['audit/deviation/evaluations'])}")
        view.console.print(f"{args.deviate}: " + ("refused by the clients" if refused else "; ".join(learned)))
    if "privacy/epsilon" in m:
        view.console.print(f"ε = {m['privacy/epsilon']:.3g} at δ = {dp.delta:g} after {result.rounds} round(s)")
    if result.tracker is not None:
        print(f"MLflow run {result.tracker.run_id} in {result.tracker.tracking_uri}")
    print(f"run directory: {result.run_dir}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """A report of runs, or every report of a results folder again (``fedrlhf_ray.report``)."""
    from fedrlhf_ray.report import regenerate, report_runs

    if args.from_results is not None:
        if args.sources or args.out or args.reference:
            raise UserError("report: --from makes reports again from their summaries; give it without SOURCE, "
                            "--out or --reference")
        made = regenerate(args.from_results, args.docs,
                          shlex.join(["fedrlhf", "report", "--from", str(args.from_results)]))
    else:
        if not args.sources:
            raise UserError("report: give the runs to report (SOURCE…), or --from RESULTS to make reports again")
        if args.docs:
            raise UserError("report: --docs rewrites the docs from committed summaries; use it with --from RESULTS")
        out = args.out or Path("report")
        command = shlex.join(["fedrlhf", "report", *args.sources, "--out", str(out),
                              *(["--reference", args.reference] if args.reference else [])])
        made = report_runs(args.sources, out, args.reference, args.tracking_uri, command)
        print((out / "report.md").read_text(), end="")
    print(f"report: {', '.join(str(f) for f in made.files)}")
    for doc in made.documents:
        print(f"rewrote the tables of {doc}")
    for run_id in made.mlflow_runs:
        print(f"logged as artifacts (report/) of the sweep's MLflow run {run_id}")
    return 0


def _cause(err: BaseException) -> BaseException:
    """The error itself when it was raised inside a Ray actor (Ray's wrapper adds a traceback)."""
    ray_exceptions = sys.modules.get("ray.exceptions")
    if ray_exceptions is not None and isinstance(err, ray_exceptions.RayTaskError):
        return err.cause if err.cause is not None else err
    return err


def main(argv: list[str] | None = None) -> int:
    from envs.data.errors import DatasetError
    from fedrlhf_ray.experiment import was_terminated

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    # MLflow's INFO lines (creating a store's tables, ...) would break the one-line promise.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    try:
        args = build_parser().parse_args(argv)
        commands = {"config": cmd_config, "data": cmd_data_info, "prepare": cmd_prepare, "run": cmd_run,
                    "tune": cmd_tune, "ui": cmd_ui, "train": cmd_train, "audit": cmd_audit,
                    "report": cmd_report}
        return commands[args.command](args)
    except (UserError, DatasetError) as err:
        print(f"fedrlhf: error: {' '.join(str(_cause(err)).split())}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt as err:
        print("fedrlhf: interrupted", file=sys.stderr)
        return 143 if was_terminated(err) else 130
    except BrokenPipeError:  # output piped into e.g. `head`, which stopped reading
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - stays open: it replaces stdout until exit
        return 0


if __name__ == "__main__":
    sys.exit(main())
