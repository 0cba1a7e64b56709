"""What a client enforces on its own, whatever the driver asks in a round.

A client actor gets its :class:`ClientPolicy` when it is created, from the experiment config
(the federation's setup, which its clients agreed to); no argument of a round can change it.
Every instruction weaker than the policy is refused — one line, raised in the client actor, so
the round fails and nothing of the client's update leaves:

- under secure aggregation, an unmasked update is never sent; a share threshold below the
  policy's rule (more than half of the client's neighbours, and ``secagg_threshold`` of them),
  and a round whose ``active`` set disagrees with the shares the client holds (a driver that
  says no neighbour is active would get an update masked by its self-mask alone, which the
  b-shares then remove) are refused; so is a second masked input for a round the client
  already sent one for, or for an earlier round (the driver cannot run a round again over
  another set of clients and difference the two sums);
- under DP where the clients clip (distributed noise, or a secure sum), the round must carry
  DP instructions with a finite positive clip; in distributed mode each client's noise must be
  at least its share of σ·C for the largest cohort the config allows, σ·C/√K (the driver cannot
  talk it down to σ = 0, or to a smaller σ, by its instruction or by overstating the cohort).

- under secure aggregation, neighbours other than those the round's public seed gives, a key
  advertisement not signed by the neighbour's registered identity (``privacy.pki``: a driver
  substituting its own keys would open every share sealed for them), a survivor set it cannot
  be in or that leaves it fewer than its threshold of neighbours, a second survivor set in one
  round, and a reveal for a set other than the one it confirmed or that fewer than its
  threshold of neighbours signed (a driver telling clients different survivor sets to collect
  both secrets of one) are refused.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from fedrlhf_ray.errors import UserError
from fedrlhf_ray.local_trainer import RoundInstructions
from fedrlhf_ray.privacy.secagg import MaskingClient, round_graph, share_threshold
from fedrlhf_ray.schema import ExperimentConfig

# Slack for the float arithmetic of the driver's σ·C/√m against the floor σ·C/√K.
_RELATIVE_SLACK = 1e-9


def round_input_digest(global_weights: Mapping[str, np.ndarray], instructions: RoundInstructions) -> str:
    """SHA-256 of what a round's training starts from: the global weights (names, dtypes, shapes,
    bytes) and the instructions."""
    digest = hashlib.sha256(repr(instructions).encode())
    for name in sorted(global_weights):
        value = np.ascontiguousarray(global_weights[name])
        digest.update(f"\0{name}\0{value.dtype.str}\0{value.shape}\0".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def evaluation_digest(global_weights: Mapping[str, np.ndarray], finetune_iterations: int) -> str:
    """SHA-256 of what a secure evaluation evaluates: the model and the fine-tuning it asks for."""
    return round_input_digest(global_weights, RoundInstructions(proximal_mu=float(finetune_iterations)))


class ClientRefused(UserError):
    """A client refused a round's instruction that would weaken its privacy."""

    resumable = False


