"""The IMDb language-model task: tokenizer and small GPT-2 (``prepare``), sentiment reward models,
the PPO policy module and learner, the local trainer, evaluation metrics and sample generations.

This module is the task's entry in the registry and imports nothing heavy.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from fedrlhf_ray.tasks import CurvePanel, ResultTable

if TYPE_CHECKING:
    import numpy as np

    from fedrlhf_ray.local_trainer import LocalTrainer
    from fedrlhf_ray.schema import ExperimentConfig
    from fedrlhf_ray.tasks.text.samples import SampleWriter

TEXT_METRICS = (
    ("sentiment", "sentiment (own reward model)"),
    ("sentiment_independent", "sentiment (independent judge)"),
    ("fluency", "fluency (1 − NLL/ln V)"),
    ("reward", "reward λ·s + (1−λ)·f"),
    ("kl_to_reference", "KL to reference (nats/sequence)"),
    ("perplexity_reference", "perplexity under reference"),
    ("distinct_2", "distinct-2"),
)
NAN = float("nan")


class TextTask:
    name = "text"
    env_names = ("imdb",)
    path_fields = ("env.imdb.path", "env.imdb.cache_dir")
    # A folder or a model name in the local Hugging Face cache.
    name_or_path_fields = ("lm.pretrained", "lm.sentiment.pretrained")
    curve_panels = (
        CurvePanel("eval/sentiment_independent", "held-out sentiment (independent judge)"),
        CurvePanel("eval/fluency", "held-out fluency (1 − NLL/ln V)"),
        CurvePanel("eval/kl_to_reference", "KL to the reference (nats/sequence)"),
        CurvePanel("train/episode_return_mean", "training return λ·s + (1−λ)·f"),
    )
    headline_metric = "eval/sentiment_independent/mean"
    report_metrics = ("eval/sentiment_independent", "eval/sentiment_lexicon", "eval/fluency", "eval/kl_to_reference")
    trade_off = ("eval/kl_to_reference", "eval/sentiment_independent")
    prepares = True
    datasets = ("imdb",)

    def check_config(self, cfg: ExperimentConfig) -> None:
        imdb, lm = cfg.imdb(), cfg.language_model()
        if lm.n_embd % lm.n_head:
            raise ValueError(f"lm.n_embd: got {lm.n_embd} — must be a multiple of lm.n_head ({lm.n_head})")
        window = imdb.prompt_tokens + imdb.generate_tokens
        if lm.pretrained is None and window > lm.context:
            raise ValueError(
                f"env.imdb.generate_tokens: got {imdb.generate_tokens} — env.imdb.prompt_tokens "
                f"({imdb.prompt_tokens}) + generate_tokens = {window} must fit lm.context ({lm.context})"
            )
        if lm.sentiment.feedback == "preferences" and lm.sentiment.pretrained is not None:
            raise ValueError(
                "lm.sentiment.feedback: got 'preferences' — a pretrained scorer (lm.sentiment.pretrained) "
                "is not fitted, so it learns from no feedback; use feedback: labels or unset pretrained"
            )

    def check_data(self, cfg: ExperimentConfig, *, announce: bool = False) -> None:
        from fedrlhf_ray.tasks.text.clients import build_imdb_shards
        from fedrlhf_ray.tasks.text.prepare import prepare

        build_imdb_shards(cfg)
        prepare(cfg, progress=announce and sys.stderr.isatty(), announce=announce)  # a no-op once prepared

    def build_trainer(self, cfg: ExperimentConfig, host_index: int, num_hosts: int) -> LocalTrainer:
        from fedrlhf_ray.tasks.text.trainer import build_host_trainer

        return build_host_trainer(cfg, host_index, num_hosts)

    def round_artifacts(self, cfg: ExperimentConfig) -> SampleWriter:
        from fedrlhf_ray.tasks.text.samples import SampleWriter

        return SampleWriter(cfg)

    def tags(self, cfg: ExperimentConfig) -> dict[str, str]:
        return {"fedrlhf.dataset": "imdb"}

    def summary(self, final: dict[str, float]) -> dict[str, Any]:
        return {}

    def progress(self, metrics: dict[str, float], last_eval: dict[str, float]) -> str:
        return (
            f"sentiment {last_eval.get('eval/sentiment_independent/mean', NAN):.3f}"
            f" · fluency {last_eval.get('eval/fluency/mean', NAN):.3f}"
            f" · KL {last_eval.get('eval/kl_to_reference/mean', NAN):.2f}"
        )

    def result_table(self, initial: dict[str, float], final: dict[str, float], rounds: int,
                     num_clients: int, summary: dict[str, Any]) -> ResultTable:
        table = ResultTable(
            f"held-out prompts of {num_clients} client(s) (mean · worst decile)",
            ("metric", "round 0", f"round {rounds}"),
        )
        for key, label in TEXT_METRICS:
            table.rows.append((label, *(
                f"{m.get(f'eval/{key}/mean', NAN):.3f} · {m.get(f'eval/{key}/worst_decile', NAN):.3f}"
                for m in (initial, final)
            )))
        return table

    def audit_problem(self, cfg: ExperimentConfig) -> str | None:
        return (
            "env.name is 'imdb' — the audit's attacks read the item-embedding rows of the recommendation "
            "tasks (synthetic, movielens); it has no attack on a language model's update"
        )

    def audit_members(self, cfg: ExperimentConfig, n_items: int) -> dict[int, np.ndarray]:
        raise ValueError(f"audit: {self.audit_problem(cfg)}")

    def prepare(self, cfg: ExperimentConfig) -> ResultTable:
        from fedrlhf_ray.tasks.text.prepare import is_prepared, prepare

        cached = is_prepared(cfg)
        folder, report = prepare(cfg, progress=True)
        table = ResultTable(f"IMDb models ({'cached' if cached else 'prepared'}) in {folder}", ("", "value"))
        pre, judge = report.get("pretrain"), report["judge"]
        if pre is not None:
            table.rows += [
                ("GPT-2 parameters", f"{pre['parameters']:,}"),
                ("pre-training tokens seen / corpus", f"{pre['tokens_seen']:,} / {pre['corpus_tokens']:,}"),
                ("held-out perplexity (before → after)",
                 f"{pre['heldout_perplexity_initial']:.1f} → {pre['heldout_perplexity']:.1f}"),
                ("tokenizer + pre-training seconds", f"{report['tokenizer_seconds'] + report['pretrain_seconds']:.0f}"),
            ]
        table.rows += [
            (f"judge accuracy ({judge['test_reviews']:,} held-out reviews no client holds)",
             f"{judge['test_accuracy']:.3f}"),
            ("total seconds", f"{report['seconds']:.0f}"),
        ]
        return table

    def data_info(self, dataset: str, options: dict[str, Any]) -> ResultTable:
        from envs.data.imdb import load_imdb

        data = load_imdb(options["path"], cache_dir=options["cache_dir"], download=options["download"])
        table = ResultTable(f"imdb ({data.source})", ("split / label", "reviews"))
        table.rows += [(key.replace("_", " / "), f"{value:,}") for key, value in data.counts().items()]
        return table


TASK = TextTask()
