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
from fedrlhf_ray.report import Interval, find_runs, group_runs, paired_differences, personal_vs_global, summarise
from fedrlhf_ray.report.docs import stale_tables
from fedrlhf_ray.rundir import RunDir
from tests.conftest import REPO_ROOT

HIT = "eval/liked_hit_rate/mean"
GLOBAL_HIT = "eval_global/liked_hit_rate/mean"
URI = "sqlite:///unused.db"  # no source below is an MLflow experiment
# Final liked-hit by (baseline, seed): the federated runs are 0.1 better, plus a seed effect.
FINAL = {("federated", s): 0.5 + 0.01 * s for s in range(3)} | {("local", s): 0.4 + 0.012 * s for s in range(3)}


def fake_run(path, baseline: str, seed: int, state: str = "completed", lam: float = 1.0) -> RunDir:
    """A run directory as ``fedrlhf run`` leaves it, with made-up metrics (the report only reads)."""
    path.mkdir(parents=True)
    rd = RunDir(path)
    cfg = validate_config({"seed": seed, "federation": {"baseline": baseline, "rounds": 2},
                           "tracking": {"enabled": seed % 2 == 0}, "shaping": {"lambda": lam}})
    rd.write_config(cfg.to_dict())
    final = FINAL.get((baseline, seed), 0.0)
    # The federated runs fine-tune: their clients also evaluate the global model, 0.05 worse
    # for clients 0–2 and 0.05 better for client 3.
    personal = baseline == "federated"
    rows = [{"round": r, HIT: final * r / 2, "fed/round_seconds": 1.0, "fed/env_steps": 100.0 * (r > 0),
             "eval/spearman/mean": 0.1 * lam + 0.01 * seed, "eval/engagement_rate/mean": 0.6 - 0.1 * lam,
             **({GLOBAL_HIT: final * r / 2 - 0.05} if personal else {})} for r in range(3)]
    clients = [{"round": 2, "client": c, "kind": "eval", "eval/liked_hit_rate": final + 0.01 * c,
                **({"eval_global/liked_hit_rate": final + 0.01 * c + (0.05 if c == 3 else -0.05)} if personal else {})}
               for c in range(4)]
    rd.append_metrics(rows, clients)
    rd.write_status(state, rounds=2)
    return rd


def find(*sources):
    return find_runs([str(s) for s in sources], URI)


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
    groups = group_runs(find(runs))  # the interrupted run is not one of them
    assert list(groups) == ["federation.baseline=federated", "federation.baseline=local"]
    assert [[r.seed for r in g] for g in groups.values()] == [[0, 1, 2], [0, 1, 2]]


def test_each_group_has_its_mean_and_student_t_interval_over_seeds(runs):
    rows = {(r["group"], r["metric"]): r for r in summarise(group_runs(find(runs)))}
    row = rows[("federation.baseline=federated", HIT)]
    values = [FINAL[("federated", s)] for s in range(3)]
    half = stats.t.ppf(0.975, 2) * np.std(values, ddof=1) / math.sqrt(3)
    assert row["n"] == 3 and row["mean"] == pytest.approx(np.mean(values))
    assert (row["low"], row["high"]) == pytest.approx((np.mean(values) - half, np.mean(values) + half))
    assert Interval.of([0.3]).text() == "0.300" and Interval.of([]).n == 0


def test_paired_differences_pair_runs_by_seed(runs):
    groups = group_runs(find(runs))
    (row,) = [r for r in paired_differences(groups, "federation.baseline=local") if r["metric"] == HIT]
    diffs = [FINAL[("federated", s)] - FINAL[("local", s)] for s in range(3)]
    assert row["n"] == 3 and row["mean"] == pytest.approx(np.mean(diffs))
    # Paired by seed the seed effect cancels: the interval is far narrower than the groups'.
    assert row["high"] - row["low"] < 0.02 and row["low"] > 0.09
    # Per client: federated wins all 3 seeds × 4 clients; a sign test of 12 of 12.
    assert (row["client_pairs"], row["client_wins"]) == (12, 1.0)
    assert row["sign_p"] == pytest.approx(2 * 0.5**12)


