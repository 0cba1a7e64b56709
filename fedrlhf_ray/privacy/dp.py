"""Client-level differential privacy: DP-FedAvg (McMahan et al., ICLR 2018) with central noise.

Each round every client is sampled independently with probability q (Poisson sampling, as the
accountant assumes); each received update's change Δ_k from the global model is clipped to L2
norm C; the new model is the global one plus the fixed-denominator mean

    (Σ_k clip(Δ_k) + N(0, σ²C² I)) / (q·K),

so one client moves it by at most C/(qK) and the noise on the mean has standard deviation
σC/(qK). Every client counts once, whatever its sample count: the weighting by samples would
let one client's influence exceed the bound. The privacy loss is accounted by Google's
``dp_accounting`` (Rényi DP accountant of a Poisson-sampled Gaussian mechanism per round,
add-or-remove-one-client adjacency), reported as ε at δ after every round; a round that would
take ε past ``target_epsilon`` is not started.

Adaptive clipping (Andrew et al., NeurIPS 2021) moves C geometrically towards the
``target_quantile`` of the update norms, C ← C·exp(−η(b̃ − γ)), where b̃ is the noised share of
clients whose update was not clipped: (Σ_k 1[‖Δ_k‖ ≤ C] + N(0, σ_b²)) / (qK). That count has
sensitivity 1, so the update sum's noise multiplier is lowered until both Gaussian releases
together cost what σ alone would (as in their Theorem 1): σ_Δ = (σ⁻² − σ_b⁻²)^(−1/2). The
accountant composes both releases as they are; σ_b must exceed σ.

**Where clipping and noise happen.** ``mode: central`` — the driver clips and adds the noise;
it sees every update (or, under secure aggregation, the clipped sum) before the noise.
``mode: distributed`` — each of the m sampled clients clips its own change and adds
N(0, σ_Δ²C²/m) (and N(0, σ_b²/m) on its not-clipped bit) from its own secret randomness
(:func:`client_noise`): the m shares sum to the mechanism's noise, so with secure aggregation
the driver never holds a sum without it. Under secure aggregation clients always clip (the
driver cannot clip a masked update). If some of the m drop out, less noise reaches the sum:
the round is accounted with what arrived, σ·√(s/m) for s survivors — so a round with dropouts
costs more ε than planned (``target_epsilon`` is checked before a round, on the plan). A round
with no contribution gets the whole noise from the driver: the mechanism of an empty sample
is noise too. The per-client floats are rounded to the secure sum's fixed-point grid after the
noise is added; the accountant does not model that rounding (Kairouz et al. 2021's discrete
Gaussian would; not built here).
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import logging
import math
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import dp_accounting
import numpy as np
from dp_accounting.rdp import RdpAccountant

from fedrlhf_ray.local_trainer import ClientDP, RoundInstructions, Weights
from fedrlhf_ray.privacy.client_dp import UNCLIPPED_KEY, client_noise
from fedrlhf_ray.schema import DPConfig
from fedrlhf_ray.state_codec import StateFileError
from fedrlhf_ray.strategies import RoundPlan, StrategyWrapper, delta_norms

MODES = ("central", "distributed")

RELATION = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
SECRET_BYTES = 32



def _not_convergence_noise(record: logging.LogRecord) -> bool:
    return "failed to converge" not in record.getMessage()


def _quiet_accountant() -> None:
    """At large sampling rates the series for fractional Rényi orders may not converge; the
    accountant then leaves that order out (the bound stays valid) and says so on absl's logger,
    once per order and round, which would flood a run's console. Added once, when first used."""
    logger = logging.getLogger("absl")
    if _not_convergence_noise not in logger.filters:
        logger.addFilter(_not_convergence_noise)


def round_event(sampling_rate: float, update_noise: float, count_noise: float | None) -> dp_accounting.DpEvent:
    """One round's mechanism for the accountant: Poisson sampling at ``sampling_rate`` of the
    Gaussian sum of clipped updates (noise multiplier ``update_noise``) and, with adaptive
    clipping, of the not-clipped count (sensitivity 1, noise multiplier ``count_noise``)."""
    gaussian: dp_accounting.DpEvent = dp_accounting.GaussianDpEvent(update_noise)
    if count_noise is not None:
        gaussian = dp_accounting.ComposedDpEvent([gaussian, dp_accounting.GaussianDpEvent(count_noise)])
    if sampling_rate >= 1.0:
        return gaussian
    return dp_accounting.PoissonSampledDpEvent(sampling_rate, gaussian)


def epsilon(events: Sequence[dp_accounting.DpEvent], delta: float) -> float:
    """ε at ``delta`` of the composition of ``events`` (0 for none)."""
    if not events:
        return 0.0
    _quiet_accountant()
    accountant = RdpAccountant(neighboring_relation=RELATION)
    for event in events:
        accountant.compose(event)
    return float(accountant.get_epsilon(delta))


