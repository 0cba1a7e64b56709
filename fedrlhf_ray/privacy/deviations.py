"""The deviating server: the leakage audit's attacks that lie in what the driver sends the clients.

``fedrlhf audit CONFIG --deviate ATTACK`` plays a server that does not follow the protocol
against the real client actors, each attack one way to read a client's own update (or its
held-out data) that the passive audit cannot:

* ``active-set`` tells every client that none of its neighbours' shares went out, so that it
  agrees no pair masks; its masked input is then hidden by its self mask alone, which the
  unmasking reveals.
* ``low-threshold`` asks for shares one neighbour can rebuild (t = 1), then tells each client
  that another one dropped out: one share of that client's mask key comes back beside the
  others' shares of its self-mask seed, both secrets, and every mask of it comes off.
* ``key-substitution`` relays to each client key advertisements of the driver's own making in
  place of its neighbours', so that every share it seals is sealed to the driver.
* ``replay`` runs the round, then runs it again without one client and subtracts the sums: that
  client's update (once for each client).
* ``sigma-zero`` tells the clients to add no noise of their own (distributed DP).
* ``crafted-evaluation`` asks each client to evaluate, in the clear, a model the driver made.

Each is a :class:`~fedrlhf_ray.collectors.Collector` over the host pool. What it learns is
:class:`Learned`: each client's update as the server recovered it (or as it arrived, when the
attack needed no lie or did not apply), per-client metrics of the crafted model, or the line of
the first client that refused. A round a client refused, or one the server told a lie of the
protocol in, is spent (:class:`RoundSpent`): nothing of it enters the model. Without secure
aggregation the updates arrive in the clear, so the secure-aggregation lies gain nothing more:
they collect as the honest driver does.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedrlhf_ray.collectors import Collected, Collector, Hosts, RoundSpent
from fedrlhf_ray.local_trainer import MaskedUpdate, RoundInstructions, Weights
from fedrlhf_ray.privacy import DEVIATIONS
from fedrlhf_ray.privacy.audit import read_as_weights
from fedrlhf_ray.privacy.client_dp import UNCLIPPED_KEY
from fedrlhf_ray.privacy.client_policy import ClientRefused
from fedrlhf_ray.privacy.secagg import (
    MaskingClient,
    combine_secret,
    dequantize,
    pair_mask,
    prg,
    round_graph,
    share_threshold,
)
from fedrlhf_ray.privacy.secure_round import SecureCollector, unflatten

Advertisement = tuple[bytes, bytes, bytes]


@dataclass
class Learned:
    """What the deviating server learned in a round (see the module docstring)."""

    refusal: str = ""
    updates: dict[int, Weights] = field(default_factory=dict)
    evaluations: dict[int, dict[str, float]] = field(default_factory=dict)


def strip_masks(
    masked: np.ndarray, session: int, client: int, self_seed: bytes,
    mask_key: X25519PrivateKey | None = None, neighbour_mask_pks: Mapping[int, bytes] | None = None,
) -> np.ndarray:
    """A client's input x from its masked y = x + PRG(b) + Σ ±PRG(s_kj), given its self-mask seed
    and, for the pair masks, its mask private key and the mask public keys it was told: what a
    server that holds both secrets of one client computes (the protocol never reveals both)."""
    x = np.asarray(masked).copy() - prg(self_seed, len(masked), b"self")
    for j, pk in (neighbour_mask_pks or {}).items():
        assert mask_key is not None
        pair = pair_mask(mask_key, pk, session, client, j, len(masked))
        x = x - pair if client < j else x + pair
    return x


def decode_input(x: np.ndarray, template: Mapping[str, np.ndarray], fraction_bits: int) -> Weights:
    """A client's unmasked w·θ ‖ w ‖ metrics as its weights θ (named as in ``template``)."""
    size = sum(int(np.size(v)) for v in template.values())
    flat = dequantize(x, fraction_bits)
    weights = unflatten(flat[:size] / flat[size], template, dtype=np.dtype(np.float64))
    weights.pop(UNCLIPPED_KEY, None)
    return weights