def test_personalized_is_compared_with_the_global_model_of_the_same_runs(runs):
    groups = group_runs(find(runs))
    (row,) = [r for r in personal_vs_global(groups) if r["metric"] == HIT]
    assert row["group"] == "federation.baseline=federated" and row["reference"] == "global model"
    assert row["n"] == 3 and row["mean"] == pytest.approx(0.05)
    # 3 seeds × 4 clients: clients 0–2 gain from fine-tuning, client 3 loses.
    assert (row["client_pairs"], row["client_wins"]) == (12, pytest.approx(9 / 12))
    assert row["sign_p"] == pytest.approx(stats.binomtest(9, 12, 0.5).pvalue)


def test_fedrlhf_report_writes_markdown_html_csv_and_json(runs, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["report", str(runs), "--out", str(out), "--reference", "federation.baseline=local"]) == 0
    printed = capsys.readouterr().out
    assert "## Paired differences against federation.baseline=local" in printed
    assert {p.name for p in out.iterdir()} == {"report.md", "report.html", "report.csv", "report.json", "runs.json",
                                               "curves.png", "clients.png", "wins.png", "trade_off.png",
                                               "sample_complexity.png"}
    record = json.loads((out / "report.json").read_text())
    assert record["provenance"]["command"].startswith("fedrlhf report ")
    assert "1 more run(s) repeat an experiment and seed already counted: left out." in printed
    assert len(record["groups"]["federation.baseline=federated"]) == 3
    page = (out / "report.html").read_text()
    assert "data:image/png;base64," in page and "<table>" in page
    assert (out / "curves.png").read_bytes().startswith(b"\x89PNG")


def test_bad_sources_and_references_are_one_line(runs, tmp_path):
    with pytest.raises(UserError, match="no finished run in"):
        find(tmp_path / "sweep" / "cut-short")
    with pytest.raises(UserError, match="is not a folder"):
        find(tmp_path / "nowhere")
    os.symlink("/etc", runs / "planted")
    with pytest.raises(UserError, match="planted is a link; the report reads no file through a link"):
        find(runs)
    (runs / "planted").unlink()
    config = runs / "trial-local-0" / "run" / "config.yaml"
    config.write_text(config.read_text().replace("seed: 0", "seed: abc"))
    with pytest.raises(UserError, match="has seed 'abc', not an integer"):
        find(runs)
    (runs / "trial-local-0" / "run" / "config.yaml").write_text("a: [")
    with pytest.raises(UserError, match="is not readable YAML"):
        find(runs)


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
    assert page.locator("table").count() == 3  # final metrics, paired, personalized − global
    assert page.get_by_text("Paired differences against federation.baseline=local", exact=False).count() == 1
    images = page.locator("img")
    assert images.count() == 5  # curves, per-client violins, win rates, trade-off, sample complexity: inline
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
    # The same runs, read from the MLflow experiment (each trial's run files are its artifacts).
    tracked = tmp_path / "tracked"
    assert main(["report", "mlflow:tiny", "--tracking-uri", finished_sweep["uri"], "--out", str(tracked)]) == 0
    again = json.loads((tracked / "report.json").read_text())
    assert {len(m) for m in again["groups"].values()} == {len(m) for m in record["groups"].values()}
    assert again["summary"] == record["summary"]


def test_a_report_keeps_its_runs_summaries_and_makes_the_same_tables_from_them(runs, tmp_path):
    out = tmp_path / "results" / "baselines"
    assert main(["report", str(runs), "--out", str(out), "--reference", "federation.baseline=local"]) == 0
    kept = json.loads((out / "runs.json").read_text())
    assert kept["reference"] == "federation.baseline=local" and len(kept["runs"]) == 7  # each finished run
    assert os.path.getsize(out / "runs.json") < 7 * 5_000  # per run its config, rounds and clients: a few kB
    again = tmp_path / "again"
    assert main(["report", str(out), "--out", str(again), "--reference", "federation.baseline=local"]) == 0
    for name in ("summary", "paired", "personal"):
        first, second = (json.loads((d / "report.json").read_text())[name] for d in (out, again))
        assert first == second and first, name
    before = (out / "report.md").read_text()
    assert main(["report", "--from", str(tmp_path / "results")]) == 0  # made again, in place
    after = (out / "report.md").read_text()
    assert after.split("## Groups")[1] == before.split("## Groups")[1]
    assert "made again from their summaries by `fedrlhf report --from" in after


