"""Client actors: each hosts a pool of virtual clients over one local trainer.

A :class:`ClientHost` serves the clients pinned to it (``client_id % W``). Per client it keeps
one record: the trainer's state (reward model, feedback, human RNG, optimizer state) and the
parameters that never leave the client (a personal head, or the whole model for the local-only
baseline). The host alone writes and reads those records, in its client-side state store
(:class:`~fedrlhf_ray.client_store.ClientStore`), after every round a client trains; what it
returns to the driver is shared weights, sample counts and scalar metrics, nothing else.

A host that dies (its process killed) is restarted by Ray and rebuilds its records lazily from
the store, as of the round the driver asks for: a client's round is a function of (seed, round,
client, record), so retrying it on the restarted host gives exactly the lost result.

``ClientActor`` is the same class as a Ray actor; tests can use the plain class.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Any

import ray
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedrlhf_ray.attacks import Attack
from fedrlhf_ray.client_store import SENT_EVALUATION, SENT_TRAINING, ClientStore
from fedrlhf_ray.local_trainer import ClientUpdate, LocalTrainer, MaskedUpdate, RoundInstructions, Weights
from fedrlhf_ray.metrics import metric_block
from fedrlhf_ray.privacy.client_policy import ClientPolicy, ClientRefused, evaluation_digest, round_input_digest
from fedrlhf_ray.privacy.pki import IdentityError, Registry, advertisement, load_or_make_identity, survivor_set, verify
from fedrlhf_ray.privacy.secagg import MaskingClient, SecAggError, quantize
from fedrlhf_ray.process_setup import install_process
from fedrlhf_ray.state_codec import StateFileError
from fedrlhf_ray.strategies import split_personal
from fedrlhf_ray.update_transforms import (
    Outgoing,
    apply_transforms,
    masked_transforms,
    plain_transforms,
)

EVERYTHING = ("",)  # the prefix of every parameter name: nothing is shared


class ClientHost:
    """Serves the virtual clients assigned to it; see the module docstring."""

    def __init__(
        self,
        trainer_factory: Callable[[], LocalTrainer],
        store_root: str,
        personal_prefixes: Collection[str] = (),
        attack: Attack | None = None,
        policy: ClientPolicy | None = None,
    ) -> None:
        install_process()
        # What this host's clients enforce whatever a round asks (set here, at creation).
        self.policy = policy or ClientPolicy()
        self.trainer = trainer_factory()
        self.store = ClientStore(store_root)
        self.personal_prefixes = tuple(personal_prefixes)
        # Byzantine behaviour of this host's malicious clients (robustness studies only).
        self.attack = attack
        # This round's secure-aggregation secrets of each client: in memory only, gone after it.
        self.masking: dict[int, MaskingClient] = {}
        # Long-term signing keys of this host's clients, and the federation's registry of keys.
        self.identities: dict[int, Ed25519PrivateKey] = {}
        self.registry = Registry(Path(store_root) / "pki")
        # In-memory copies of the stored records, filled lazily: {client: (trainer state, personal)}.
        self.records: dict[int, dict[str, Any]] = {}

    def ready(self) -> bool:
        return True

    def node_id(self) -> str:
        """The Ray node this host runs on (``"local"`` outside Ray)."""
        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"

    def initial_weights(self) -> Weights:
        """The freshly built policy's parameters (every host builds the same ones)."""
        return self.trainer.get_weights()

    # -- records -------------------------------------------------------------------------------
    def _record(self, client_id: int, as_of: int) -> dict[str, Any] | None:
        """The client's record as of round ``as_of`` (None: it has not trained yet)."""
        if client_id not in self.records:
            record = self.store.load(client_id, upto=as_of)
            if record is None:
                return None
            # A record that parses but is not one this host wrote counts as damaged.
            if not isinstance(record, dict) or not isinstance(record.get("personal"), dict) or "trainer" not in record:
                raise StateFileError(f"client {client_id}'s record lacks its fields")
            self.records[client_id] = record
        return self.records[client_id]

    def restore(self, round_index: int, client_ids: list[int]) -> list[int]:
        """Reload these clients' records as of ``round_index``; returns the ids whose record is
        damaged (the driver then falls back to an older checkpoint)."""
        self.records = {}
        damaged = []
        for client_id in client_ids:
            try:
                self._record(client_id, round_index)
            except StateFileError:
                damaged.append(client_id)
        return damaged

    def _swap_in(self, client_id: int, global_weights: Weights, as_of: int) -> None:
        record = self._record(client_id, as_of)
        self.trainer.load_client(client_id, None if record is None else record["trainer"])
        # Personal parameters override the global ones: they are this client's own.
        personal = {} if record is None else record["personal"]
        self.trainer.set_weights({**global_weights, **personal})

    # -- training ------------------------------------------------------------------------------
    def _train(
        self, round_index: int, client_id: int, global_weights: Weights, instructions: RoundInstructions,
        keep_from: int, received: str,
    ) -> Outgoing:
        """One local round and its record written to the store (put on disk by the caller); the
        store keeps the records a restore of round ``keep_from`` or later needs.

        A round this client already trained is trained again only from the very same global
        model and instructions (a retry or a resume, which repeats its update exactly): a driver
        that asks for round r twice with another model would learn, from the difference of two
        updates that carry the same DP noise, the update without its noise. ``received``: the
        :func:`round_input_digest` of the call, computed once for all of its clients."""
        if self.store.latest(client_id, round_index) == round_index:
            try:
                before = self.store.load(client_id, upto=round_index) or {}
            except StateFileError:
                before = {}  # damaged: this round's save replaces it
            # No digest: a record of an older version, written before records kept one.
            if isinstance(before, dict) and before.get("input") not in (None, received):
                raise ClientRefused(
                    f"client {client_id} refused round {round_index}: it already trained that round from "
                    "another global model or other instructions"
                )
        self._swap_in(client_id, global_weights, round_index - 1)
        prefixes = EVERYTHING if instructions.keep_local else self.personal_prefixes
        mu = instructions.proximal_mu
        # The proximal anchor is the shared model only: personal parameters are not pulled
        # towards the global copy, which nobody trains.
        anchor = {k: v for k, v in global_weights.items() if not k.startswith(prefixes)} if mu > 0 else None
        num_samples, metrics = self.trainer.train(round_index, anchor, mu)
        shared, personal = split_personal(self.trainer.get_weights(), prefixes)
        record = {"trainer": self.trainer.save_client(), "personal": personal, "input": received}
        start = time.perf_counter()
        size = self.store.save(client_id, round_index, record, keep_from=keep_from)
        self.records[client_id] = record
        metrics = {**metrics, "store/record_bytes": size, "store/save_ms": 1e3 * (time.perf_counter() - start)}
        return Outgoing(
            round_index, client_id, global_weights, shared, int(num_samples),
            {k: float(v) for k, v in metrics.items()}, sum_weight=float(num_samples),
        )

    def _train_plain(
        self, round_index: int, client_id: int, global_weights: Weights, instructions: RoundInstructions,
        keep_from: int, received: str,
    ) -> ClientUpdate:
        self.policy.check_plain(client_id, round_index, instructions)
        out = self._train(round_index, client_id, global_weights, instructions, keep_from, received)
        sent = apply_transforms(out, plain_transforms(instructions, self.attack, self.store.noise_secret))
        assert sent is not None, "DP and attacks always send an update"
        update = sent.message()
        assert isinstance(update, ClientUpdate)
        return update

    def train_client(
        self, round_index: int, client_id: int, global_weights: Weights, instructions: RoundInstructions,
        keep_from: int,
    ) -> ClientUpdate:
        """One local round; returns only shared weights, the sample count and scalars, once the
        client's record is on disk."""
        received = round_input_digest(global_weights, instructions)
        update = self._train_plain(round_index, client_id, global_weights, instructions, keep_from, received)
        self.store.flush()
        return update

    def train_clients(
        self, round_index: int, client_ids: list[int], global_weights: Weights, instructions: RoundInstructions,
        keep_from: int,
    ) -> Iterator[ClientUpdate]:
        """The round's clients of this host, one after the other, streamed back as they finish.

        One remote call per host and round instead of one per client: Ray's per-call cost
        (~1 ms) is what dominated the engine's overhead with light local training. Each update
        leaves only once its record is on disk: the driver may checkpoint before the rest end.
        """
        received = round_input_digest(global_weights, instructions)
        for client_id in client_ids:
            update = self._train_plain(round_index, client_id, global_weights, instructions, keep_from, received)
            self.store.flush()
            yield update

    def train_batch(
        self, round_index: int, client_ids: list[int], global_weights: Weights, instructions: RoundInstructions,
        keep_from: int,
    ) -> list[ClientUpdate]:
        """Like :meth:`train_clients` but in one reply (no straggler deadline to honour), with
        one flush of the store for all the records."""
        received = round_input_digest(global_weights, instructions)
        updates = [
            self._train_plain(round_index, c, global_weights, instructions, keep_from, received) for c in client_ids
        ]
        self.store.flush()
        return updates

    # -- identities (fedrlhf_ray.privacy.pki) ------------------------------------------------------
    def _identity(self, client_id: int) -> Ed25519PrivateKey:
        if client_id not in self.identities:
            try:
                key = load_or_make_identity(self.store.private_path(client_id, "identity.key"))
            except IdentityError as err:
                raise ClientRefused(f"client {client_id} cannot sign for secure aggregation: {err}") from None
            self.identities[client_id] = key
        return self.identities[client_id]

    def _registered(self, client_id: int, round_index: int, neighbour: int) -> Ed25519PublicKey:
        try:
            return self.registry.public_key(neighbour)
        except IdentityError as err:
            raise ClientRefused(f"client {client_id} refused round {round_index}: {err}") from None

    def register(self, round_index: int, client_ids: list[int]) -> None:
        """When the federation is set up: each client's signing key, its public half published in
        the registry (a key registered already must be the client's own)."""
        for c in client_ids:
            try:
                self.registry.publish(c, self._identity(c).public_key())
            except IdentityError as err:
                raise ClientRefused(f"client {c} cannot join secure aggregation: {err}") from None

    # -- secure aggregation (fedrlhf_ray.privacy.secagg) -----------------------------------------
    def secagg_keys(
        self, round_index: int, client_ids: list[int], digest: str
    ) -> dict[int, tuple[bytes, bytes, bytes]]:
        """Fresh key pairs for this session's clients; only the public halves leave, signed with
        the ``digest`` of what the session trains or evaluates. ``round_index``: the session
        (a training round, or :func:`~fedrlhf_ray.privacy.secagg.evaluation_session`)."""
        self.masking = {c: MaskingClient(c, round_index, digest=str(digest)) for c in client_ids}
        adverts = {}
        for c, masking in self.masking.items():
            mask_pk, channel_pk = masking.public_keys()
            message = advertisement(round_index, c, mask_pk, channel_pk, masking.digest)
            adverts[c] = (mask_pk, channel_pk, self._identity(c).sign(message) if self.policy.signed else b"")
        return adverts

    def secagg_shares(
        self, round_index: int, client_ids: list[int],
        neighbour_keys: dict[int, dict[int, tuple[bytes, bytes, bytes]]], threshold: int, members: list[int],
    ) -> dict[int, dict[int, bytes]]:
        """Each client's sealed shares, by recipient (only the recipient can open them), once
        it has checked the threshold, its neighbours and their signed keys."""
        for c in client_ids:
            keys = neighbour_keys[c]
            self.policy.check_threshold(c, round_index, threshold, len(keys))
            self.policy.check_neighbours(c, round_index, set(keys), list(members))
            # A neighbour's advertisement verifies only if it named the same model as this one's.
            for j, (mask_pk, channel_pk, signature) in keys.items() if self.policy.signed else ():
                signed = verify(self._registered(c, round_index, j), signature,
                                advertisement(round_index, j, mask_pk, channel_pk, self.masking[c].digest))
                self.policy.check_advertisement(c, round_index, j, signed)
        return {
            c: self.masking[c].make_shares({j: (m, ch) for j, (m, ch, _) in neighbour_keys[c].items()}, threshold)
            for c in client_ids
        }

    def train_masked(
        self, round_index: int, client_ids: list[int], global_weights: Weights, instructions: RoundInstructions,
        keep_from: int, held: dict[int, dict[int, bytes]], active: list[int], fraction_bits: int,
    ) -> list[MaskedUpdate]:
        """Train each client, then send w·θ and w (w: its sample count, 1 under DP) as one masked
        vector. ``active``: the clients whose shares went out, the only ones masks are agreed with.
        A client sends one masked input per round, ever (noted in its store before it leaves)."""
        sent: list[MaskedUpdate] = []
        received = round_input_digest(global_weights, instructions)
        for c in client_ids:
            masking = self.masking[c]
            self.policy.check_once(c, round_index, self._last_sent(c, round_index, SENT_TRAINING))
            self.policy.check_digest(c, round_index, masking.digest, received)
            self.policy.check_dp(c, round_index, instructions)
            self.policy.check_active(
                c, round_index, set(masking.neighbours), set(active), set(held.get(c, {})), masking.threshold
            )
            out = self._train(round_index, c, global_weights, instructions, keep_from, received)
            masking.keep_shares(held.get(c, {}))
            masking.active = frozenset(active)
            transforms = masked_transforms(
                instructions, self.attack, self.store.noise_secret, masking, active, fraction_bits
            )
            final = apply_transforms(out, transforms)
            if final is not None:  # else it could not be encoded: the client drops out of the sum
                message = final.message()
                assert isinstance(message, MaskedUpdate)
                self.store.note_sent(c, round_index, SENT_TRAINING)
                sent.append(message)
        self.store.flush()
        return sent

    def evaluate_masked(
        self, session: int, client_ids: list[int], global_weights: Weights, finetune_iterations: int,
        round_index: int, held: dict[int, dict[int, bytes]], active: list[int], fraction_bits: int,
    ) -> list[MaskedUpdate]:
        """Each client's held-out metrics of round ``round_index``'s model as one masked vector,
        values ‖ present flags (a non-finite value counts as absent), with the metric names in the
        clear: the driver learns only the sums over the session's survivors. One evaluation per
        round and client, of the model the session announced."""
        sent: list[MaskedUpdate] = []
        received = evaluation_digest(global_weights, finetune_iterations)
        for c in client_ids:
            masking = self.masking[c]
            self.policy.check_once(
                c, round_index, self._last_sent(c, round_index, SENT_EVALUATION), "masked evaluation"
            )
            self.policy.check_digest(c, round_index, masking.digest, received)
            self.policy.check_active(
                c, round_index, set(masking.neighbours), set(active), set(held.get(c, {})), masking.threshold
            )
            metrics = self.evaluate_client(round_index, c, global_weights, finetune_iterations)
            names = tuple(sorted(metrics))
            try:
                vector = quantize(metric_block(metrics, names), fraction_bits)
            except SecAggError:
                continue  # a metric too large to encode: the client leaves the sum
            masking.keep_shares(held.get(c, {}))
            masking.active = frozenset(active)
            masked = masking.mask(vector, set(active))
            self.store.note_sent(c, round_index, SENT_EVALUATION)
            sent.append(MaskedUpdate(c, masked, names=names, kind="evaluation"))
        self.store.flush()
        return sent

    def _last_sent(self, client_id: int, round_index: int, kind: str) -> int:
        try:
            return self.store.last_sent(client_id, kind)
        except StateFileError as err:
            raise ClientRefused(
                f"client {client_id} refused round {round_index}: its note of the rounds it sent is damaged ({err})"
            ) from None

    def secagg_confirm(self, round_index: int, client_ids: list[int], survivors: list[int]) -> dict[int, bytes]:
        """The consistency round: each client here signs the survivor set, once a round."""
        alive = tuple(sorted({int(u) for u in survivors}))
        signatures = {}
        for c in client_ids:
            masking = self.masking.get(c)
            self.policy.check_survivors(c, round_index, alive, masking)
            assert masking is not None
            masking.confirmed = alive
            signatures[c] = self._identity(c).sign(survivor_set(round_index, alive))
        return signatures

    def secagg_reveal(
        self, round_index: int, client_ids: list[int], survivors: list[int], signatures: dict[int, dict[int, bytes]]
    ) -> dict[int, dict[int, tuple[str, bytes]]]:
        """For each surviving client here: the shares it holds of its neighbours' secrets, once
        enough of its neighbours signed the survivor set it confirmed."""
        alive = tuple(sorted({int(u) for u in survivors}))
        message = survivor_set(round_index, alive)
        revealed = {}
        for c in client_ids:
            masking = self.masking.get(c)
            if not self.policy.signed:  # honest-but-curious: no consistency round to hold it to
                self.policy.check_survivors(c, round_index, alive, masking)
                assert masking is not None
                revealed[c] = masking.reveal(set(alive))
                continue
            signed = signatures.get(c, {})
            near = set(alive) & set(masking.neighbours if masking else ())
            signers = sum(
                verify(self._registered(c, round_index, j), signed[j], message) for j in sorted(near & set(signed))
            )
            self.policy.check_reveal(c, round_index, alive, masking, signers)
            assert masking is not None
            revealed[c] = masking.reveal(set(alive))
        for c in client_ids:  # a client reveals once a session: its secrets for it are gone
            self.masking.pop(c, None)
        return revealed

    # -- evaluation ----------------------------------------------------------------------------
    def evaluate_clients(
        self, round_index: int, client_ids: list[int], global_weights: Weights, finetune_iterations: int = 0
    ) -> list[dict[str, float]]:
        """Each client's held-out metrics in the clear (refused under privacy modes)."""
        for c in client_ids:
            self.policy.check_plain_evaluation(c, round_index)
        return [self.evaluate_client(round_index, c, global_weights, finetune_iterations) for c in client_ids]

    def evaluate_client(
        self, round_index: int, client_id: int, global_weights: Weights, finetune_iterations: int = 0
    ) -> dict[str, float]:
        """Held-out metrics of the model this client would use, ``eval/...``.

        With fine-tuning, also the plain global model's (``eval_global/...``); fine-tuning
        happens on a throw-away copy: the client's record is not touched.
        """
        self._swap_in(client_id, global_weights, round_index)
        if finetune_iterations <= 0:
            return self.trainer.evaluate(round_index)
        before = self.trainer.evaluate(round_index)
        self.trainer.finetune(round_index, finetune_iterations)
        after = self.trainer.evaluate(round_index)
        return {**{k.replace("eval/", "eval_global/", 1): v for k, v in before.items()}, **after}

    def client_samples(
        self, round_index: int, client_ids: list[int], global_weights: Weights, finetune_iterations: int = 0
    ) -> list[str | None]:
        """What each client's own model (personal layers, or fine-tuned on a throw-away copy)
        makes of the task's public inputs, in the clear: refused, like a plain evaluation, under
        the privacy modes."""
        for c in client_ids:
            self.policy.check_plain_evaluation(c, round_index)
        texts = []
        for c in client_ids:
            self._swap_in(c, global_weights, round_index)
            if finetune_iterations > 0:
                self.trainer.finetune(round_index, finetune_iterations)
            texts.append(self.trainer.samples(round_index))
        return texts


ClientActor = ray.remote(ClientHost)