@dataclass
class _Session:
    """One session of the protocol driven step by step by the deviating server."""

    hosts: Hosts
    r: int
    protocol: SecureCollector
    keys: dict[int, Advertisement] = field(default_factory=dict)
    graph: dict[int, list[int]] = field(default_factory=dict)
    threshold: int = 0

    def advertise(self, clients: list[int], digest: str) -> None:
        groups = self.hosts.by_host(clients)
        replies = self.hosts.call_once("secagg_keys", self.r, groups, {h: (digest,) for h in groups})
        self.keys = {c: k for reply in replies.values() for c, k in reply.items()}
        self.graph = round_graph(sorted(self.keys), self.protocol.neighbours, self.protocol.seed, self.r)
        self.threshold = share_threshold(min(len(v) for v in self.graph.values()), self.protocol.threshold_fraction)

    def honest_keys(self) -> dict[int, dict[int, Advertisement]]:
        return {c: {j: self.keys[j] for j in self.graph[c]} for c in self.graph}

    def share(self, told: Mapping[int, Mapping[int, Advertisement]], threshold: int) -> dict[int, dict[int, bytes]]:
        """Each client's sealed shares by recipient, each client told ``told[c]`` of its neighbours."""
        groups = self.hosts.by_host(sorted(told))
        args = {h: ({c: dict(told[c]) for c in ids}, threshold, sorted(self.keys)) for h, ids in groups.items()}
        replies = self.hosts.call_once("secagg_shares", self.r, groups, args)
        return {c: s for reply in replies.values() for c, s in reply.items()}

    def masked(
        self, sealed: Mapping[int, Mapping[int, bytes]], active: list[int], masked_args: tuple[Any, ...]
    ) -> dict[int, MaskedUpdate]:
        held: dict[int, dict[int, bytes]] = {c: {} for c in sealed}
        for sender, blobs in sealed.items():
            for receiver, blob in blobs.items():
                held.setdefault(receiver, {})[sender] = blob
        groups = self.hosts.by_host(sorted(sealed))
        args = {
            h: (*masked_args, {c: held[c] for c in ids}, active, self.protocol.fraction_bits)
            for h, ids in groups.items()
        }
        replies = self.hosts.call_once("train_masked", self.r, groups, args)
        return {u.client_id: u for reply in replies.values() for u in reply}

    def reveal(self, told: Mapping[int, list[int]]) -> dict[int, dict[int, tuple[str, bytes]]]:
        """What each client reveals when told that ``told[c]`` survived (after it signed that set,
        in the consistency round, and with its neighbours' signatures of the same set)."""
        lists = sorted({tuple(v) for v in told.values()})
        signed: dict[int, bytes] = {}
        if self.protocol.consistency_round:
            for survivors in lists:
                groups = self.hosts.by_host([c for c in sorted(told) if tuple(told[c]) == survivors])
                args = {h: (list(survivors),) for h in groups}
                replies = self.hosts.call_once("secagg_confirm", self.r, groups, args)
                signed.update({c: sig for reply in replies.values() for c, sig in reply.items()})
        revealed: dict[int, dict[int, tuple[str, bytes]]] = {}
        for survivors in lists:
            ids = [c for c in sorted(told) if tuple(told[c]) == survivors]
            groups = self.hosts.by_host(ids)
            reveal_args = {
                h: (list(survivors), {
                    c: {j: signed[j] for j in self.graph[c] if j in signed and tuple(told[j]) == survivors}
                    for c in members
                })
                for h, members in groups.items()
            }
            replies = self.hosts.call_once("secagg_reveal", self.r, groups, reveal_args)
            revealed.update({c: shares for reply in replies.values() for c, shares in reply.items()})
        return revealed


def shares_of(revealed: Mapping[int, Mapping[int, tuple[str, bytes]]], client: int, kind: str) -> list[bytes]:
    return [share for reveals in revealed.values() for c, (k, share) in reveals.items() if c == client and k == kind]


