"""Reports over runs: each group of runs that differ only in their seed, summarised over its seeds.

``fedrlhf report SOURCE… [--out DIR] [--reference GROUP]`` reads finished runs — run
directories, folders holding some (a sweep directory), report folders (their ``runs.json``) or
``mlflow:EXPERIMENT`` — groups them by their config minus the seed and the settings that only
say where or how a run ran (data paths, tracking, Ray), and writes into ``--out``:

* ``report.json`` and ``report.csv``: every number below;
* ``report.md``: per group and final metric, the mean over seeds with its 95 % interval
  (Student t with n − 1 degrees of freedom; none with one seed); against the reference group,
  the paired difference (other − reference, runs paired by seed) with its interval and the
  number of pairs, and per client (where runs kept per-client rows) the share of (seed, client)
  pairs the other group wins with a two-sided sign test; where clients evaluated the global
  model beside their own (fine-tuning), personalized − global the same way;
* ``report.html``: the same tables and every figure in one self-contained page (the figures
  also as PNG): learning curves with bands, per-client violins (global beside personalized),
  per-client win rates, the task's trade-off, the headline metric against the env steps and
  feedback queries spent and, where groups spent a privacy budget, against ε, and, where the
  groups differ in one numeric setting (λ, K), the final metrics and wall time against it;
* ``runs.json``: the runs' small summaries (final and per-round means, each client's last
  evaluation, the config), which ``fedrlhf report --from results/ [--docs]`` makes every report
  again from, rewriting the docs' marked tables (:mod:`fedrlhf_ray.report.docs`).

A source that is a tracked sweep directory also gets the files as artifacts (``report/``) of
the sweep's parent MLflow run.

Modules: ``runs`` (reading runs and summaries), ``statistics`` (groups, intervals, paired
differences), ``figures``, ``pages`` (the files), ``docs`` (the docs' tables), ``make`` (the
command's two jobs).
"""

from fedrlhf_ray.report.make import Made, regenerate, report_runs
from fedrlhf_ray.report.runs import MLFLOW_SOURCE, Run, find_runs
from fedrlhf_ray.report.statistics import Interval, group_runs, paired_differences, personal_vs_global, summarise

__all__ = ["MLFLOW_SOURCE", "Interval", "Made", "Run", "find_runs", "group_runs", "paired_differences",
           "personal_vs_global", "regenerate", "report_runs", "summarise"]
