"""One preflight of a valid config: each subsystem's cross-checks, in a fixed order.

The schema checks each section on its own; what relates sections owned by different subsystems
is checked by those subsystems (``tracking``, ``strategies``, ``privacy``, ``attacks``,
``ray_runtime`` and the config's task). ``config.validate_config`` runs it, so ``fedrlhf config
check``, ``fedrlhf run``, sweeps and every actor that rebuilds a config see the same errors.
"""

from __future__ import annotations

from fedrlhf_ray import attacks, privacy, ray_runtime, strategies, tracking
from fedrlhf_ray.errors import ConfigError
from fedrlhf_ray.schema import ExperimentConfig
from fedrlhf_ray.tasks import task_for

CHECKS = (
    tracking.check_config,
    strategies.check_config,
    privacy.check_config,
    attacks.check_config,
    ray_runtime.check_config,
)


def check_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """``cfg`` when every cross-check passes; else the first problem as a one-line ConfigError."""
    try:
        for check in (*CHECKS, task_for(cfg.env.name).check_config):
            check(cfg)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return cfg
