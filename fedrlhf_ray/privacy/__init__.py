"""Privacy layers: DP wraps the aggregation strategy (see ``strategies.make_strategy``); secure
aggregation is how the driver collects the round (``secure_round.SecureCollector``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from fedrlhf_ray.schema import ExperimentConfig
from fedrlhf_ray.strategies import STRATEGIES, Strategy, sums

if TYPE_CHECKING:
    from fedrlhf_ray.privacy.secure_round import SecureCollector

# The deviating server's attacks of the leakage audit (``privacy.deviations.ATTACKS``).
DEVIATIONS = ("active-set", "low-threshold", "key-substitution", "replay", "sigma-zero", "crafted-evaluation")


def secure_collector(
    cfg: ExperimentConfig, before_sending: Callable[[int, int], None] | None = None, *, evaluation: bool = False
) -> SecureCollector | None:
    """The secure-aggregation round an :class:`ExperimentConfig` asks for (None: plain updates);
    ``before_sending``: see :class:`SecureCollector`. ``evaluation``: the secure sum of held-out
    metrics instead, which secure aggregation and DP both ask for."""
    p = cfg.privacy
    if not (p.secure_aggregation or (evaluation and p.dp.enabled)):
        return None
    from fedrlhf_ray.privacy.secure_round import SecureCollector

    return SecureCollector(
        fraction_bits=int(p.secagg_fraction_bits),
        threshold_fraction=float(p.secagg_threshold),
        neighbours=None if p.secagg_neighbours is None else int(p.secagg_neighbours),
        seed=int(cfg.seed),
        consistency_round=p.secagg_adversary == "malicious",
        before_sending=before_sending,
    )


def private_evaluation(cfg: ExperimentConfig) -> bool:
    """Whether held-out metrics leave the clients only inside a secure sum."""
    return cfg.privacy.secure_aggregation or cfg.privacy.dp.enabled


def layers(cfg: ExperimentConfig) -> Callable[[Strategy], Strategy] | None:
    """The privacy layers an :class:`ExperimentConfig` asks for, as one wrapper (None: none)."""
    dp = cfg.privacy.dp
    if not dp.enabled:
        return None
    from fedrlhf_ray.privacy.dp import DifferentialPrivacy  # dp_accounting: only when used

    def wrap(inner: Strategy) -> Strategy:
        return DifferentialPrivacy(
            inner,
            noise_multiplier=float(dp.noise_multiplier),
            clip_norm=float(dp.clip_norm),
            delta=float(dp.delta),
            target_epsilon=None if dp.target_epsilon is None else float(dp.target_epsilon),
            adaptive_clipping=bool(dp.adaptive_clipping),
            target_quantile=float(dp.target_quantile),
            clip_learning_rate=float(dp.clip_learning_rate),
            clipped_count_stddev=None if dp.clipped_count_stddev is None else float(dp.clipped_count_stddev),
            mode=str(dp.mode),
            # The driver cannot clip a masked update: under secure aggregation the clients do.
            clients_clip=bool(cfg.privacy.secure_aggregation),
        )

    return wrap


def check_config(cfg: ExperimentConfig) -> None:
    """DP and secure aggregation against the strategy, the baseline and the clients a round
    (raises ValueError naming the field)."""
    fed, k = cfg.federation, cfg.clients.num_clients
    sampled = cfg.clients_per_round_count(k)
    dp = cfg.privacy.dp
    if dp.enabled:
        if fed.baseline != "federated":
            raise ValueError(
                f"privacy.dp.enabled: got true — client-level DP protects clients in an aggregate, and "
                f"federation.baseline {fed.baseline!r} aggregates none (use baseline: federated)"
            )
        if not sums(fed.strategy):
            raise ValueError(
                f"privacy.dp.enabled: got true — DP-FedAvg averages clipped updates, so it replaces the "
                f"aggregation: federation.strategy must be {' or '.join(_summing())}, not {fed.strategy!r}"
            )
        expected = sampled
        count_stddev = dp.clipped_count_stddev if dp.clipped_count_stddev is not None else expected / 20.0
        if dp.adaptive_clipping and count_stddev <= dp.noise_multiplier:
            source = f"the default, {expected} clients / 20" if dp.clipped_count_stddev is None else "as set"
            raise ValueError(
                f"privacy.dp.clipped_count_stddev: got {count_stddev:g} ({source}) "
                f"— adaptive clipping needs it above privacy.dp.noise_multiplier ({dp.noise_multiplier:g})"
            )
        if dp.target_epsilon is not None:
            from fedrlhf_ray.privacy.dp import first_round_epsilon  # dp_accounting: only when used

            first = first_round_epsilon(dp, k, sampled)
            if first > dp.target_epsilon:
                raise ValueError(
                    f"privacy.dp.target_epsilon: got {dp.target_epsilon:g} — one round already spends ε = "
                    f"{first:.3g} at δ = {dp.delta:g} (noise_multiplier {dp.noise_multiplier:g}, {sampled} of "
                    f"{k} clients a round); raise noise_multiplier or target_epsilon"
                )
    if cfg.privacy.secure_aggregation:
        if fed.baseline != "federated" or not sums(fed.strategy):
            what = f"federation.baseline {fed.baseline!r}" if fed.baseline != "federated" else (
                f"federation.strategy {fed.strategy!r}"
            )
            raise ValueError(
                f"privacy.secure_aggregation: got true — the driver then only learns the sum of the updates, "
                f"which {what} cannot use (it needs {' or '.join(_summing())}, baseline federated)"
            )
        if sampled < 3:
            raise ValueError(
                f"privacy.secure_aggregation: got true — it needs at least 3 clients a round "
                f"({sampled} are sampled); with 2, each client learns the other's update from the sum"
            )


def _summing() -> list[str]:
    """The strategies that can aggregate a secure sum (by capability, see ``strategies.sums``)."""
    return [name for name in STRATEGIES if sums(name)]
