"""Ray Tune sweeps: the sweep file's validation, a real sweep and its MLflow runs, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import yaml

from fedrlhf_ray.config import ConfigError, load_config
from fedrlhf_ray.rundir import RunDir
from fedrlhf_ray.sweeps.schema import load_sweep
from fedrlhf_ray.sweeps.trial import trial_resources, trial_workers, tune_report
from tests.conftest import REPO_ROOT, write_sweep


def test_shipped_sweeps_validate():
    for name in ("lambda_sweep.yaml", "movielens_lambda_sweep.yaml", "privacy_sweep.yaml", "robustness_sweep.yaml",
                 "paper/on_par.yaml", "paper/personalization.yaml", "paper/lambda.yaml", "paper/clients.yaml",
                 "paper/heterogeneity.yaml"):
        sweep = load_sweep(REPO_ROOT / "tune_configs" / name)
        assert sweep.settings.search_space and sweep.base_config.federation.rounds >= 2
    # The paper's sweeps are grids: every trial they will run is a valid experiment.
    import itertools

    for name in ("on_par", "personalization", "lambda", "clients", "heterogeneity"):
        sweep = load_sweep(REPO_ROOT / "tune_configs" / "paper" / f"{name}.yaml")
        space = {k: v.representatives() for k, v in sweep.settings.search_space.items()}
        for values in itertools.product(*space.values()):
            sweep.trial_config(dict(zip(space, values, strict=True)))


def test_privacy_and_attack_fields_are_sweepable():
    """σ, C and the attack are searched like any field; every grid point is a valid run."""
    privacy_sweep = load_sweep(REPO_ROOT / "tune_configs" / "privacy_sweep.yaml")
    trial = privacy_sweep.trial_config({"privacy.dp.noise_multiplier": 1.0, "privacy.dp.clip_norm": 0.2})
    assert trial.privacy.dp.enabled and trial.privacy.dp.mode == "distributed" and trial.privacy.secure_aggregation
    assert (trial.privacy.dp.noise_multiplier, trial.privacy.dp.clip_norm) == (1.0, 0.2)
    robustness = load_sweep(REPO_ROOT / "tune_configs" / "robustness_sweep.yaml")
    kinds = robustness.settings.search_space["attack.kind"].representatives()
    strategies = robustness.settings.search_space["federation.strategy"].representatives()
    assert "sign_flip" in kinds and "multi_krum" in strategies
    for kind in kinds:
        for strategy in strategies:
            cfg = robustness.trial_config({"attack.kind": kind, "federation.strategy": strategy})
            assert (cfg.attack.kind, cfg.federation.strategy) == (kind, strategy)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"search_space": {"ppo.lrr": {"choice": [0.1]}}}, "search_space.ppo.lrr=0.1: ppo.lrr: unknown field"),
        ({"search_space": {"ppo.lr": {"uniform": [-1.0, 1.0]}}}, "search_space.ppo.lr=-1.0: ppo.lr: got -1.0"),
        ({"search_space": {"ppo.lr": {"uniform": [0.1, 0.1]}}}, "low (0.1) must be < high (0.1)"),
        ({"search_space": {"ppo.lr": {"loguniform": [0.0, 0.1]}}}, "loguniform: low (0.0) must be > 0"),
        ({"search_space": {"ppo.lr": {"grid": [0.1], "choice": [0.2]}}}, "give exactly one of grid, choice"),
        ({"search_space": {"ppo.lr": {"normal": [0, 1]}}}, "search_space.ppo.lr.normal: unknown field"),
        ({"search_space": {}}, "search_space: "),
        ({"metric": "liked_hit_rate"}, "metric: got 'liked_hit_rate' — must start with one of eval/"),
        ({"metric": "eval/liked_hit_rate"}, "end it with /mean"),
        ({"mode": "best"}, "mode: got 'best'"),
        ({"num_samples": 0}, "num_samples: got 0"),
        ({"search_alg": {"type": "optuna"}}, "search_space.shaping.lambda: optuna cannot search a grid — use choice"),
        ({"scheduler": {"type": "hyperband"}}, "scheduler.type: got 'hyperband'"),
        ({"overrides": {"federation.rounds": 0}}, "overrides: federation.rounds: got 0"),
        ({"experiment": "missing.yaml"}, "experiment: "),
        ({"colour": "blue"}, "colour: unknown field"),
    ],
)
def test_sweep_errors_name_the_field(tmp_path, fields, message):
    path = write_sweep(tmp_path / "s.yaml", **fields)
    with pytest.raises(ConfigError) as err:
        load_sweep(path)
    text = str(err.value)
    assert text.startswith(str(path)) and "\n" not in text
    assert message in text, text


def test_cli_sweep_error_is_one_line_and_creates_nothing(tmp_path):
    from tests.conftest import fedrlhf_cli

    path = write_sweep(tmp_path / "s.yaml", search_space={"ppo.lr": {"uniform": [-1.0, 1.0]}})
    proc = fedrlhf_cli("tune", str(path), "--out", str(tmp_path / "sweeps"), cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("fedrlhf: error: ") and "Traceback" not in proc.stderr
    assert not (tmp_path / "sweeps").exists()


def test_trial_resources_and_reports():
    cfg = load_config(REPO_ROOT / "tune_configs" / "quickstart.yaml", ["ray.num_workers=2", "ray.cpus_per_worker=0.5"])
    pgf = trial_resources(cfg)
    # The trial's driver runs in the trial's process (an empty head bundle), its client actors
    # in one bundle each.
    assert pgf.bundles == [{"CPU": 0.5}, {"CPU": 0.5}] and pgf.head_bundle_is_empty
    assert trial_workers(cfg) == 2
    assert trial_resources(load_config(REPO_ROOT / "tune_configs" / "quickstart.yaml")).bundles == [{"CPU": 1.0}]
    # a round without evaluation still reports the last evaluated value
    report = tune_report({"round": 3.0, "fed/round_seconds": 1.0}, {"eval/liked_hit_rate/mean": 0.5})
    assert report == {"round": 3.0, "fed/round_seconds": 1.0, "eval/liked_hit_rate/mean": 0.5}


def test_each_trial_gets_the_placement_group_of_its_own_config(tmp_path):
    """Searching the client actors per trial sizes each trial's placement group."""
    from fedrlhf_ray.sweeps.runner import _trainable

    path = write_sweep(tmp_path / "s.yaml", search_space={"ray.num_workers": {"grid": [1, 2]}})
    resources = _trainable(load_sweep(path), None, None)._resources  # what Tune asks per trial
    assert resources({"ray.num_workers": 2}).bundles == [{"CPU": 1.0}] * 2
    assert resources({"ray.num_workers": 1}).bundles == [{"CPU": 1.0}]


