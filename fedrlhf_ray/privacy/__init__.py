"""Privacy layers: DP wraps the aggregation strategy (see ``strategies.make_strategy``); secure
aggregation replaces how the driver collects the round (``secure_round``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fedrlhf_ray.strategies import Strategy

if TYPE_CHECKING:
    from fedrlhf_ray.privacy.secure_round import SecureAggregation


def secure_aggregation(cfg: Any) -> SecureAggregation | None:
    """The secure-aggregation round an :class:`ExperimentConfig` asks for (None: plain updates)."""
    p = cfg.privacy
    if not p.secure_aggregation:
        return None
    from fedrlhf_ray.privacy.secure_round import SecureAggregation

    return SecureAggregation(
        fraction_bits=int(p.secagg_fraction_bits),
        threshold_fraction=float(p.secagg_threshold),
        neighbours=None if p.secagg_neighbours is None else int(p.secagg_neighbours),
        seed=int(cfg.seed),
    )


def layers(cfg: Any) -> Callable[[Strategy], Strategy] | None:
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
            seed=int(cfg.seed),
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
