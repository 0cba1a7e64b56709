"""Long-term client identities for secure aggregation against a driver that deviates.

Each virtual client has an Ed25519 signing key (``cryptography``), made from the operating
system's entropy the first time its client actor registers it and kept in the client's own
store (``identity.key``, 0600). Its public half is published in the federation's registry, a
folder of public keys (``<store root>/pki/client-000007.ed25519``) that the clients read
themselves: the simulated PKI. The driver relays signed messages but never vouches for a key,
so it cannot pass its own key pairs off as a client's (Bonawitz et al., CCS 2017, §"active
adversary"). On one machine the driver's process could write that folder; a deployment
distributes the registry out of band (see ``docs/privacy.md``).

Two messages are signed per session and client: its key advertisement (the session, its id, its
two X25519 public keys and the digest of the model the session trains or evaluates) and the
survivor set it confirms before any share is revealed.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedrlhf_ray.rundir import atomic_write, read_or_make_secret

_RAW = serialization.Encoding.Raw
KEY_BYTES = 32


class IdentityError(ValueError):
    """A client's identity or registry entry is missing, damaged or not its own."""


def advertisement(round_index: int, client_id: int, mask_pk: bytes, channel_pk: bytes, digest: str) -> bytes:
    """What a client signs for its round keys: with the digest of the model (and instructions)
    the driver says the session is about, so that neighbours agree on it before any share leaves."""
    body = struct.pack("<qq", round_index, client_id) + mask_pk + channel_pk + digest.encode()
    return b"fedrlhf-secagg-keys\0" + body


def survivor_set(round_index: int, survivors: Iterable[int]) -> bytes:
    """What a client signs in the consistency round: the round and its sorted survivors."""
    ids = sorted(int(c) for c in survivors)
    return b"fedrlhf-secagg-survivors\0" + struct.pack(f"<q{len(ids)}q", round_index, *ids)


def verify(public: Ed25519PublicKey, signature: bytes, message: bytes) -> bool:
    try:
        public.verify(signature, message)
    except (InvalidSignature, TypeError, ValueError):
        return False
    return True


class Registry:
    """The federation's folder of client public keys (see the module docstring)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._cache: dict[int, Ed25519PublicKey] = {}

    def _path(self, client_id: int) -> Path:
        return self.root / f"client-{client_id:06d}.ed25519"

    def publish(self, client_id: int, public: Ed25519PublicKey) -> None:
        """Register a client's key; a key already registered for it must be this one."""
        raw = public.public_bytes(_RAW, serialization.PublicFormat.Raw)
        path = self._path(client_id)
        if path.exists() and not path.is_symlink():
            if path.read_bytes() != raw:
                raise IdentityError(f"{path}: the registry holds another key for client {client_id}")
            return
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write(path, raw)

    def public_key(self, client_id: int) -> Ed25519PublicKey:
        """Client ``client_id``'s registered key (read once per registry)."""
        if client_id not in self._cache:
            path = self._path(client_id)
            try:
                if path.is_symlink():
                    raise IdentityError(f"{path}: a link, not a registered key")
                raw = path.read_bytes()
            except OSError as err:
                raise IdentityError(f"client {client_id} has no registered key ({err.strerror or err})") from None
            if len(raw) != KEY_BYTES:
                raise IdentityError(f"{path}: damaged ({len(raw)} bytes, not {KEY_BYTES})")
            self._cache[client_id] = Ed25519PublicKey.from_public_bytes(raw)
        return self._cache[client_id]


def load_or_make_identity(path: Path) -> Ed25519PrivateKey:
    """The signing key kept at ``path`` (0600), made from OS entropy when there is none (an
    Ed25519 private key is 32 random bytes)."""
    try:
        return Ed25519PrivateKey.from_private_bytes(read_or_make_secret(path, KEY_BYTES))
    except OSError as err:
        raise IdentityError(f"{path}: unreadable ({err.strerror or err})") from None
    except ValueError as err:
        raise IdentityError(f"{path}: damaged ({err})") from None