def _drawn_trials(path, overrides=()):
    """The trial configs Tune's search would start for a sweep file, without running them."""
    from ray import tune

    from fedrlhf_ray.sweeps.runner import _tune_config

    sweep = load_sweep(path, list(overrides))
    tune.register_trainable("probe", lambda config: None)
    search = _tune_config(sweep).search_alg
    search.add_configurations({"probe": {"run": "probe", "config": sweep.param_space(),
                                         "num_samples": sweep.settings.num_samples}})
    drawn = []
    while (trial := search.next_trial()) is not None:
        drawn.append(trial.config)
    return drawn


def test_random_search_is_seeded_by_the_experiment_seed(tmp_path):
    path = write_sweep(tmp_path / "s.yaml", max_concurrent=None, num_samples=3,
                       search_space={"shaping.lambda": {"grid": [0.0, 1.0]}, "ppo.lr": {"loguniform": [1e-4, 1e-2]}})
    first = _drawn_trials(path)
    assert len(first) == 6 and sorted(t["shaping.lambda"] for t in first) == [0.0] * 3 + [1.0] * 3
    assert len({t["ppo.lr"] for t in first}) == 6
    assert _drawn_trials(path) == first  # the same file draws the same trials
    assert [t["ppo.lr"] for t in _drawn_trials(path, ["seed=1"])] != [t["ppo.lr"] for t in first]


