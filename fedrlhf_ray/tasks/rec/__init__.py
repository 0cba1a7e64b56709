"""The recommendation task (the paper's MovieLens task, and the synthetic world with known tastes).

Modules: ``clients`` (the K clients' data), ``feedback`` (simulated humans, queries), ``reward_model``
(H_k), ``policy`` (the slate scorer RLModule), ``ppo`` (its RLlib edge), ``trainer`` (the local
RLHF trainer), ``evaluation`` (held-out metrics). This module is the task's entry in the registry
and imports nothing heavy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fedrlhf_ray.schema import DATASETS
from fedrlhf_ray.tasks import CurvePanel, ResultTable

if TYPE_CHECKING:
    import numpy as np

    from fedrlhf_ray.local_trainer import LocalTrainer
    from fedrlhf_ray.schema import ExperimentConfig

# Rows of the result table under the liked-hit rate: (metric, label).
SUMMARY_METRICS = (
    ("engagement_rate", "engagement"),
    ("ndcg", "NDCG@k"),
    ("spearman", "Spearman ρ"),
    ("accuracy", "accuracy (liked)"),
)
NAN = float("nan")


def gap_closed(value: float, random: float, oracle: float) -> float:
    """Fraction of the random→oracle gap a policy's liked-hit rate closes."""
    return (value - random) / (oracle - random) if oracle > random else NAN


def _cell(m: dict[str, float], key: str) -> str:
    return f"{m.get(f'eval/{key}/mean', NAN):.3f} · {m.get(f'eval/{key}/worst_decile', NAN):.3f}"