def test_report_from_results_rewrites_the_docs_marked_tables(runs, tmp_path, capsys):
    root = tmp_path / "project"
    out = root / "results" / "baselines"
    assert main(["report", str(runs), "--out", str(out), "--reference", "federation.baseline=local"]) == 0
    marker = "<!-- report results/baselines paired eval/liked_hit_rate/mean -->\n| stale |\n<!-- /report -->"
    (root / "docs").mkdir()
    (root / "README.md").write_text(f"# Project\n\n{marker}\n\nAfter.\n")
    (root / "docs" / "results.md").write_text("<!-- report results/baselines summary -->\n<!-- /report -->\n")
    assert stale_tables(root) == ["README.md", "docs/results.md"]
    capsys.readouterr()
    assert main(["report", "--from", str(root / "results"), "--docs"]) == 0
    assert f"rewrote the tables of {root / 'README.md'}" in capsys.readouterr().out
    readme = (root / "README.md").read_text()
    assert readme.startswith("# Project\n\n<!-- report results/baselines paired") and readme.endswith("After.\n")
    (line,) = [row for row in readme.splitlines() if row.startswith("| federation.baseline=federated")]
    assert "| eval/liked_hit_rate/mean | 3 | 0.098 [0.093, 0.103] | 100% of 12 |" in line
    assert "| federation.baseline=local | eval/liked_hit_rate/mean | 3 |" in (root / "docs" / "results.md").read_text()
    assert stale_tables(root) == []
    (root / "README.md").write_text(readme.replace("0.098 [", "0.198 ["))
    assert stale_tables(root) == ["README.md"]  # a table edited by hand is caught


def test_the_docs_tables_are_what_the_committed_summaries_make():
    """The README's and docs' tables of results over seeds carry a marker and are made by
    ``fedrlhf report --from results/ --docs`` from the committed ``results/*/runs.json``."""
    assert stale_tables(REPO_ROOT) == [], "run: fedrlhf report --from results/ --docs"
    marked = [p for p in [REPO_ROOT / "README.md", REPO_ROOT / "docs" / "results.md"]
              if "<!-- report results/" in p.read_text()]
    assert len(marked) == 2



def test_the_claims_quote_the_intervals_the_committed_reports_hold():
    """Each interval the README and the results page quote in their prose ("+0.008 [−0.018,
    0.034]") is one the committed reports' tables hold."""
    import re

    prose = "".join((REPO_ROOT / name).read_text() for name in ("README.md", "docs/results.md"))
    quoted = re.findall(r"([+−-]?\d\.\d{3}) \[([−-]?\d\.\d{3}), ([−-]?\d\.\d{3})\]", prose)
    assert len(quoted) >= 10
    made = "".join(p.read_text() for p in (REPO_ROOT / "results").glob("*/report.md"))
    for mean, low, high in quoted:
        text = f"{float(mean.replace('−', '-')):.3f} [{low.replace('−', '-')}, {high.replace('−', '-')}]"
        assert text in made, text