@dataclass(frozen=True)
class ClientPolicy:
    """See the module docstring. ``noise_ratio``: the least noise per unit of clip a client adds
    (σ_Δ/√K; 0 when the clients add none); ``count_ratio`` the same for adaptive clipping's
    not-clipped bit (σ_b/√K)."""

    secure_aggregation: bool = False
    threshold_fraction: float = 0.5
    clients_clip: bool = False
    noise_ratio: float = 0.0
    count_ratio: float = 0.0
    # The neighbour-graph rule and the run's public seed: the client derives its neighbours itself.
    secagg_neighbours: int | None = None
    graph_seed: int = 0
    # Against a malicious server: signed key advertisements and the consistency round.
    signed: bool = True
    # Secure aggregation or DP: held-out metrics leave only inside a secure sum.
    private_evaluation: bool = False

    @classmethod
    def from_config(cls, cfg: ExperimentConfig) -> ClientPolicy:
        p, dp = cfg.privacy, cfg.privacy.dp
        neighbours = None if p.secagg_neighbours is None else int(p.secagg_neighbours)
        signed = p.secagg_adversary == "malicious"
        if not dp.enabled:
            return cls(p.secure_aggregation, float(p.secagg_threshold), secagg_neighbours=neighbours,
                       graph_seed=int(cfg.seed), signed=signed, private_evaluation=p.secure_aggregation)
        pool = 1 if cfg.federation.baseline == "centralized" else cfg.clients.num_clients
        from fedrlhf_ray.privacy.dp import round_step  # dp_accounting: only when DP is on

        _, update_noise, count_stddev = round_step(
            float(dp.noise_multiplier), pool, cfg.clients_per_round_count(pool), bool(dp.adaptive_clipping),
            None if dp.clipped_count_stddev is None else float(dp.clipped_count_stddev),
        )
        distributed = dp.mode == "distributed"
        return cls(
            secure_aggregation=p.secure_aggregation,
            threshold_fraction=float(p.secagg_threshold),
            clients_clip=distributed or p.secure_aggregation,
            noise_ratio=update_noise / math.sqrt(pool) if distributed else 0.0,
            count_ratio=(count_stddev or 0.0) / math.sqrt(pool) if distributed else 0.0,
            secagg_neighbours=neighbours,
            graph_seed=int(cfg.seed),
            signed=signed,
            private_evaluation=True,
        )

    def check_plain(self, client_id: int, round_index: int, instructions: RoundInstructions) -> None:
        """Before a plain (unmasked) update is trained and sent."""
        if self.secure_aggregation:
            raise ClientRefused(
                f"client {client_id} refused round {round_index}: it takes part under secure aggregation "
                "and never sends an unmasked update"
            )
        self.check_dp(client_id, round_index, instructions)

    def check_dp(self, client_id: int, round_index: int, instructions: RoundInstructions) -> None:
        """The round's DP instructions against the policy."""
        if not self.clients_clip:
            return
        dp = instructions.dp
        refused = f"client {client_id} refused round {round_index}"
        if dp is None:
            raise ClientRefused(f"{refused}: its privacy settings need it to clip (and noise) its update, "
                                "and the round asked for no DP")
        if not (math.isfinite(dp.clip) and dp.clip > 0):
            raise ClientRefused(f"{refused}: clip norm {dp.clip!r} is not a positive finite number")
        floor = self.noise_ratio * dp.clip
        if not math.isfinite(dp.noise_stddev) or dp.noise_stddev < floor * (1 - _RELATIVE_SLACK):
            raise ClientRefused(
                f"{refused}: noise std {dp.noise_stddev:g} for clip {dp.clip:g} is below its floor {floor:g} "
                "(privacy.dp.noise_multiplier over the largest cohort)"
            )
        count_floor = self.count_ratio * (1 - _RELATIVE_SLACK)
        if self.count_ratio > 0 and (
            not dp.count or not math.isfinite(dp.count_stddev) or dp.count_stddev < count_floor
        ):
            raise ClientRefused(
                f"{refused}: the adaptive-clipping count's noise is below its floor {self.count_ratio:g}"
            )

    @staticmethod
    def check_once(client_id: int, round_index: int, last_sent: int, what: str = "masked input") -> None:
        """Before a masked input (or evaluation) of ``round_index`` is made: the client sent none
        for this round or a later one (``last_sent``). A round run twice over different clients
        would give the driver the difference of two sums: one client's update (or metrics)."""
        if round_index <= last_sent:
            raise ClientRefused(
                f"client {client_id} refused round {round_index}: it already sent a {what} for round "
                f"{last_sent}, and a round runs once"
            )

    def check_plain_evaluation(self, client_id: int, round_index: int) -> None:
        """Before held-out metrics leave in the clear."""
        if self.private_evaluation:
            raise ClientRefused(
                f"client {client_id} refused to evaluate round {round_index} in the clear: under its privacy "
                "settings its metrics leave only inside a secure sum"
            )

    @staticmethod
    def check_digest(client_id: int, round_index: int, announced: str, received: str) -> None:
        """Before a masked input is made: the model (and instructions) it got are the ones its key
        advertisement named, so every client of the session works on the same broadcast (a driver
        cannot send one client crafted weights to probe its held-out data)."""
        if announced != received:
            raise ClientRefused(
                f"client {client_id} refused round {round_index}: the weights it was sent are not the ones the "
                "session announced"
            )

    def check_threshold(self, client_id: int, round_index: int, threshold: int, degree: int) -> None:
        """Before a client shares its secrets among ``degree`` neighbours, ``threshold`` of them
        needed to rebuild each."""
        least = share_threshold(degree, self.threshold_fraction)
        if degree < 2 or threshold < least or threshold > degree:
            raise ClientRefused(
                f"client {client_id} refused round {round_index}: share threshold {threshold} of {degree} "
                f"neighbours (it needs {least} to {degree}, with at least 2 neighbours)"
            )

    def check_neighbours(self, client_id: int, round_index: int, neighbours: set[int], members: list[int]) -> None:
        """Before sharing: the neighbours the driver relays keys of are the ones the round's
        public seed gives this client among ``members`` (the clients that advertised keys)."""
        derived = round_graph(sorted(set(members)), self.secagg_neighbours, self.graph_seed, round_index)
        if set(derived.get(client_id, ())) != neighbours or len(set(members)) != len(members):
            raise ClientRefused(
                f"client {client_id} refused round {round_index}: its neighbours are not the ones the round's "
                "public seed gives it"
            )

    def check_advertisement(self, client_id: int, round_index: int, neighbour: int, signed: bool) -> None:
        """Before sharing: each neighbour's round keys are signed by its registered identity (a
        driver that substitutes its own keys would open every share sealed for them)."""
        if self.signed and not signed:
            raise ClientRefused(
                f"client {client_id} refused round {round_index}: client {neighbour}'s key advertisement is not "
                "signed by its registered identity"
            )

    @staticmethod
    def check_survivors(
        client_id: int, round_index: int, survivors: tuple[int, ...], masking: MaskingClient | None
    ) -> None:
        """Before signing the survivor set: the client sent a masked input this round and is a
        survivor, the set names only clients it agreed masks with (or others), at least its
        threshold of its neighbours, and it signs one set a round."""
        refused = f"client {client_id} refused round {round_index}"
        if masking is None or not masking.active:
            raise ClientRefused(f"{refused}: it sent no masked input this round, so it confirms no survivors")
        near = set(survivors) & set(masking.neighbours)
        if client_id not in survivors or not near <= masking.active or len(near) < masking.threshold:
            raise ClientRefused(
                f"{refused}: the survivor set leaves it {len(near)} neighbours it agreed masks with, it needs "
                f"{masking.threshold} (and itself among them)"
            )
        if masking.confirmed is not None and masking.confirmed != survivors:
            raise ClientRefused(f"{refused}: it already confirmed another survivor set")

    def check_reveal(
        self, client_id: int, round_index: int, survivors: tuple[int, ...], masking: MaskingClient | None,
        signers: int,
    ) -> None:
        """Before revealing shares: the survivors are the set it confirmed, and ``signers`` of its
        neighbours (at least its threshold) signed that same set."""
        refused = f"client {client_id} refused round {round_index}"
        if masking is None or masking.confirmed != survivors:
            raise ClientRefused(f"{refused}: the survivor set to reveal for is not the one it confirmed")
        if self.signed and signers < masking.threshold:
            raise ClientRefused(
                f"{refused}: {signers} of its neighbours signed the survivor set it confirmed, it needs "
                f"{masking.threshold}"
            )

    def check_active(
        self, client_id: int, round_index: int, neighbours: set[int], active: set[int], senders: set[int],
        threshold: int,
    ) -> None:
        """Before a masked update leaves: the neighbours the driver calls active are exactly those
        whose shares this client holds, and at least ``threshold`` of them (else its masks could
        be removed, or its secrets rebuilt by fewer than the threshold)."""
        claimed = neighbours & active
        if claimed != senders or len(claimed) < threshold:
            raise ClientRefused(
                f"client {client_id} refused round {round_index}: the round's active neighbours "
                f"({len(claimed)}) are not the {len(senders)} whose shares it holds, or fewer than its "
                f"threshold {threshold}"
            )