@pytest.mark.slow
def test_sweep_trials_results_and_mlflow_runs(finished_sweep):
    from mlflow.tracking import MlflowClient

    sweep_dir = finished_sweep["dir"]
    trials = pd.read_csv(sweep_dir / "trials.csv")
    assert len(trials) == 4 and (trials["error"].isna() | (trials["error"] == "")).all()
    assert sorted(trials["shaping.lambda"]) == [0.0, 0.0, 2.0, 2.0]
    assert set(trials["ppo.lr"]) <= {0.001, 0.002}
    assert trials["rounds"].max() == 3 and trials["rounds"].min() >= 1  # ASHA may stop one after its grace round
    best = json.loads((sweep_dir / "best.json").read_text())
    assert best["value"] == pytest.approx(trials["eval/liked_hit_rate/mean"].max())
    best_cfg = load_config(sweep_dir / "best_config.yaml")
    assert best_cfg.shaping.lam == best["search_values"]["shaping.lambda"]
    assert best_cfg.ppo.lr == best["search_values"]["ppo.lr"] and best_cfg.federation.rounds == 3
    # human feedback matters: the best trial shapes its reward with λ > 0
    assert best["search_values"]["shaping.lambda"] == 2.0
    assert f"best: trial {best['trial_id']}" in finished_sweep["stdout"]

    client = MlflowClient(finished_sweep["uri"])
    exp = client.get_experiment_by_name("tiny")
    parent_id = json.loads((sweep_dir / "mlflow_run.json").read_text())["run_id"]
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["best/eval/liked_hit_rate/mean"] == pytest.approx(best["value"])
    assert parent.data.tags["fedrlhf.best_run_id"] == best["mlflow_run_id"]
    assert {a.path for a in client.list_artifacts(parent_id)} >= {"best.json", "best_config.yaml", "sweep.yaml", "trials.csv"}
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    assert len(children) == 4
    by_trial = {r.data.tags["fedrlhf.trial_id"]: r for r in children}
    for row in trials.itertuples():
        run = by_trial[row.trial_id]
        assert run.info.status == "FINISHED"
        assert float(run.data.params["shaping.lambda"]) == trials.loc[trials.trial_id == row.trial_id, "shaping.lambda"].item()
        history = client.get_metric_history(run.info.run_id, "eval/liked_hit_rate/mean")
        assert sorted(m.step for m in history) == list(range(row.rounds + 1))  # round 0 + each round once
        final = max(history, key=lambda m: m.step).value
        assert final == pytest.approx(trials.loc[trials.trial_id == row.trial_id, "eval/liked_hit_rate/mean"].item())
        assert len(client.get_metric_history(run.info.run_id, "client/001/eval/liked_hit_rate")) == row.rounds + 1
        assert (run.data.tags.get("fedrlhf.stopped_early") == "true") == (row.rounds < 3)
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"config.yaml", "metrics.jsonl", "learning_curves.png"} <= artifacts
        assert ("model" in artifacts) == (row.rounds == 3)
        # A trial's run directory holds what `fedrlhf run`'s does; Tune keeps its last round's
        # copy in the sweep directory (what `fedrlhf tune --resume` restores).
        (saved,) = (sweep_dir / f"tiny_{row.trial_id}").glob("checkpoint_*")
        saved = RunDir(saved)
        assert [r["round"] for r in saved.metrics()] == list(range(row.rounds + 1))
        assert saved.checkpoint_rounds()[0] == row.rounds
        assert (saved / "config.yaml").is_file() and (saved / "mlflow_run.json").is_file()
        assert sorted(p.name for p in (saved / "clients").iterdir()) == ["client-000000", "client-000001"]
        live = RunDir(run.data.tags["fedrlhf.run_dir"])  # the trial's own, where it ran
        if row.rounds == 3:  # the last round's report comes after the run completed
            assert saved.status() == live.status() == "completed"
            assert saved.read_json("summary.json")["rounds"] == 3 and "summary.json" in artifacts
        else:  # stopped by ASHA after its report: the live run and the kept copy both say so
            assert saved.status() == live.status() == "stopped"