@dataclass(frozen=True)
class _Round:
    """A round's collection as the driver asks for it (the arguments of ``Collector.collect``)."""

    hosts: Hosts
    r: int
    sampled: list[int]
    global_ref: Any
    instructions: RoundInstructions
    shared: Mapping[str, np.ndarray]
    keep_from: int
    digest: str

    @property
    def masked_args(self) -> tuple[Any, ...]:
        return (self.global_ref, self.instructions, self.keep_from)

    @property
    def template(self) -> dict[str, np.ndarray]:
        """What a client's input holds: the shared weights and, when DP counts them, its not-clipped bit."""
        counting = self.instructions.dp is not None and self.instructions.dp.count
        return {**self.shared, UNCLIPPED_KEY: np.zeros(1)} if counting else dict(self.shared)


@dataclass
class Deviation:
    """A collector that deviates (:meth:`lie`) where secure aggregation gives it something to lie
    about, and collects honestly (through ``honest``) where not; see the module docstring."""

    name: ClassVar[str]
    honest: Collector
    secure: SecureCollector | None
    learned: Learned = field(default_factory=Learned)

    def told(self, instructions: RoundInstructions) -> RoundInstructions:
        """The instructions the clients are sent, from the honest ones."""
        return instructions

    def collect(
        self, hosts: Hosts, round_index: int, sampled: list[int], global_ref: Any,
        instructions: RoundInstructions, shared: Mapping[str, np.ndarray], keep_from: int, digest: str = "",
    ) -> Collected:
        round_ = _Round(hosts, round_index, sampled, global_ref, instructions, shared, keep_from, digest)
        try:
            if not (self.secure is not None and self.lie(round_)):
                collected = self.honest.collect(
                    hosts, round_index, sampled, global_ref, instructions, shared, keep_from, digest
                )
                self.learned.updates = {u.client_id: read_as_weights(u, shared) for u in collected.updates}
                return collected
        except ClientRefused as err:
            self.learned.refusal = str(err)
            raise RoundSpent(f"round {round_index}: a client refused the deviating server", len(sampled)) from None
        raise RoundSpent(f"round {round_index}: the deviating server keeps what it learned", len(sampled))

    def lie(self, round_: _Round) -> bool:
        """The attack on a secure round (what it learns goes to :attr:`learned`); False when
        this deviation has no lie to tell there, and the round is collected honestly."""
        return False

    def probe(self, hosts: Hosts, round_index: int, clients: list[int], crafted: Any, finetune: int) -> None:
        """After the round's evaluation: the attack on evaluation (none but the crafted one's)."""


# Per client: its masked input, its self-mask seed, and its mask key with the mask public keys
# it was told (None and {} when it added no pair masks).
Secrets = dict[int, tuple[np.ndarray, bytes, X25519PrivateKey | None, dict[int, bytes]]]


@dataclass
class _SessionLie(Deviation):
    """A lie told within one session of the protocol: :meth:`tell` runs it, then each client's
    update comes out of its masked input with the secrets the lie got back."""

    def lie(self, round_: _Round) -> bool:
        assert self.secure is not None
        session = _Session(round_.hosts, round_.r, self.secure)
        session.advertise(round_.sampled, round_.digest)
        for u, (masked, seed, key, pks) in self.tell(session, round_.masked_args).items():
            x = strip_masks(masked, round_.r, u, seed, key, pks)
            self.learned.updates[u] = decode_input(x, round_.template, self.secure.fraction_bits)
        return True

    @abstractmethod
    def tell(self, session: _Session, masked_args: tuple[Any, ...]) -> Secrets: ...


def _key(shares: list[bytes]) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(combine_secret(shares))


@dataclass
class ActiveSetLie(_SessionLie):
    name: ClassVar[str] = "active-set"

    def tell(self, session: _Session, masked_args: tuple[Any, ...]) -> Secrets:
        sealed = session.share(session.honest_keys(), session.threshold)
        sent = session.masked(sealed, [], masked_args)  # "none of your neighbours' shares went out"
        revealed = session.reveal({c: sorted(sent) for c in sent})
        t = session.threshold
        return {u: (y.masked, combine_secret(shares_of(revealed, u, "b")[:t]), None, {}) for u, y in sent.items()}


