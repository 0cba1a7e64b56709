"""What a client does to its update before it leaves: an ordered list of transforms built from
the round's instructions (as Flower's client mods wrap a client app, typed here).

After local training a client's outgoing message is an :class:`Outgoing`; each transform takes
it and returns it changed, or None to send nothing (the client drops out of the round):

1. :class:`ClipAndNoise` — DP (``instructions.dp``): clip the change to C and add this client's
   share of the noise, drawn from its own secret;
2. :class:`Deviate` — a Byzantine client's attack (robustness studies), after the protocol's
   steps: what it sends is the attack's;
3. :class:`Mask` — secure aggregation: w·θ ‖ w as one fixed-point vector, masked;
4. :class:`ScoreSent` — the audit (``instructions.audit``) under secure aggregation: the client
   scores how close the masked vector is to its true update; only that number leaves.

:func:`plain_transforms` gives 1–2, :func:`masked_transforms` adds 3–4.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np

from fedrlhf_ray.attacks import Attack
from fedrlhf_ray.local_trainer import ClientDP, ClientUpdate, MaskedUpdate, RoundInstructions, Weights
from fedrlhf_ray.metrics import cosine_similarity, metric_block
from fedrlhf_ray.privacy.client_dp import client_noise, privatize
from fedrlhf_ray.privacy.secagg import MaskingClient, SecAggError, quantize


@dataclass(frozen=True)
class Outgoing:
    """A client's message on its way out: its shared weights (after the transforms so far), the
    round's global weights it started from, its weight in a sum, and, once masked, the vector."""

    round_index: int
    client_id: int
    global_weights: Weights
    weights: Weights
    num_samples: int
    metrics: dict[str, float] = field(default_factory=dict)
    sum_weight: float = 1.0
    masked: np.ndarray | None = None
    masked_names: tuple[str, ...] = ()

    def message(self) -> ClientUpdate | MaskedUpdate:
        """What crosses to the driver: the masked vector once masked, else the update."""
        if self.masked is not None:
            return MaskedUpdate(self.client_id, self.masked, self.metrics, self.masked_names)
        return ClientUpdate(self.client_id, self.weights, self.num_samples, self.metrics)


class UpdateTransform(Protocol):
    def __call__(self, out: Outgoing) -> Outgoing | None: ...


@dataclass(frozen=True)
class ClipAndNoise:
    """DP on the client's side; ``secret(client_id)`` is the client's noise secret (its store's)."""

    dp: ClientDP
    secret: Callable[[int], bytes]

    def __call__(self, out: Outgoing) -> Outgoing:
        size = sum(int(np.size(v)) for v in out.weights.values()) + int(self.dp.count)
        normals = client_noise(self.secret(out.client_id), out.round_index, size)
        private, _ = privatize({k: out.global_weights[k] for k in out.weights}, out.weights, self.dp, normals)
        # Under DP every client counts once in a sum (the bound on one client's influence).
        return replace(out, weights=private, sum_weight=1.0)


@dataclass(frozen=True)
class Deviate:
    """A malicious client's attack on what it sends."""

    attack: Attack

    def __call__(self, out: Outgoing) -> Outgoing:
        sent = self.attack.apply(out.round_index, out.client_id, out.global_weights, out.weights)
        return replace(out, weights=sent)


def _flat(weights: Weights) -> np.ndarray:
    return np.concatenate([np.asarray(weights[k], np.float64).ravel() for k in sorted(weights)])


@dataclass(frozen=True)
class Mask:
    """w·θ ‖ w ‖ metric values ‖ present flags in Z_2^64 with the pair masks agreed with
    ``present`` (the clients whose shares went out): the scalar metrics are summed like the
    update (a non-finite one counts as absent). A non-finite or huge update (an attacker) cannot
    be encoded: the client drops out."""

    masking: MaskingClient
    present: Collection[int]
    fraction_bits: int

    def __call__(self, out: Outgoing) -> Outgoing | None:
        w = out.sum_weight
        names = tuple(sorted(out.metrics))
        try:
            vector = quantize(np.concatenate([w * _flat(out.weights), [w], metric_block(out.metrics, names)]),
                              self.fraction_bits)
        except SecAggError:
            return None
        return replace(out, masked=self.masking.mask(vector, set(self.present)), metrics={}, masked_names=names)


@dataclass(frozen=True)
class ScoreSent:
    """The audit's cosine of the masked vector (as the server would read it) with w·θ."""

    def __call__(self, out: Outgoing) -> Outgoing:
        assert out.masked is not None, "ScoreSent follows Mask"
        update = out.sum_weight * _flat(out.weights)
        sent = out.masked[: update.size].view(np.int64).astype(np.float64)
        cosine = cosine_similarity(sent, update)
        return replace(out, metrics={**out.metrics, "audit/update/cosine": cosine})


def plain_transforms(
    instructions: RoundInstructions, attack: Attack | None, secret: Callable[[int], bytes]
) -> list[UpdateTransform]:
    """DP, then the attack, as the instructions and the client's own attack say."""
    transforms: list[UpdateTransform] = []
    if instructions.dp is not None:
        transforms.append(ClipAndNoise(instructions.dp, secret))
    if attack is not None:
        transforms.append(Deviate(attack))
    return transforms


def masked_transforms(
    instructions: RoundInstructions, attack: Attack | None, secret: Callable[[int], bytes],
    masking: MaskingClient, present: Collection[int], fraction_bits: int,
) -> list[UpdateTransform]:
    """:func:`plain_transforms`, then masking, then the audit's own score of what it sent."""
    transforms = plain_transforms(instructions, attack, secret)
    transforms.append(Mask(masking, present, fraction_bits))
    if instructions.audit is not None:
        transforms.append(ScoreSent())
    return transforms


def apply_transforms(out: Outgoing, transforms: Sequence[UpdateTransform]) -> Outgoing | None:
    """``out`` through ``transforms`` in order; None as soon as one drops it."""
    current: Outgoing | None = out
    for transform in transforms:
        if current is None:
            return None
        current = transform(current)
    return current
