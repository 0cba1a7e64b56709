"""Byzantine clients for robustness studies: which clients are malicious and what they send.

A seeded subset of ``round(fraction · K)`` clients is malicious. They train honestly and then,
inside their own client actor, replace the update they send (``sign_flip``, ``scale``,
``gaussian``, ``nan``), or their simulated human answers every query the wrong way round
(``flipped_feedback``, applied by the RLHF trainer), so their reward model and the policy they
train on it are poisoned. The driver is not told who is malicious: robust strategies must cope.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from fedrlhf_ray.local_trainer import Weights
from fedrlhf_ray.schema import ExperimentConfig
from fedrlhf_ray.seeding import derive_rng

UPDATE_ATTACKS = ("sign_flip", "scale", "gaussian", "nan")


def malicious_clients(seed: int, num_clients: int, fraction: float) -> frozenset[int]:
    """The ``round(fraction · num_clients)`` malicious client ids, drawn from the root seed."""
    count = min(num_clients, round(fraction * num_clients))
    rng = derive_rng(seed, "attack", "clients")
    return frozenset(int(c) for c in rng.choice(num_clients, size=count, replace=False))


def attacked_update(
    kind: str,
    global_weights: Mapping[str, np.ndarray],
    update: Mapping[str, np.ndarray],
    scale: float,
    rng: np.random.Generator,
) -> Weights:
    """What a malicious client sends instead of ``update`` (dtypes kept).

    With Δ = update − global: ``sign_flip`` sends global − scale·Δ, ``scale`` global + scale·Δ,
    ``gaussian`` global + N(0, scale²) per coordinate, ``nan`` all NaN.
    """
    out: Weights = {}
    for k, v in update.items():
        a = np.asarray(v)
        if k not in global_weights:  # not a weight (DP's not-clipped bit): sent as it is
            out[k] = a
            continue
        g = np.asarray(global_weights[k], dtype=np.float64)
        if kind == "sign_flip":
            sent = g - scale * (a - g)
        elif kind == "scale":
            sent = g + scale * (a - g)
        elif kind == "gaussian":
            sent = g + scale * rng.standard_normal(a.shape)
        elif kind == "nan":
            sent = np.full(a.shape, np.nan)
        else:
            raise ValueError(f"unknown update attack {kind!r} — allowed: {', '.join(UPDATE_ATTACKS)}")
        out[k] = sent.astype(a.dtype if np.issubdtype(a.dtype, np.floating) else np.float64, copy=False)
    return out


@dataclass(frozen=True)
class Attack:
    """The attack a client actor carries out for its malicious clients."""

    kind: str
    scale: float
    malicious: frozenset[int]
    seed: int

    @classmethod
    def from_config(cls, cfg: ExperimentConfig) -> Attack | None:
        a = cfg.attack
        if a.kind == "none":
            return None
        return cls(a.kind, float(a.scale), malicious_clients(cfg.seed, cfg.clients.num_clients, a.fraction), cfg.seed)

    def corrupts_update(self, client_id: int) -> bool:
        return self.kind in UPDATE_ATTACKS and client_id in self.malicious

    def apply(
        self, round_index: int, client_id: int, global_weights: Mapping[str, np.ndarray], update: Weights
    ) -> Weights:
        if not self.corrupts_update(client_id):
            return update
        rng = derive_rng(self.seed, "attack", round_index, client_id)
        return attacked_update(self.kind, global_weights, update, self.scale, rng)


def check_config(cfg: ExperimentConfig) -> None:
    """An attack needs clients to attack from (raises ValueError naming the field)."""
    a, k = cfg.attack, cfg.clients.num_clients
    if a.kind != "none" and round(a.fraction * k) == 0:
        raise ValueError(
            f"attack.fraction: got {a.fraction:g} — round({a.fraction:g} × {k} clients) makes no client malicious; "
            f"use at least {0.5 / k:.3g} (or attack.kind: none)"
        )
    if cfg.attack.kind != "none" and cfg.federation.baseline == "centralized":
        raise ValueError(
            f"attack.kind: got {cfg.attack.kind!r} — the centralized baseline pools every client into one, "
            "so no client can attack it (set attack.kind: none)"
        )
