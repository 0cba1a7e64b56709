"""The MLflow UI of a finished sweep, as a user sees it, in headless Chromium.

Needs Debian's ``chromium`` (``.ci/run`` installs it) and Playwright for Python; browsers
cannot be downloaded here, so Playwright drives ``/usr/bin/chromium``.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

CHROMIUM = os.environ.get("FEDRLHF_CHROMIUM", "/usr/bin/chromium")


@pytest.fixture(scope="module")
def browser():
    if not shutil.which(CHROMIUM):
        if os.environ.get("FEDRLHF_REQUIRE_DATA", "").strip() == "1":  # CI: never skip
            pytest.fail(f"no Chromium at {CHROMIUM} (install Debian's chromium)")
        pytest.skip(f"no Chromium at {CHROMIUM}")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking"],
        )
        yield chromium
        chromium.close()


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