@pytest.mark.parametrize("args, message", [
    (["--from", "results", "somewhere"], "give it without SOURCE, --out or --reference"),
    (["--docs", "somewhere"], "use it with --from RESULTS"),
    ([], "give the runs to report (SOURCE…), or --from RESULTS"),
    (["--from", "nowhere"], "--from nowhere is not a folder"),
])
def test_report_arguments_that_do_not_go_together_are_one_line(args, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "results").mkdir()
    (tmp_path / "somewhere").mkdir()
    assert main(["report", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


@pytest.mark.parametrize("damage, message", [
    ("{", "is not a run summary file (JSONDecodeError)"),
    ('{"provenance": {}, "reference": null, "runs": [{"path": "x"}]}', "is not a run summary file (ValidationError)"),
    ('{"provenance": {}, "reference": null, "runs": [{"path": "x", "config": {"seed": "a"}, "rows": [], '
     '"clients": {}}]}', "non-integer seed or round"),
    ("[" * 100_000, "is not a run summary file"),
])
def test_a_damaged_summary_file_is_one_line(damage, message, tmp_path, capsys):
    (tmp_path / "results" / "r").mkdir(parents=True)
    (tmp_path / "results" / "r" / "runs.json").write_text(damage)
    for args in (["--from", str(tmp_path / "results")], [str(tmp_path / "results" / "r")]):
        assert main(["report", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err


def test_a_docs_marker_naming_no_report_or_table_is_one_line(runs, tmp_path, capsys):
    root = tmp_path / "project"
    assert main(["report", str(runs), "--out", str(root / "results" / "r")]) == 0
    for marker, message in [("results/gone summary", "names results/gone, which holds no runs.json"),
                            ("results/r means", "names table 'means'; the tables are summary, paired, personal")]:
        (root / "README.md").write_text(f"<!-- report {marker} -->\n<!-- /report -->\n")
        capsys.readouterr()
        assert main(["report", "--from", str(root / "results"), "--docs"]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err


@pytest.mark.parametrize("uri, message", [
    ("sqlite:///{tmp}/none.db", "no MLflow store at sqlite:///"),
    ("ftp://example.org/x", "ftp:// is not an MLflow tracking store"),
    ("http://127.0.0.1:9", "no MLflow server answers"),
])
def test_an_mlflow_source_in_a_store_that_is_not_there_is_one_line(uri, message, tmp_path, capsys):
    assert main(["report", "mlflow:x", "--tracking-uri", uri.format(tmp=tmp_path), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert not (tmp_path / "none.db").exists() and not (tmp_path / "r").exists()


def test_an_unknown_mlflow_experiment_names_those_there_are(tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(uri).create_experiment("mine", artifact_location=str(tmp_path / "art"))
    assert main(["report", "mlflow:theirs", "--tracking-uri", uri, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert "MLflow experiment 'theirs' is not in" in err and "it has: " in err and "mine" in err


def test_utility_is_drawn_against_the_privacy_spent(tmp_path):
    # Two groups (told apart by λ here) that spent ε = 8 and ε = 2 in a last round.
    for lam, eps in ((0.5, 8.0), (1.0, 2.0)):
        for seed in (0, 1):
            rd = fake_run(tmp_path / "sweep" / f"dp-{lam}-{seed}", "federated", seed, lam=lam)
            rd.append_metrics([{"round": 3, HIT: 0.3 / lam, "privacy/epsilon": eps}], [])
    out = tmp_path / "report"
    assert main(["report", str(tmp_path / "sweep"), "--out", str(out)]) == 0
    assert (out / "epsilon.png").read_bytes().startswith(b"\x89PNG")
    record = json.loads((out / "report.json").read_text())
    eps = {r["group"]: r["mean"] for r in record["summary"] if r["metric"] == "privacy/epsilon"}
    assert eps == {"shaping.lambda=0.5": 8.0, "shaping.lambda=1.0": 2.0}


def test_groups_that_differ_in_one_number_are_drawn_against_it(tmp_path, capsys):
    """A λ sweep: the final metrics and wall time against λ, and the task's trade-off
    (engagement against Spearman) one point per λ."""
    for lam in (0.0, 0.5, 2.0):
        for seed in (0, 1):
            fake_run(tmp_path / "sweep" / f"lam-{lam}-{seed}", "federated", seed, lam=lam)
    out = tmp_path / "report"
    assert main(["report", str(tmp_path / "sweep"), "--out", str(out), "--reference", "shaping.lambda=0.0"]) == 0
    assert {"against_setting.png", "trade_off.png"} <= {p.name for p in out.iterdir()}
    assert "## Final metrics and wall time against shaping.lambda" in capsys.readouterr().out
    record = json.loads((out / "report.json").read_text())
    (row,) = [r for r in record["paired"] if r["group"] == "shaping.lambda=2.0" and r["metric"] == "eval/spearman/mean"]
    assert row["mean"] == pytest.approx(0.2) and row["n"] == 2
