"""The client's update transforms: built from the round's instructions, applied in order."""

from __future__ import annotations

import numpy as np
import pytest

from fedrlhf_ray.attacks import Attack
from fedrlhf_ray.local_trainer import AuditRequest, ClientDP, ClientUpdate, MaskedUpdate, RoundInstructions
from fedrlhf_ray.privacy.secagg import MaskingClient
from fedrlhf_ray.update_transforms import (
    ClipAndNoise,
    Deviate,
    Mask,
    Outgoing,
    ScoreSent,
    apply_transforms,
    masked_transforms,
    plain_transforms,
)

GLOBAL = {"w": np.zeros(6, np.float32), "b": np.zeros(2, np.float32)}


def secret(client_id: int) -> bytes:
    return bytes([client_id]) * 32


def outgoing(weights, num_samples=10) -> Outgoing:
    return Outgoing(3, 1, GLOBAL, weights, num_samples, {"train/loss": 0.5}, sum_weight=float(num_samples))


@pytest.mark.parametrize(
    ("instructions", "attack", "kinds"),
    [
        (RoundInstructions(), None, []),
        (RoundInstructions(dp=ClientDP(1.0, 0.1)), None, [ClipAndNoise]),
        (RoundInstructions(dp=ClientDP(1.0, 0.1)), Attack("scale", 2.0, frozenset({1}), 0), [ClipAndNoise, Deviate]),
        (RoundInstructions(audit=AuditRequest()), Attack("nan", 1.0, frozenset({1}), 0), [Deviate]),
    ],
)
def test_plain_transforms_follow_the_instructions_in_order(instructions, attack, kinds):
    assert [type(t) for t in plain_transforms(instructions, attack, secret)] == kinds


def test_masked_transforms_end_with_the_mask_and_the_audit_score_only_when_audited():
    masking = MaskingClient(1, 3)
    plain = masked_transforms(RoundInstructions(), None, secret, masking, [0, 1, 2], 16)
    audited = masked_transforms(RoundInstructions(audit=AuditRequest()), None, secret, masking, [0, 1, 2], 16)
    assert [type(t) for t in plain] == [Mask] and [type(t) for t in audited] == [Mask, ScoreSent]


def test_dp_clips_noises_and_counts_each_client_once():
    big = {k: np.full_like(v, 5.0) for k, v in GLOBAL.items()}
    out = apply_transforms(outgoing(big), plain_transforms(RoundInstructions(dp=ClientDP(1.0, 0.0)), None, secret))
    assert out is not None and out.sum_weight == 1.0
    norm = np.sqrt(sum(float(np.sum(np.asarray(v, np.float64) ** 2)) for v in out.weights.values()))
    assert norm == pytest.approx(1.0, rel=1e-6)
    message = out.message()
    assert isinstance(message, ClientUpdate) and message.num_samples == 10 and message.metrics == {"train/loss": 0.5}


def test_the_attack_comes_after_dp():
    """A Byzantine client deviates from the protocol after its steps: what it sends is the attack's."""
    big = {k: np.full_like(v, 5.0) for k, v in GLOBAL.items()}
    transforms = plain_transforms(RoundInstructions(dp=ClientDP(1.0, 0.0)), Attack("scale", 3.0, frozenset({1}), 0), secret)
    out = apply_transforms(outgoing(big), transforms)
    assert out is not None
    norm = np.sqrt(sum(float(np.sum(np.asarray(v, np.float64) ** 2)) for v in out.weights.values()))
    assert norm == pytest.approx(3.0, rel=1e-5)  # the clipped change, scaled by the attack


def test_a_non_finite_update_cannot_be_masked_and_is_dropped():
    masking = MaskingClient(1, 3)
    nan = {k: np.full_like(v, np.nan) for k, v in GLOBAL.items()}
    transforms = masked_transforms(RoundInstructions(audit=AuditRequest()), None, secret, masking, [1], 16)
    assert apply_transforms(outgoing(nan), transforms) is None


def test_masking_sends_only_the_masked_vector_and_the_audit_score():
    masking = MaskingClient(1, 3)
    weights = {"w": np.full(4000, 0.25, np.float32)}  # large enough that chance is ~1/sqrt(4000)
    transforms = masked_transforms(RoundInstructions(audit=AuditRequest()), None, secret, masking, [1], 16)
    out = apply_transforms(Outgoing(3, 1, {"w": np.zeros(4000, np.float32)}, weights, 10, sum_weight=10.0), transforms)
    assert out is not None
    message = out.message()
    assert isinstance(message, MaskedUpdate) and message.masked.dtype == np.uint64
    assert message.masked.size == 4000 + 1  # w·θ and w
    # The self mask alone makes the vector look uniformly random: as the server reads it, it is
    # nearly orthogonal to the true w·θ, which the client scores itself.
    assert abs(message.metrics["audit/update/cosine"]) < 0.2
