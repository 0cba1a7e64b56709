"""``fedrlhf report``: runs grouped by their config minus the seed, intervals over seeds, paired
differences against a reference group, and the files it writes (``fedrlhf_ray.report``)."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
from scipy import stats

from fedrlhf_ray.cli import main
from fedrlhf_ray.config import validate_config
from fedrlhf_ray.errors import UserError
from fedrlhf_ray.report import Interval, find_runs, group_runs, paired_differences, summarise
from fedrlhf_ray.rundir import RunDir

HIT = "eval/liked_hit_rate/mean"
# Final liked-hit by (baseline, seed): the federated runs are 0.1 better, plus a seed effect.
FINAL = {("federated", s): 0.5 + 0.01 * s for s in range(3)} | {("local", s): 0.4 + 0.012 * s for s in range(3)}


def fake_run(path, baseline: str, seed: int, state: str = "completed") -> RunDir:
    """A run directory as ``fedrlhf run`` leaves it, with made-up metrics (the report only reads)."""
    path.mkdir(parents=True)
    rd = RunDir(path)
    cfg = validate_config({"seed": seed, "federation": {"baseline": baseline, "rounds": 2},
                           "tracking": {"enabled": seed % 2 == 0}})
    rd.write_config(cfg.to_dict())
    final = FINAL.get((baseline, seed), 0.0)
    rows = [{"round": r, HIT: final * r / 2, "fed/round_seconds": 1.0} for r in range(3)]
    clients = [{"round": 2, "client": c, "kind": "eval", "eval/liked_hit_rate": final + 0.01 * c} for c in range(4)]
    rd.append_metrics(rows, clients)
    rd.write_status(state, rounds=2)
    return rd


@pytest.fixture
def runs(tmp_path):
    import shutil

    for (baseline, seed) in FINAL:
        fake_run(tmp_path / "sweep" / f"trial-{baseline}-{seed}" / "run", baseline, seed)
    fake_run(tmp_path / "sweep" / "cut-short", "federated", 9, state="interrupted")
    # Tune's checkpoint of a trial holds a copy of its run directory; a run repeated with the
    # same seed repeats its numbers: neither may count as another seed.
    trial = tmp_path / "sweep" / "trial-local-1"
    shutil.copytree(trial / "run", trial / "checkpoint_000002")
    fake_run(tmp_path / "sweep" / "again", "federated", 0)
    return tmp_path / "sweep"


def test_runs_are_grouped_by_their_config_minus_seed_and_where_they_ran(runs):
    groups = group_runs(find_runs([runs]))  # the interrupted run is not one of them
    assert list(groups) == ["federation.baseline=federated", "federation.baseline=local"]
    assert [[r.seed for r in g] for g in groups.values()] == [[0, 1, 2], [0, 1, 2]]


def test_each_group_has_its_mean_and_student_t_interval_over_seeds(runs):
    rows = {(r["group"], r["metric"]): r for r in summarise(group_runs(find_runs([runs])))}
    row = rows[("federation.baseline=federated", HIT)]
    values = [FINAL[("federated", s)] for s in range(3)]
    half = stats.t.ppf(0.975, 2) * np.std(values, ddof=1) / math.sqrt(3)
    assert row["n"] == 3 and row["mean"] == pytest.approx(np.mean(values))
    assert (row["low"], row["high"]) == pytest.approx((np.mean(values) - half, np.mean(values) + half))
    assert Interval.of([0.3]).text() == "0.300" and Interval.of([]).n == 0


def test_paired_differences_pair_runs_by_seed(runs):
    groups = group_runs(find_runs([runs]))
    (row,) = [r for r in paired_differences(groups, "federation.baseline=local") if r["metric"] == HIT]
    diffs = [FINAL[("federated", s)] - FINAL[("local", s)] for s in range(3)]
    assert row["n"] == 3 and row["mean"] == pytest.approx(np.mean(diffs))
    # Paired by seed the seed effect cancels: the interval is far narrower than the groups'.
    assert row["high"] - row["low"] < 0.02 and row["low"] > 0.09
    # Per client: federated wins all 3 seeds × 4 clients; a sign test of 12 of 12.
    assert (row["client_pairs"], row["client_wins"]) == (12, 1.0)
    assert row["sign_p"] == pytest.approx(2 * 0.5**12)


def test_fedrlhf_report_writes_markdown_html_csv_and_json(runs, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["report", str(runs), "--out", str(out), "--reference", "federation.baseline=local"]) == 0
    printed = capsys.readouterr().out
    assert "## Paired differences against federation.baseline=local" in printed
    assert {p.name for p in out.iterdir()} == {"report.md", "report.html", "report.csv", "report.json", "curves.png",
                                               "clients.png"}
    record = json.loads((out / "report.json").read_text())
    assert record["provenance"]["command"].startswith("fedrlhf report ")
    assert "1 more run(s) repeat an experiment and seed already counted: left out." in printed
    assert len(record["groups"]["federation.baseline=federated"]) == 3
    page = (out / "report.html").read_text()
    assert "data:image/png;base64," in page and "<table>" in page
    assert (out / "curves.png").read_bytes().startswith(b"\x89PNG")


def test_bad_sources_and_references_are_one_line(runs, tmp_path):
    with pytest.raises(UserError, match="no finished run under"):
        find_runs([tmp_path / "sweep" / "cut-short"])
    with pytest.raises(UserError, match="is not a folder"):
        find_runs([tmp_path / "nowhere"])
    os.symlink("/etc", runs / "planted")
    with pytest.raises(UserError, match="planted is a link; the report reads no file through a link"):
        find_runs([runs])
    (runs / "planted").unlink()
    config = runs / "trial-local-0" / "run" / "config.yaml"
    config.write_text(config.read_text().replace("seed: 0", "seed: abc"))
    with pytest.raises(UserError, match="has seed 'abc', not an integer"):
        find_runs([runs])
    (runs / "trial-local-0" / "run" / "config.yaml").write_text("a: [")
    with pytest.raises(UserError, match="is not readable YAML"):
        find_runs([runs])


def test_an_unknown_reference_group_names_the_groups(runs, tmp_path, capsys):
    assert main(["report", str(runs), "--out", str(tmp_path / "r"), "--reference", "centralized"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--reference 'centralized' is not a group; the groups are: federation.baseline=federated;" in err
    assert "\n" not in err and not (tmp_path / "r").exists()


def test_a_tracked_sweeps_report_is_logged_to_its_parent_mlflow_run(runs, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    parent = client.create_run(client.create_experiment("sweep", artifact_location=str(tmp_path / "art"))).info
    client.set_terminated(parent.run_id)
    (runs / "sweep.yaml").write_text("name: sweep\n")
    (runs / "mlflow_run.json").write_text(json.dumps({"tracking_uri": uri, "run_id": parent.run_id}))
    assert main(["report", str(runs), "--out", str(tmp_path / "report")]) == 0
    assert f"of the sweep's MLflow run {parent.run_id}" in capsys.readouterr().out
    logged = {a.path for a in client.list_artifacts(parent.run_id, "report")}
    assert {"report/report.md", "report/report.html", "report/report.json"} <= logged


@pytest.mark.browser
def test_the_report_page_shows_its_tables_and_curves_in_a_browser(runs, tmp_path, browser):
    out = tmp_path / "report"
    assert main(["report", str(runs), "--out", str(out), "--reference", "federation.baseline=local"]) == 0
    page = browser.new_page()
    page.goto((out / "report.html").as_uri())
    assert page.locator("table").count() == 2
    assert page.get_by_text("Paired differences against federation.baseline=local").count() == 1
    images = page.locator("img")
    assert images.count() == 2  # the curves and the per-client distributions, inline
    assert images.evaluate_all("imgs => imgs.every(img => img.complete && img.naturalWidth > 300)")
    page.close()


@pytest.mark.slow
def test_fedrlhf_report_over_a_real_sweep_directory(finished_sweep, tmp_path, capsys):
    """The session's tiny sweep (4 trials of the quickstart, tracked): its trials' run directories
    are the runs, Tune's checkpoint copies are not, and the report lands in the sweep's MLflow run."""
    from mlflow.tracking import MlflowClient

    out = tmp_path / "report"
    assert main(["report", str(finished_sweep["dir"]), "--out", str(out)]) == 0
    record = json.loads((out / "report.json").read_text())
    paths = [p for members in record["groups"].values() for p in members]
    assert paths and all(p.endswith("/run") for p in paths) and len(set(paths)) == len(paths)
    assert all(row["metric"] != "eval/liked_hit_rate/mean" or row["n"] == 1 for row in record["summary"])
    parent = json.loads((finished_sweep["dir"] / "mlflow_run.json").read_text())["run_id"]
    assert f"of the sweep's MLflow run {parent}" in capsys.readouterr().out
    logged = {a.path for a in MlflowClient(finished_sweep["uri"]).list_artifacts(parent, "report")}
    assert "report/report.html" in logged