@pytest.mark.slow
def test_interrupted_optuna_sweep_resumes(tmp_path, mlflow_server):
    """Ctrl-C after the first trial checkpointed, then ``--resume``: every trial completes,
    each MLflow round exactly once, and the sweep's parent run is the same."""
    from mlflow.tracking import MlflowClient

    path = write_sweep(
        tmp_path / "opt.yaml", name="opt", search_space={"shaping.lambda": {"uniform": [0.0, 2.0]}},
        search_alg={"type": "optuna"}, scheduler=None, max_concurrent=1, num_samples=2,
    )
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    out = tmp_path / "sweeps"
    args = [sys.executable, "-m", "fedrlhf_ray.cli", "tune"]
    proc = subprocess.Popen([*args, str(path), "--tracking-uri", mlflow_server, "--out", str(out)],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not list(out.glob("*/opt_*/checkpoint_*")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert proc.poll() is None, "the sweep ended before it could be interrupted"
        proc.send_signal(signal.SIGINT)  # Ctrl-C; SIGTERM takes the same path (tests/test_tracking.py)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()  # whatever failed above, no sweep outlives the test
    assert proc.returncode == 130 and "resume with: fedrlhf tune --resume" in err, err[-2000:]
    assert not list(out.glob("*/best.json")), "an interrupted sweep has no result"
    (sweep_dir,) = out.iterdir()
    parent_id = json.loads((sweep_dir / "mlflow_run.json").read_text())["run_id"]
    client = MlflowClient(mlflow_server)
    assert client.get_run(parent_id).info.status == "KILLED"

    resumed = subprocess.run([*args, "--resume", str(sweep_dir)], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    trials = pd.read_csv(sweep_dir / "trials.csv")
    assert len(trials) == 2 and (trials["rounds"] == 3).all()
    assert client.get_run(parent_id).info.status == "FINISHED"
    exp = client.get_experiment_by_name("opt")
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    assert len(children) == 2 and all(r.info.status == "FINISHED" for r in children)
    for run in children:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "fed/round")]
        assert sorted(steps) == [0, 1, 2, 3]
    assert yaml.safe_load((sweep_dir / "sweep.yaml").read_text())["search_alg"] == {"type": "optuna"}


@pytest.mark.slow
def test_a_sweep_whose_trials_all_fail_is_one_line_and_closes_its_runs(tmp_path, mlflow_server, shared_data):
    """The base experiment is sound, but every trial's data path is not: exit 2 (a user error)
    with one line naming the first trial's error; the sweep's parent run ends FAILED and no
    trial run is left RUNNING (a trial that dies before its first round leaves no MLflow run)."""
    from mlflow.tracking import MlflowClient

    from tests.conftest import fedrlhf_cli

    real = shared_data / "ml-latest-small"
    path = write_sweep(
        tmp_path / "bad.yaml", name="bad", scheduler=None, num_samples=1,
        overrides={"env.name": "movielens", "env.data.dataset": "ml-latest-small", "env.data.path": str(real),
                   "clients.num_clients": 2, "ray.num_workers": 1, "federation.rounds": 1},
        search_space={"env.data.path": {"choice": [str(tmp_path / "missing")]}},
    )
    proc = fedrlhf_cli("tune", str(path), "--tracking-uri", mlflow_server, "--out", str(tmp_path / "sweeps"),
                       cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("fedrlhf: error: sweep bad: no trial reported eval/liked_hit_rate/mean"), last
    assert "resume with" not in proc.stderr  # it ran to the end
    (sweep_dir,) = (tmp_path / "sweeps").iterdir()
    client = MlflowClient(mlflow_server)
    parent_id = json.loads((sweep_dir / "mlflow_run.json").read_text())["run_id"]
    assert client.get_run(parent_id).info.status == "FAILED"
    exp = client.get_experiment_by_name("bad")
    assert str(tmp_path / "missing") in last
    from mlflow.entities import ViewType

    children = f"tags.mlflow.parentRunId = '{parent_id}'"
    assert client.search_runs([exp.experiment_id], children) == []
    every = client.search_runs([exp.experiment_id], children, run_view_type=ViewType.ALL)
    assert all(r.info.status == "FAILED" for r in every)


def test_every_path_field_of_every_task_is_made_absolute_for_trials(tmp_path):
    """Trials run in their own folders: relative data paths of every task become absolute; a model
    field holding a Hugging Face name (no such folder here) is left alone."""
    from fedrlhf_ray.sweeps.runner import _absolute_paths
    from fedrlhf_ray.tasks import all_tasks

    (tmp_path / "models" / "gpt2-local").mkdir(parents=True)
    raw = {"env": {"data": {"path": "data/ml", "cache_dir": "~/cache"}, "imdb": {"path": "data/imdb", "cache_dir": "c"}},
           "lm": {"pretrained": "models/gpt2-local", "sentiment": {"pretrained": "lvwerra/distilbert-imdb"}}}
    out = _absolute_paths(raw, tmp_path)
    assert out["env"]["data"]["path"] == str(tmp_path / "data" / "ml")
    assert out["env"]["data"]["cache_dir"] == "~/cache"  # expanded by the loader, in the trial
    assert out["env"]["imdb"] == {"path": str(tmp_path / "data" / "imdb"), "cache_dir": str(tmp_path / "c")}
    assert out["lm"]["pretrained"] == str(tmp_path / "models" / "gpt2-local")
    assert out["lm"]["sentiment"]["pretrained"] == "lvwerra/distilbert-imdb"
    assert raw["env"]["imdb"]["path"] == "data/imdb"  # the sweep's own copy is untouched
    fields = {f for t in all_tasks() for f in (*t.path_fields, *t.name_or_path_fields)}
    assert fields == {"env.data.path", "env.data.cache_dir", "env.imdb.path", "env.imdb.cache_dir",
                      "lm.pretrained", "lm.sentiment.pretrained"}
