"""The interface between the federation engine and a client's local training.

The engine (client actors, driver, strategies, checkpoints) knows nothing of RLlib: it drives
any :class:`LocalTrainer`. One trainer instance lives in each client actor and serves many
virtual clients in turn: :meth:`LocalTrainer.load_client` swaps a client's record in,
:meth:`LocalTrainer.save_client` swaps it out. Everything that must persist across rounds for
a client is in that record, which the client actor keeps in its client-side store: a tree of
dicts, lists, scalars, NumPy arrays and torch tensors (see ``state_codec``), never an object
that would need pickle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

Weights = dict[str, np.ndarray]


@dataclass(frozen=True)
class ClientDP:
    """Differential privacy on the client's side (``fedrlhf_ray.privacy.dp``'s record of a round):
    clip the change of the shared weights to the L2 norm ``clip``, add N(0, ``noise_stddev``²)
    to each coordinate from the client's own secret randomness, and, with ``count``, send the bit
    "not clipped" plus N(0, ``count_stddev``²) too (adaptive clipping)."""

    clip: float
    noise_stddev: float
    count: bool = False
    count_stddev: float = 0.0


@dataclass(frozen=True)
class AuditRequest:
    """A leakage audit runs (its record of a round): under secure aggregation the client scores,
    itself, how close the masked vector it sent is to its true update (``audit/update/cosine``);
    only that number leaves, not the update."""


@dataclass(frozen=True)
class RoundInstructions:
    """What the round's clients are told (Flower's ``configure_train``): the strategy's part and
    one typed, optional record per layer that acts on the client's update.

    The strategy's part: ``proximal_mu``, FedProx's μ of the local term μ/2·‖θ − θ_global‖²
    (0: none); ``keep_local``, the client shares nothing (local-only baseline).
    The layers': ``dp`` (:class:`ClientDP`, the clients clip and noise) and ``audit``
    (:class:`AuditRequest`). The client builds its update transforms from them
    (``fedrlhf_ray.update_transforms``).
    """

    proximal_mu: float = 0.0
    keep_local: bool = False
    dp: ClientDP | None = None
    audit: AuditRequest | None = None


@dataclass(frozen=True)
class ClientUpdate:
    """What a client sends back after a round: weights, a sample count and scalar metrics.

    This is the whole privacy boundary: no data, feedback or reward model crosses it.
    """

    client_id: int
    weights: Weights
    num_samples: int
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class MaskedUpdate:
    """What a client sends under secure aggregation: its weighted update and its weight as one
    vector of the ring Z_2^64, masked (uniformly random to anyone without the other clients'
    masks); its scalar metrics are masked in the same vector after the update (``names``), and only
    the leakage audit's own score travels in the clear (``metrics``). The driver can only use it in
    the masked sum."""

    client_id: int
    masked: np.ndarray  # uint64
    metrics: dict[str, float] = field(default_factory=dict)
    # The names of the scalar metrics masked after the update (or, for an evaluation, alone):
    # public, while their values are masked too.
    names: tuple[str, ...] = ()
    kind: str = "update"  # or "evaluation"


class LocalTrainer(Protocol):
    """Local training for the virtual clients of one actor."""

    def load_client(self, client_id: int, state: Any | None) -> None:
        """Swap client ``client_id`` in; ``state`` is its record (``None`` on first use)."""

    def save_client(self) -> Any:
        """The current client's record, to be kept by the actor until its next round."""

    def get_weights(self) -> Weights:
        """All policy parameters of the current client."""

    def set_weights(self, weights: Weights) -> None:
        """Load policy parameters (a full or a partial set of names)."""

    def train(
        self, round_index: int, anchor: Weights | None, proximal_mu: float = 0.0
    ) -> tuple[int, dict[str, float]]:
        """One local round from the current weights; with ``proximal_mu > 0`` the loss adds
        μ/2·‖θ − anchor‖² (``anchor``: the round's shared global model). Returns (samples used,
        scalar metrics)."""

    def finetune(self, round_index: int, iterations: int) -> None:
        """A few local steps before evaluation (personalisation 'finetune')."""

    def evaluate(self, round_index: int) -> dict[str, float]:
        """Held-out metrics of the current weights for the current client."""

    def samples(self, round_index: int) -> str | None:
        """What the current weights make of public inputs, as text (IMDb: continuations of public
        prompts), or None where the task writes none."""
