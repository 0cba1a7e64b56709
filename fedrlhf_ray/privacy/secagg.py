"""Secure aggregation: pairwise masking after Bonawitz et al. (CCS 2017), SecAgg+ neighbours.

One round, for the clients S the driver sampled (the driver only relays and sums):

1. **Keys.** Every client makes two X25519 key pairs for this round (``cryptography``): one to
   agree mask seeds, one to agree channel keys; the driver relays the public keys.
2. **Shares.** Every client draws a self-mask seed b_k and Shamir-shares (PyCryptodome, t of d)
   both b_k and its mask private key among its neighbours, each share encrypted with AES-GCM
   under the channel key it agrees with that neighbour; the driver relays the ciphertexts,
   which it cannot read.
3. **Masked input.** A client's vector x_k (fixed-point in the ring Z_2^64) is sent as
   y_k = x_k + PRG(b_k) + Σ_{j ∈ N(k)} ±PRG(s_kj), where s_kj is the HKDF of the X25519 secret
   it shares with neighbour j and the sign is + for k < j, − for k > j: the pair masks cancel
   in the sum, the self mask hides y_k even from a server that later learns s_kj.
4. **Unmasking.** The driver names the survivors U (clients whose masked input arrived). Each
   survivor reveals, for each neighbour, its share of b (neighbour in U) or of the mask private
   key (neighbour dropped after step 2) — never both for one client. With t shares the driver
   rebuilds every b_u (u ∈ U) and every dropped client's private key, removes the self masks of
   U and the pair masks survivors had with dropped clients, and is left with Σ_{u ∈ U} x_u.

PRG(seed) is the ChaCha20 keystream under the seed (``cryptography``), read as little-endian
uint64 words; arithmetic is mod 2^64 (NumPy's uint64 wraps), so masks cancel exactly and the only
error is fixed-point rounding: at most 2^-(f+1) per value and client (f = fraction bits).

The neighbour graph (SecAgg+, Bell et al. CCS 2020) is a random ring lattice: clients in a
random order, each linked to the d/2 nearest on either side, so a client's keys, shares and
masks grow with d = O(log |S|) instead of |S|. With d ≥ |S| − 1 it is the complete graph of the
original protocol.
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from Crypto.Protocol.SecretSharing import Shamir
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedrlhf_ray.seeding import derive_rng

RING = np.uint64
_RAW = serialization.Encoding.Raw
_PUBLIC = serialization.PublicFormat.Raw
_PRIVATE = serialization.PrivateFormat.Raw
_LIMIT = 2.0**62  # |fixed-point value| below this leaves room for sums of up to 2 clients without wrap


class SecAggError(ValueError):
    """The protocol cannot complete (too few shares, a tampered ciphertext, a value out of range)."""


# --------------------------------------------------------------------------- fixed point


def quantize(values: np.ndarray, fraction_bits: int) -> np.ndarray:
    """Values as fixed-point elements of Z_2^64 (two's complement), rounded to 2^-fraction_bits."""
    scaled = np.rint(np.asarray(values, dtype=np.float64) * 2.0**fraction_bits)
    if not np.isfinite(scaled).all() or (np.abs(scaled) >= _LIMIT).any():
        raise SecAggError(
            f"a value is outside the fixed-point range ±2^{62 - fraction_bits}: lower the fraction bits or clip"
        )
    return scaled.astype(np.int64).view(RING)


def dequantize(ring: np.ndarray, fraction_bits: int) -> np.ndarray:
    """Inverse of :func:`quantize` (for a sum too, as long as it did not wrap)."""
    return np.asarray(ring, dtype=RING).view(np.int64).astype(np.float64) / 2.0**fraction_bits


# --------------------------------------------------------------------------- primitives


def prg(seed: bytes, length: int, label: bytes) -> np.ndarray:
    """``length`` pseudo-random ring elements from a 32-byte seed (ChaCha20 keystream)."""
    nonce = HKDF(hashes.SHA256(), 16, salt=None, info=b"fedrlhf-secagg-prg " + label).derive(seed)
    stream = Cipher(algorithms.ChaCha20(seed, nonce), mode=None).encryptor().update(bytes(8 * length))
    return np.frombuffer(stream, dtype="<u8").astype(RING, copy=False)


def agree(private: X25519PrivateKey, peer_public: bytes, info: bytes) -> bytes:
    """32 bytes both ends of an X25519 pair derive alike (HKDF-SHA256 of the shared secret)."""
    secret = private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    return HKDF(hashes.SHA256(), 32, salt=None, info=b"fedrlhf-secagg " + info).derive(secret)


def _pair_info(kind: bytes, round_index: int, a: int, b: int) -> bytes:
    lo, hi = sorted((a, b))
    return kind + struct.pack("<qqq", round_index, lo, hi)


def pair_mask(
    private: X25519PrivateKey, peer_mask_pk: bytes, round_index: int, a: int, b: int, length: int
) -> np.ndarray:
    """PRG(s_ab), the mask clients a and b agree in a session (a holds ``private``, b published
    ``peer_mask_pk``); a adds it when a < b and subtracts it otherwise, so the two cancel."""
    seed = agree(private, peer_mask_pk, _pair_info(b"mask", round_index, a, b))
    return prg(seed, length, b"pair")


def split_secret(secret: bytes, threshold: int, count: int) -> list[bytes]:
    """Shamir shares (t of n) of a 32-byte secret: two 16-byte halves shared alike, one blob each."""
    halves = [Shamir.split(threshold, count, secret[i : i + 16]) for i in (0, 16)]
    return [struct.pack("<H", a[0]) + a[1] + b[1] for a, b in zip(*halves, strict=True)]


def combine_secret(shares: Sequence[bytes]) -> bytes:
    """Inverse of :func:`split_secret` from at least ``threshold`` shares."""
    first, second = [], []
    for blob in shares:
        (index,) = struct.unpack("<H", blob[:2])
        first.append((index, blob[2:18]))
        second.append((index, blob[18:34]))
    return Shamir.combine(first) + Shamir.combine(second)


# --------------------------------------------------------------------------- the graph


def neighbour_graph(clients: Sequence[int], degree: int | None, rng: np.random.Generator) -> dict[int, list[int]]:
    """SecAgg+'s communication graph: a random ring lattice of even ``degree`` (None, or at
    least |clients| − 1: everyone with everyone). Public: the driver draws it for the round."""
    ids = [int(c) for c in clients]
    n = len(ids)
    if degree is None or degree >= n - 1:
        return {c: [d for d in ids if d != c] for c in ids}
    half = max(1, degree // 2)
    order = [ids[i] for i in rng.permutation(n)]
    graph: dict[int, set[int]] = {c: set() for c in ids}
    for pos, c in enumerate(order):
        for step in range(1, half + 1):
            d = order[(pos + step) % n]
            graph[c].add(d)
            graph[d].add(c)
    return {c: sorted(graph[c]) for c in ids}


def secagg_plus_degree(num_clients: int) -> int:
    """An even neighbour count growing with log2 of the clients (Bell et al. use O(log n))."""
    return min(num_clients - 1, 2 * math.ceil(1.5 * math.log2(max(num_clients, 2))))


# Evaluating round r is a protocol session of its own, numbered apart from every training round.
EVALUATION_SESSIONS = 1 << 40


def evaluation_session(round_index: int) -> int:
    """The session number of the secure evaluation of round ``round_index``'s model."""
    return EVALUATION_SESSIONS + round_index


def round_graph(members: Sequence[int], neighbours: int | None, seed: int, round_index: int) -> dict[int, list[int]]:
    """The round's neighbour graph over the clients that advertised keys: d from
    ``neighbours`` (None: :func:`secagg_plus_degree`), the order from the run's public seed. The
    driver draws it and every client derives it again, so the driver cannot pick a client's
    neighbours."""
    n = len(members)
    degree = min(n - 1, secagg_plus_degree(n) if neighbours is None else neighbours)
    return neighbour_graph(sorted(members), degree, derive_rng(seed, "secagg-graph", round_index))


def share_threshold(degree: int, fraction: float) -> int:
    """Shares needed to rebuild a secret: ``fraction`` of a client's neighbours, more than half
    (so the survivors' b-shares and sk-shares of one client can never both reach it), at least 2."""
    return max(2, degree // 2 + 1, math.ceil(fraction * degree))


# --------------------------------------------------------------------------- a client's round


@dataclass
class MaskingClient:
    """One virtual client's side of one round; lives in its client actor, never leaves it."""

    client_id: int
    round_index: int
    mask_key: X25519PrivateKey = field(default_factory=X25519PrivateKey.generate)
    channel_key: X25519PrivateKey = field(default_factory=X25519PrivateKey.generate)
    self_seed: bytes = field(default_factory=lambda: os.urandom(32))
    neighbours: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)  # id -> (mask pk, channel pk)
    threshold: int = 0  # shares needed to rebuild its secrets, as it split them
    held: dict[int, bytes] = field(default_factory=dict)  # shares other clients gave this one, sealed
    active: frozenset[int] = frozenset()  # the clients its masked input agreed pair masks with
    digest: str = ""  # what the session trains or evaluates, as its key advertisement named it
    confirmed: tuple[int, ...] | None = None  # the survivor set it signed (once a round)

    def public_keys(self) -> tuple[bytes, bytes]:
        return (
            self.mask_key.public_key().public_bytes(_RAW, _PUBLIC),
            self.channel_key.public_key().public_bytes(_RAW, _PUBLIC),
        )

    def _channel(self, other: int) -> AESGCM:
        info = _pair_info(b"channel", self.round_index, self.client_id, other)
        return AESGCM(agree(self.channel_key, self.neighbours[other][1], info))

    def _aad(self, sender: int, receiver: int) -> bytes:
        return struct.pack("<qqq", self.round_index, sender, receiver)

    def make_shares(self, neighbours: Mapping[int, tuple[bytes, bytes]], threshold: int) -> dict[int, bytes]:
        """Sealed shares of b and of the mask private key, one ciphertext per neighbour."""
        self.neighbours = dict(neighbours)
        self.threshold = threshold
        order = sorted(self.neighbours)
        private = self.mask_key.private_bytes(_RAW, _PRIVATE, serialization.NoEncryption())
        b_shares = split_secret(self.self_seed, threshold, len(order))
        sk_shares = split_secret(private, threshold, len(order))
        sealed = {}
        for j, b_share, sk_share in zip(order, b_shares, sk_shares, strict=True):
            nonce = os.urandom(12)
            body = struct.pack("<q", self.client_id) + b_share + sk_share
            sealed[j] = nonce + self._channel(j).encrypt(nonce, body, self._aad(self.client_id, j))
        return sealed

    def keep_shares(self, sealed: Mapping[int, bytes]) -> None:
        """The ciphertexts the driver relayed to this client, by sender."""
        self.held = dict(sealed)

    def mask(self, vector: np.ndarray, active: set[int] | None = None) -> np.ndarray:
        """y = x + PRG(b) + Σ ±PRG(s_kj): what leaves the client. ``active``: the clients whose
        shares went out (masks are agreed only with those; default: every neighbour)."""
        y = np.asarray(vector, dtype=RING) + prg(self.self_seed, len(vector), b"self")
        for j, (mask_pk, _) in self.neighbours.items():
            if active is not None and j not in active:
                continue
            pair = pair_mask(self.mask_key, mask_pk, self.round_index, self.client_id, j, len(vector))
            y = y + pair if self.client_id < j else y - pair
        return y

    def reveal(self, survivors: set[int]) -> dict[int, tuple[str, bytes]]:
        """For each neighbour whose shares it holds: the b-share if it survived, else the
        mask-key share — so the driver can rebuild one secret per client, never both."""
        out = {}
        for sender, blob in self.held.items():
            try:
                body = self._channel(sender).decrypt(blob[:12], blob[12:], self._aad(sender, self.client_id))
            except InvalidTag as err:
                raise SecAggError(f"client {self.client_id}: the share from client {sender} does not decrypt") from err
            (claimed,) = struct.unpack("<q", body[:8])
            if claimed != sender:
                raise SecAggError(f"client {self.client_id}: a share relayed as client {sender}'s names {claimed}")
            b_share, sk_share = body[8:42], body[42:76]
            out[sender] = ("b", b_share) if sender in survivors else ("sk", sk_share)
        return out


# --------------------------------------------------------------------------- the driver's side


def unmask_sum(
    masked_sum: np.ndarray,
    round_index: int,
    graph: Mapping[int, Sequence[int]],
    public_keys: Mapping[int, tuple[bytes, bytes]],
    survivors: set[int],
    revealed: Mapping[int, Mapping[int, tuple[str, bytes]]],
    threshold: int,
) -> np.ndarray:
    """Σ_{u ∈ survivors} x_u from Σ_{u ∈ survivors} y_u and the survivors' revealed shares.

    ``revealed[u][c]`` is what survivor u revealed about client c. Clients in ``graph`` but not
    in ``survivors`` dropped after sharing: their pair masks with survivors are rebuilt from
    their reconstructed mask key. Raises :class:`SecAggError` with fewer than ``threshold``
    shares of some secret.
    """
    length = len(masked_sum)
    total = np.asarray(masked_sum, dtype=RING).copy()
    by_client: dict[int, dict[str, list[bytes]]] = {}
    for reveals in revealed.values():
        for c, (kind, share) in reveals.items():
            by_client.setdefault(c, {}).setdefault(kind, []).append(share)

    def rebuild(c: int, kind: str) -> bytes:
        shares = by_client.get(c, {}).get(kind, [])
        if len(shares) < threshold:
            raise SecAggError(
                f"round {round_index}: {len(shares)} survivors hold client {c}'s {kind}-share, "
                f"{threshold} are needed (too many dropouts for the threshold)"
            )
        return combine_secret(shares[:threshold])

    for u in sorted(survivors):
        if by_client.get(u, {}).get("sk"):
            raise SecAggError(f"round {round_index}: a survivor's mask key was revealed (client {u})")
        total = total - prg(rebuild(u, "b"), length, b"self")
    for d in sorted(set(graph) - survivors):
        if by_client.get(d, {}).get("b"):
            raise SecAggError(f"round {round_index}: a dropped client's self mask was revealed (client {d})")
        private = X25519PrivateKey.from_private_bytes(rebuild(d, "sk"))
        for u in graph[d]:
            if u not in survivors:
                continue
            pair = pair_mask(private, public_keys[u][0], round_index, d, u, length)
            # Survivor u added +PRG for u < d and −PRG for u > d: take that back.
            total = total - pair if u < d else total + pair
    return total
