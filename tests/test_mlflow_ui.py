"""The MLflow UI as a user sees it, in headless Chromium: a finished sweep on a tracking server,
and a local run served by ``fedrlhf ui``.

Needs Debian's ``chromium`` (``.ci/run`` installs it) and Playwright for Python (the
``browser`` fixture of ``tests/conftest.py``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT, TINY_OVERRIDES, fedrlhf_cli, free_port, wait_for_mlflow


@pytest.mark.slow
@pytest.mark.browser
def test_mlflow_ui_shows_the_sweep_its_trials_and_a_metric_chart(browser, finished_sweep, tmp_path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(finished_sweep["uri"])
    exp = client.get_experiment_by_name("tiny")
    parent_id = json.loads((finished_sweep["dir"] / "mlflow_run.json").read_text())["run_id"]
    trials = [r.info.run_name for r in client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")]
    assert len(trials) == 4

    page = browser.new_page(viewport={"width": 1600, "height": 1100})
    page.set_default_timeout(60_000)
    page.goto(f"{finished_sweep['uri']}/#/experiments/{exp.experiment_id}/runs"
              "?workflowType=machine_learning&compareRunsMode=CHART")
    page.get_by_text("5 matching runs").wait_for()  # the sweep's parent run and its 4 trials
    assert page.get_by_text("tiny", exact=True).first.is_visible()  # experiment (breadcrumb) and parent run
    # The trials are nested under the sweep's run: expand it.
    page.get_by_role("row").filter(has_text="tiny").first.locator("button").first.click()
    for name in trials:
        page.get_by_text(name, exact=True).wait_for()
    page.get_by_placeholder("Search metric charts").fill("eval/liked_hit_rate/mean")
    chart = page.locator("div").filter(has_text="eval/liked_hit_rate/mean").filter(has=page.locator("svg.main-svg")).last
    chart.wait_for()
    page.get_by_text("Step", exact=True).first.wait_for()  # a line chart over rounds, not just a bar
    for name in trials:  # every trial is a series (legend entry) of that chart
        page.get_by_text(f"{name} (eval/liked_hit_rate/mean)").first.wait_for(state="attached")
    assert page.locator("svg.main-svg").count() >= 2
    shot = tmp_path / "mlflow_ui_sweep.png"
    page.screenshot(path=str(shot))
    assert shot.stat().st_size > 20_000
    print(f"screenshot: {shot}")
    page.close()


@pytest.mark.slow
@pytest.mark.browser
def test_fedrlhf_ui_shows_a_local_run_its_metrics_and_artifacts(browser, tmp_path):
    """The embedded default as a user meets it: `fedrlhf run` writes ./mlflow.db and
    ./mlartifacts, and `fedrlhf ui` in that folder serves the run, its charts and its files."""
    from mlflow.tracking import MlflowClient

    overrides = {**TINY_OVERRIDES, "federation.rounds": 2, "tracking.experiment": "local"}
    sets = [a for k, v in overrides.items() for a in ("--set", f"{k}={v}")]
    proc = fedrlhf_cli("run", str(REPO_ROOT / "tune_configs" / "quickstart.yaml"), *sets, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("local")
    (run,) = client.search_runs([exp.experiment_id])

    port = free_port()
    log = tmp_path / "ui.log"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    with log.open("w") as out:
        ui = subprocess.Popen([sys.executable, "-m", "fedrlhf_ray.cli", "ui", "--port", str(port)],
                              cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        uri = f"http://127.0.0.1:{port}"
        wait_for_mlflow(uri, ui, log)
        page = browser.new_page(viewport={"width": 1500, "height": 1100})
        page.set_default_timeout(60_000)
        page.goto(f"{uri}/#/experiments/{exp.experiment_id}/runs/{run.info.run_id}/model-metrics")
        name = run.info.run_name
        # a chart per metric, the per-client series first, the global ones found by search
        page.get_by_text(f"{name} (client/000/eval/liked_hit_rate)", exact=True).first.wait_for()
        page.get_by_placeholder("Search metric charts").fill("eval/liked_hit_rate/")
        for series in ("eval/liked_hit_rate/mean", "eval/liked_hit_rate/worst_decile"):
            page.get_by_text(f"{name} ({series})", exact=True).first.wait_for()
        page.goto(f"{uri}/#/experiments/{exp.experiment_id}/runs/{run.info.run_id}/artifacts")
        for name in ("config.yaml", "metrics.jsonl", "learning_curves.png", "model"):
            page.get_by_text(name, exact=True).first.wait_for()
        page.get_by_text("learning_curves.png", exact=True).first.click()
        # the plot is read from ./mlartifacts through the UI and shown as a decoded image
        page.get_by_text(f"Path: {(tmp_path / 'mlartifacts').as_uri()}").first.wait_for()
        image = page.locator("img[src^='blob:'] >> visible=true").first
        image.wait_for()
        assert image.evaluate("img => img.complete && img.naturalWidth") > 500
        shot = tmp_path / "mlflow_ui_run.png"
        page.screenshot(path=str(shot))
        print(f"screenshot: {shot}")
        page.close()
    finally:
        ui.terminate()
        ui.wait(timeout=30)