class RecTask:
    name = "rec"
    env_names = ("synthetic", "movielens")
    path_fields = ("env.data.path", "env.data.cache_dir")
    name_or_path_fields: tuple[str, ...] = ()
    curve_panels = (
        CurvePanel("eval/liked_hit_rate", "held-out liked-hit rate", (
            ("eval/random_hit_rate/mean", "random", "grey"), ("eval/oracle_hit_rate/mean", "oracle", "green"),
        )),
        CurvePanel("eval/ndcg", "held-out NDCG@k"),
        CurvePanel("reward_model/heldout_pair_accuracy", "reward-model pair accuracy"),
        CurvePanel("train/episode_return_mean", "training return (R⁰ + λ·H)"),
    )
    headline_metric = "eval/liked_hit_rate/mean"
    report_metrics = ("eval/liked_hit_rate", "eval/ndcg", "eval/spearman", "eval/engagement_rate")
    trade_off = ("eval/spearman", "eval/engagement_rate")  # taste against engagement (λ)
    prepares = False
    datasets = DATASETS

    def check_config(self, cfg: ExperimentConfig) -> None:
        if cfg.env.name != "synthetic":
            return
        env, syn = cfg.slate_env(), cfg.synthetic()
        most = syn.n_items - env.slate_size
        if syn.items_per_user > most:
            raise ValueError(
                f"env.synthetic.items_per_user: got {syn.items_per_user} — at most env.synthetic.n_items "
                f"({syn.n_items}) - env.slate_size ({env.slate_size}) = {most}: a slate is filled with items "
                "the user never watched"
            )
        n_held = max(1, round(env.heldout_fraction * syn.items_per_user))  # as envs.synthetic splits
        n_train = syn.items_per_user - n_held
        needed = 1 if cfg.feedback.kind == "rating" else 2
        if n_train < needed:
            why = "a pairwise query compares two" if needed == 2 else "training needs one"
            raise ValueError(
                f"env.heldout_fraction: got {env.heldout_fraction:g} — holds out {n_held} of the "
                f"{syn.items_per_user} items per user (env.synthetic.items_per_user), leaving {n_train} "
                f"for training; at least {needed} must remain ({why})"
            )

    def check_data(self, cfg: ExperimentConfig, *, announce: bool = False) -> None:
        from fedrlhf_ray.tasks.rec.clients import build_clients

        build_clients(cfg)

    def build_trainer(self, cfg: ExperimentConfig, host_index: int, num_hosts: int) -> LocalTrainer:
        from fedrlhf_ray.tasks.rec.trainer import build_host_trainer

        return build_host_trainer(cfg, host_index, num_hosts)

    def round_artifacts(self, cfg: ExperimentConfig) -> None:
        return None

    def tags(self, cfg: ExperimentConfig) -> dict[str, str]:
        return {"fedrlhf.dataset": cfg.movielens().dataset if cfg.env.name == "movielens" else "synthetic"}

    def summary(self, final: dict[str, float]) -> dict[str, Any]:
        if "eval/liked_hit_rate/mean" not in final:
            return {}
        return {"gap_closed": gap_closed(
            final["eval/liked_hit_rate/mean"], final["eval/random_hit_rate/mean"], final["eval/oracle_hit_rate/mean"],
        )}

    def progress(self, metrics: dict[str, float], last_eval: dict[str, float]) -> str:
        return (
            f"liked-hit {last_eval.get('eval/liked_hit_rate/mean', NAN):.3f}"
            f" (worst decile {last_eval.get('eval/liked_hit_rate/worst_decile', NAN):.3f})"
            f" · RM acc {metrics.get('reward_model/heldout_pair_accuracy/mean', NAN):.3f}"
        )

    def result_table(self, initial: dict[str, float], final: dict[str, float], rounds: int,
                     num_clients: int, summary: dict[str, Any]) -> ResultTable:
        table = ResultTable(
            f"held-out evaluation over {num_clients} client(s) (mean · worst decile)",
            ("metric", "random", "round 0", f"round {rounds}", "oracle"),
        )
        table.rows.append((
            "liked-hit rate", f"{final.get('eval/random_hit_rate/mean', NAN):.3f}",
            _cell(initial, "liked_hit_rate"), _cell(final, "liked_hit_rate"),
            f"{final.get('eval/oracle_hit_rate/mean', NAN):.3f}",
        ))
        table.rows += [(label, "", _cell(initial, key), _cell(final, key), "") for key, label in SUMMARY_METRICS]
        closed = summary.get("gap_closed", NAN)
        table.notes.append(f"closed {closed:.0%} of the random→oracle gap in mean liked-hit rate")
        return table

    def audit_problem(self, cfg: ExperimentConfig) -> str | None:
        if cfg.ppo.embedding_dim == 0:
            return "ppo.embedding_dim is 0 — the audit attacks the item-embedding table; give it a size"
        return None

    def audit_members(self, cfg: ExperimentConfig, n_items: int) -> dict[int, np.ndarray]:
        import numpy as np

        from fedrlhf_ray.tasks.rec.clients import build_clients

        rated: dict[int, np.ndarray] = {}
        for client in build_clients(cfg):
            members = np.zeros(n_items, dtype=bool)
            for user in client.users:
                members[np.asarray(user.train_items, dtype=np.int64) - 1] = True
            if members.all() or not members.any():
                from fedrlhf_ray.errors import UserError

                what = "every one" if members.all() else "none"
                raise UserError(
                    f"audit: client {client.client_id}'s users trained on {what} of the {n_items} items, so "
                    "membership cannot be told from non-membership; use a larger catalogue or fewer users per client"
                )
            rated[client.client_id] = members
        return rated

    def prepare(self, cfg: ExperimentConfig) -> ResultTable:
        raise ValueError("the recommendation task has no public models to prepare")

    def data_info(self, dataset: str, options: dict[str, Any]) -> ResultTable:
        from envs.data.movielens import describe, load_movielens
        from envs.data.partition import temporal_split
        from fedrlhf_ray.errors import UserError

        heldout = options["heldout_fraction"]
        if not 0.0 < heldout < 1.0:
            raise UserError(f"--heldout-fraction: got {heldout} — must lie in (0, 1)")
        data = load_movielens(dataset, options["path"], cache_dir=options["cache_dir"], download=options["download"])
        stats = describe(data)
        split = temporal_split(data.ratings, heldout, options["min_ratings"])
        stats.update({
            "eligible_users": int(split.users.size),
            "train_ratings": len(split.train),
            "heldout_ratings": len(split.heldout),
        })
        table = ResultTable(f"{data.name} ({data.source})", ("statistic", "value"))
        table.rows += [(key, f"{value:,}" if isinstance(value, int) else str(value)) for key, value in stats.items()]
        return table


TASK = RecTask()