def update_noise_multiplier(noise_multiplier: float, count_stddev: float | None) -> float:
    """σ_Δ: the update sum's share of σ once the count query takes its own (Andrew et al. 2021)."""
    if count_stddev is None:
        return noise_multiplier
    rest = noise_multiplier**-2 - count_stddev**-2
    if rest <= 0:
        raise ValueError(
            f"privacy.dp.clipped_count_stddev {count_stddev:g} is too small for noise_multiplier "
            f"{noise_multiplier:g}: it must exceed it"
        )
    return rest**-0.5


def clipped_sum(
    global_weights: Mapping[str, np.ndarray], updates: Sequence[Mapping[str, np.ndarray]], clip_norm: float
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """(Σ_k clip(Δ_k) in float64 per key, ‖Δ_k‖ per update)."""
    norms = delta_norms(global_weights, updates) if updates else np.zeros(0)
    total = {k: np.zeros(np.shape(v), dtype=np.float64) for k, v in global_weights.items()}
    base = {k: np.asarray(v, dtype=np.float64) for k, v in global_weights.items()}
    for update, norm in zip(updates, norms, strict=True):
        factor = min(1.0, clip_norm / norm) if norm > 0 else 1.0
        for k in total:
            total[k] += factor * (np.asarray(update[k], dtype=np.float64) - base[k])
    return total, norms


def noised_mean_step(
    global_weights: Mapping[str, np.ndarray],
    delta_sum: Mapping[str, np.ndarray],
    noise_stddev: float,
    denominator: float,
    normals: np.ndarray,
) -> Weights:
    """global + (Σ + N(0, noise_stddev² I)) / denominator, in the global weights' dtypes;
    ``normals``: standard normal draws, one per coordinate of the global weights in their order."""
    out: Weights = {}
    start = 0
    for k, value in global_weights.items():
        g = np.asarray(value)
        noise = noise_stddev * normals[start : start + g.size].reshape(g.shape)
        start += g.size
        step = (np.asarray(delta_sum[k]) + noise) / denominator
        dtype = g.dtype if np.issubdtype(g.dtype, np.floating) else np.dtype(np.float64)
        out[k] = (g.astype(np.float64) + step).astype(dtype, copy=False)
    return out


def new_secret() -> bytes:
    """The driver's DP secret: 32 bytes of the operating system's entropy, drawn when the run
    starts and kept only in the driver's checkpoint (never logged), so nobody holding the config
    and the released models can recompute the noise or who was sampled."""
    return secrets.token_bytes(SECRET_BYTES)


def secret_normals(secret: bytes, purpose: str, round_index: int, size: int) -> np.ndarray:
    """``size`` standard normal draws for ``purpose`` in round ``round_index`` that only the
    holder of ``secret`` can compute (the ChaCha20 stream of :func:`client_noise` under a key
    derived for the purpose)."""
    key = hmac.new(secret, f"fedrlhf driver {purpose}".encode(), hashlib.sha256).digest()
    return client_noise(key, round_index, size)


def secret_rng(secret: bytes, purpose: str, round_index: int) -> np.random.Generator:
    """A generator for ``purpose`` in round ``round_index`` seeded with 256 bits derived from
    ``secret`` (Poisson sampling: the sample itself is never released, only its size)."""
    key = hmac.new(secret, f"fedrlhf driver {purpose} round {round_index}".encode(), hashlib.sha256).digest()
    return np.random.default_rng(np.random.SeedSequence(int.from_bytes(key, "big")))


def round_step(
    noise_multiplier: float, pool_size: int, count: int, adaptive_clipping: bool, clipped_count_stddev: float | None
) -> tuple[float, float, float | None]:
    """(sampling rate q, update noise multiplier σ_Δ, count noise σ_b or None) of one round that
    samples ``count`` of ``pool_size`` clients in expectation."""
    rate = min(1.0, count / pool_size)
    count_stddev = None
    if adaptive_clipping:
        # Andrew et al. recommend σ_b = expected clients per round / 20.
        count_stddev = clipped_count_stddev if clipped_count_stddev is not None else rate * pool_size / 20.0
    return rate, update_noise_multiplier(noise_multiplier, count_stddev), count_stddev


def first_round_epsilon(dp_cfg: DPConfig, pool_size: int, count: int) -> float:
    """ε at δ of one round of a ``DPConfig`` (for checking ``target_epsilon`` up front)."""
    step = round_step(
        float(dp_cfg.noise_multiplier), pool_size, count, bool(dp_cfg.adaptive_clipping),
        None if dp_cfg.clipped_count_stddev is None else float(dp_cfg.clipped_count_stddev),
    )
    return epsilon([round_event(*step)], float(dp_cfg.delta))


@dataclass
class DifferentialPrivacy(StrategyWrapper):
    """DP-FedAvg around a FedAvg-like strategy (FedAvg, FedProx), which still configures the
    clients' round; see the module docstring. ``clients_clip``: the clients clip (distributed
    noise, or a secure sum); the driver then only sums. State (rounds accounted, the adaptive
    clip norm) goes into the driver's checkpoint, so a resumed run accounts and clips exactly
    as one that never stopped."""

    noise_multiplier: float
    clip_norm: float
    delta: float
    target_epsilon: float | None = None
    adaptive_clipping: bool = False
    target_quantile: float = 0.5
    clip_learning_rate: float = 0.2
    clipped_count_stddev: float | None = None
    mode: str = "central"
    clients_clip: bool = False
    # One (sampling rate, update noise multiplier, count noise multiplier or None) per release.
    steps: list[tuple[float, float, float | None]] = field(default_factory=list)
    # The noise and the sample come from here, not from the config's seed (see new_secret;
    # drawn when the strategy is made, unless given).
    secret: bytes = field(default=b"", repr=False)
    _metrics: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"privacy.dp.mode: got {self.mode!r} — allowed: {', '.join(MODES)}")
        if self.mode == "distributed":
            self.clients_clip = True
        if not self.secret:
            self.secret = new_secret()

    # -- sampling and accounting ---------------------------------------------------------------
    def _step_for(self, pool_size: int, count: int) -> tuple[float, float, float | None]:
        return round_step(self.noise_multiplier, pool_size, count, self.adaptive_clipping, self.clipped_count_stddev)

    def plan_round(self, round_index: int, pool: Sequence[int], count: int, rng: np.random.Generator) -> RoundPlan:
        """Poisson sampling: each client of ``pool`` independently with probability count/|pool|,
        drawn from the secret (``rng``, the config seed's stream, is public: the accountant's
        amplification by sampling holds only while who was sampled stays unknown)."""
        rng = secret_rng(self.secret, "sample", round_index)
        plan = RoundPlan(round_index, (), len(pool), count)
        chosen = rng.random(len(pool)) < plan.sampling_rate
        return dataclasses.replace(plan, sampled=tuple(int(c) for c, take in zip(pool, chosen, strict=True) if take))

    def _step_of(self, plan: RoundPlan) -> tuple[float, float, float | None]:
        """(q, σ_Δ, σ_b or None) of the round ``plan`` describes."""
        return self._step_for(plan.pool_size, plan.count)

    def epsilon(self) -> float:
        """ε at δ spent by the rounds run so far."""
        return epsilon([round_event(*step) for step in self.steps], self.delta)

    def stop_before(self, round_index: int, pool_size: int, count: int) -> str | None:
        """Why round ``round_index`` must not start (its ε would pass ``target_epsilon``), or None."""
        if self.target_epsilon is None:
            return None
        planned = [round_event(*step) for step in self.steps] + [round_event(*self._step_for(pool_size, count))]
        after = epsilon(planned, self.delta)
        if after > self.target_epsilon:
            return (
                f"privacy budget: round {round_index} would take ε from {self.epsilon():.3g} to {after:.3g}, "
                f"past privacy.dp.target_epsilon {self.target_epsilon:g} (δ = {self.delta:g})"
            )
        return None

    # -- the round -----------------------------------------------------------------------------
    def configure_train(self, plan: RoundPlan) -> RoundInstructions:
        """The inner strategy's instructions and, when the clients clip, the clip norm and
        each client's share of the noise (nothing in central mode: the driver adds it)."""
        instructions = self.inner.configure_train(plan)
        if not self.clients_clip:
            return instructions
        _, update_noise, count_stddev = self._step_of(plan)
        share = 1.0 / math.sqrt(max(1, len(plan.sampled))) if self.mode == "distributed" else 0.0
        return dataclasses.replace(instructions, dp=ClientDP(
            clip=self.clip_norm,
            noise_stddev=update_noise * self.clip_norm * share,
            count=count_stddev is not None,
            count_stddev=(count_stddev or 0.0) * share,
        ))

    def aggregate(
        self,
        plan: RoundPlan,
        global_weights: Mapping[str, np.ndarray],
        updates: Sequence[Mapping[str, np.ndarray]],
        num_samples: Sequence[float],
    ) -> Weights:
        if not self.clients_clip:
            delta_sum, norms = clipped_sum(global_weights, updates, self.clip_norm)
            unclipped = float((norms <= self.clip_norm).sum())
            return self._release(plan, global_weights, delta_sum, unclipped, len(updates))
        # Distributed noise without a secure sum: each update arrives clipped and noised.
        base = {k: np.asarray(v, dtype=np.float64) for k, v in global_weights.items()}
        delta_sum = {
            k: sum((np.asarray(u[k], np.float64) - g for u in updates), np.zeros_like(g)) for k, g in base.items()
        }
        unclipped = sum(float(np.asarray(u[UNCLIPPED_KEY])[0]) for u in updates if UNCLIPPED_KEY in u)
        return self._release(plan, global_weights, delta_sum, unclipped, len(updates))

    def aggregate_sum(
        self, plan: RoundPlan, global_weights: Mapping[str, np.ndarray], weighted_sum: Mapping[str, np.ndarray],
        total_weight: float,
    ) -> Weights:
        """From a secure sum of clipped (and, distributed, noised) updates, each of weight 1."""
        contributors = round(total_weight)
        delta_sum = {
            k: np.asarray(weighted_sum[k], np.float64) - contributors * np.asarray(g, np.float64)
            for k, g in global_weights.items()
        }
        unclipped = float(np.asarray(weighted_sum[UNCLIPPED_KEY])[0]) if UNCLIPPED_KEY in weighted_sum else 0.0
        return self._release(plan, global_weights, delta_sum, unclipped, contributors)

    def spent(self, plan: RoundPlan, contributors: int) -> None:
        """A round that failed after the clients sent masked inputs is charged as released: in
        distributed mode with the noise of ``contributors`` clients (the fewest a sum of it could
        hold), in central mode with the full step (nothing was released, and counting it keeps ε
        an upper bound whatever the driver saw)."""
        self.inner.spent(plan, contributors)
        rate, update_noise, count_stddev = step = self._step_of(plan)
        sampled = len(plan.sampled)
        if self.mode == "distributed" and 0 < contributors < sampled:
            kept = math.sqrt(contributors / sampled)
            step = (rate, update_noise * kept, None if count_stddev is None else count_stddev * kept)
        self.steps.append(step)
        self._metrics = {}

    def _release(
        self,
        plan: RoundPlan,
        global_weights: Mapping[str, np.ndarray],
        delta_sum: Mapping[str, np.ndarray],
        unclipped: float,
        contributors: int,
    ) -> Weights:
        """global + (Σ clipped Δ + the noise the clients did not add) / (qK); adaptive clipping.
        The release is accounted here, with the noise it really carries."""
        rate, update_noise, count_stddev = step = self._step_of(plan)
        driver_share = 1.0
        sampled = len(plan.sampled)
        if self.mode == "distributed" and contributors > 0:
            driver_share = 0.0
            if contributors < sampled:  # dropouts took their noise with them
                kept = math.sqrt(contributors / sampled)
                step = (rate, update_noise * kept, None if count_stddev is None else count_stddev * kept)
        self.steps.append(step)
        clip = self.clip_norm
        size = sum(int(np.asarray(v).size) for v in global_weights.values())
        # One normal per coordinate and one for the count; none drawn when the clients added it all.
        normals = (
            secret_normals(self.secret, "dp-noise", plan.round_index, size + 1) if driver_share else np.zeros(size + 1)
        )
        new = noised_mean_step(global_weights, delta_sum, driver_share * update_noise * clip, plan.expected, normals)
        self._metrics = {
            "privacy/clip_norm": clip,
            "privacy/noise_stddev": step[1] * clip / plan.expected,
        }
        if count_stddev is not None:
            share = (unclipped + driver_share * count_stddev * float(normals[size])) / plan.expected
            self.clip_norm = clip * math.exp(-self.clip_learning_rate * (share - self.target_quantile))
            self._metrics["privacy/unclipped_share_noised"] = share
        return new

    def round_metrics(self) -> dict[str, float]:
        return {**self.inner.round_metrics(), **self._metrics, "privacy/epsilon": self.epsilon()}

    def state(self) -> dict[str, Any]:
        return {
            "inner": self.inner.state(),
            "steps": [list(step) for step in self.steps],
            "clip_norm": self.clip_norm,
            "secret": self.secret.hex(),
        }

    def load_state(self, state: Mapping[str, Any]) -> None:
        self.inner.load_state(state.get("inner", {}))
        self.steps = [(float(a), float(b), None if c is None else float(c)) for a, b, c in state.get("steps", [])]
        self.clip_norm = float(state.get("clip_norm", self.clip_norm))
        secret = state.get("secret")
        if not isinstance(secret, str) or len(secret) != 2 * SECRET_BYTES:
            raise StateFileError("the checkpoint's DP state lacks its secret (written by an older version?)")
        self.secret = bytes.fromhex(secret)