@dataclass
class LowThreshold(_SessionLie):
    name: ClassVar[str] = "low-threshold"

    def tell(self, session: _Session, masked_args: tuple[Any, ...]) -> Secrets:
        sealed = session.share(session.honest_keys(), 1)
        sent = session.masked(sealed, sorted(sealed), masked_args)
        survivors = sorted(sent)
        # Each client is told that the next one dropped: it reveals that one's mask-key share.
        dropped = {c: survivors[(i + 1) % len(survivors)] for i, c in enumerate(survivors)}
        revealed = session.reveal({c: [u for u in survivors if u != dropped[c]] for c in survivors})
        return {
            u: (y.masked, combine_secret(shares_of(revealed, u, "b")[:1]), _key(shares_of(revealed, u, "sk")[:1]),
                {j: session.keys[j][0] for j in session.graph[u]})
            for u, y in sent.items()
        }


@dataclass
class KeySubstitution(_SessionLie):
    name: ClassVar[str] = "key-substitution"

    def tell(self, session: _Session, masked_args: tuple[Any, ...]) -> Secrets:
        fakes = {j: MaskingClient(j, session.r) for j in session.keys}
        # The driver's keys, with the neighbour's genuine signature (of its own keys) beside them.
        told = {
            c: {j: (*fakes[j].public_keys(), session.keys[j][2]) for j in session.graph[c]} for c in session.graph
        }
        sealed = session.share(told, session.threshold)
        sent = session.masked(sealed, sorted(sealed), masked_args)
        for j, fake in fakes.items():
            fake.neighbours = {c: session.keys[c][:2] for c in sealed if j in sealed[c]}
            fake.keep_shares({c: blobs[j] for c, blobs in sealed.items() if j in blobs})
        b = {j: fake.reveal(set(sealed)) for j, fake in fakes.items()}
        sk = {j: fake.reveal(set()) for j, fake in fakes.items()}
        t = session.threshold
        return {
            u: (y.masked, combine_secret(shares_of(b, u, "b")[:t]), _key(shares_of(sk, u, "sk")[:t]),
                {j: told[u][j][0] for j in session.graph[u]})
            for u, y in sent.items()
        }


@dataclass
class Replay(Deviation):
    name: ClassVar[str] = "replay"

    def lie(self, round_: _Round) -> bool:
        secure = self.secure
        assert secure is not None

        def total(clients: list[int]) -> tuple[Weights, float]:
            collected = secure.collect(round_.hosts, round_.r, clients, round_.global_ref, round_.instructions,
                                       round_.shared, round_.keep_from, round_.digest)
            assert collected.total is not None
            return collected.total

        everyone, weight = total(round_.sampled)
        for u in round_.sampled:
            others, rest = total([c for c in round_.sampled if c != u])
            self.learned.updates[u] = {k: (everyone[k] - others[k]) / (weight - rest) for k in round_.shared}
        return True


@dataclass
class SigmaZero(Deviation):
    name: ClassVar[str] = "sigma-zero"

    def told(self, instructions: RoundInstructions) -> RoundInstructions:
        if instructions.dp is None:
            return instructions
        dp = replace(instructions.dp, noise_stddev=0.0, count_stddev=0.0)
        return replace(instructions, dp=dp)


@dataclass
class CraftedEvaluation(Deviation):
    name: ClassVar[str] = "crafted-evaluation"

    def probe(self, hosts: Hosts, round_index: int, clients: list[int], crafted: Any, finetune: int) -> None:
        groups = hosts.by_host(clients)
        try:
            replies, _ = hosts.call("evaluate_clients", round_index, groups, crafted, finetune)
        except ClientRefused as err:
            self.learned.refusal = str(err)
            return
        for h, metrics in replies.items():
            self.learned.evaluations.update(zip(groups[h], metrics, strict=True))


def craft(weights: Mapping[str, np.ndarray], seed: int) -> Weights:
    """A model of the driver's making: the global one, every float moved at random."""
    rng = np.random.default_rng(seed)
    return {
        k: (np.asarray(v) + rng.normal(0.0, 0.1, np.shape(v)).astype(np.asarray(v).dtype))
        if np.issubdtype(np.asarray(v).dtype, np.floating) else np.asarray(v)
        for k, v in weights.items()
    }


ATTACKS: dict[str, Callable[..., Deviation]] = {
    cls.name: cls for cls in (ActiveSetLie, LowThreshold, KeySubstitution, Replay, SigmaZero, CraftedEvaluation)
}
assert tuple(ATTACKS) == DEVIATIONS
