"""The client-side state store: where a client actor keeps its virtual clients' records.

A record (the simulated human's RNG, the feedback log, the reward model and its optimizer,
the PPO optimizer state, the personal parameters) is private to its client. Only the client
actor serving that client writes or reads it, here; the driver never receives it. Layout::

    <root>/client-000007/round-000003.npz    client 7's record after round 3, which it trained
    <root>/client-000007/noise.key           client 7's secret for its DP noise (if it adds any)
    <root>/client-000007/sent-round          the last round client 7 sent a masked update for
    <root>/client-000007/evaluated-round     the last round it sent a masked evaluation for
    <root>/client-000007/identity.key        client 7's signing key for secure aggregation
    <root>/pki/client-000007.ed25519         its public half, the federation's registry (privacy.pki)

one file per round the client trained (NumPy arrays plus a JSON tree, see ``state_codec``:
nothing is unpickled), committed atomically and on disk before the client's update is sent.
Records are keyed by client id, so a resume may use another number of client actors. The root
is ``<run dir>/clients`` unless ``federation.client_state_dir`` says otherwise (on a cluster:
storage every node shares, or a node-local folder when each client actor stays on its node).

Versions are pruned against the driver's checkpoints: the driver keeps its last two, and a
client keeps, besides every version newer than the older of them, the latest version at or
before it, so a fall back to the driver's previous checkpoint always finds each client's
matching record.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from fedrlhf_ray import state_codec
from fedrlhf_ray.rundir import atomic_write, read_or_make_secret

_VERSION_RE = re.compile(r"^round-(\d{6})\.npz$")
NOISE_KEY_BYTES = 32
# The notes of the last round a client sent a masked update, and a masked evaluation, for.
SENT_TRAINING = "sent-round"
SENT_EVALUATION = "evaluated-round"


class ClientStore:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        # Versions of the clients this store has written, listed from disk once: only the actor
        # serving a client writes its folder, and listing it at every save cost as much as the
        # write. Clients it only reads are listed afresh each time.
        self._versions: dict[int, list[int]] = {}

    def _folder(self, client_id: int) -> Path:
        return self.root / f"client-{client_id:06d}"

    def _make_folder(self, client_id: int) -> None:
        """The client's folder and the store's root, readable by their owner only (0700)."""
        for folder in (self.root, self._folder(client_id)):
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(folder, 0o700)

    def _path(self, client_id: int, round_index: int) -> Path:
        return self._folder(client_id) / f"round-{round_index:06d}.npz"

    def versions(self, client_id: int) -> list[int]:
        """Rounds with a stored record of this client, newest first."""
        if client_id in self._versions:  # this store writes the client's folder
            return list(self._versions[client_id])
        folder = self._folder(client_id)
        if not folder.is_dir():
            return []
        found = (_VERSION_RE.match(p.name) for p in folder.iterdir())
        return sorted((int(m.group(1)) for m in found if m), reverse=True)

    def save(self, client_id: int, round_index: int, record: Any, keep_from: int) -> int:
        """Commit the record after ``round_index`` (atomically; on disk after :meth:`flush`);
        returns its size in bytes."""
        data = state_codec.dumps(record)
        versions = self.versions(client_id)
        if not versions:
            self._make_folder(client_id)
        versions = sorted({*versions, round_index}, reverse=True)
        older = [v for v in versions if v <= keep_from]
        stale = [self._path(client_id, v) for v in older[1:]]
        # The new record takes over a pruned one's file: cheaper than a new file and a deletion.
        atomic_write(
            self._path(client_id, round_index), data, durable=False, recycle=stale[0] if stale else None, private=True
        )
        for path in stale[1:]:
            path.unlink(missing_ok=True)
        self._versions[client_id] = [v for v in versions if v not in older[1:]]
        return len(data)

    def noise_secret(self, client_id: int) -> bytes:
        """The client's secret for its differential-privacy noise: drawn from the operating
        system's entropy on first use and kept, so a retried or resumed round adds the same
        noise while nobody without this file (the driver included) can predict or remove it."""
        path = self._folder(client_id) / "noise.key"
        if not path.exists():
            self._make_folder(client_id)
        try:
            return read_or_make_secret(path, NOISE_KEY_BYTES)
        except OSError as err:
            raise state_codec.StateFileError(f"{path}: unreadable ({err.strerror or err})") from None
        except ValueError as err:
            raise state_codec.StateFileError(f"{path}: damaged ({err})") from None

    def private_path(self, client_id: int, name: str) -> Path:
        """A file of the client's own beside its records (its folder made, 0700)."""
        self._make_folder(client_id)
        return self._folder(client_id) / name

    def last_sent(self, client_id: int, kind: str = SENT_TRAINING) -> int:
        """The last round this client sent a masked input of ``kind`` for (−1: none). Raises
        :class:`state_codec.StateFileError` when the file is damaged."""
        path = self._folder(client_id) / kind
        try:
            text = path.read_text(encoding="ascii")
        except FileNotFoundError:
            return -1
        except (OSError, UnicodeDecodeError) as err:
            raise state_codec.StateFileError(f"{path}: unreadable ({err})") from None
        if not text.strip().isdigit():
            raise state_codec.StateFileError(f"{path}: damaged (not a round number)")
        return int(text)

    def note_sent(self, client_id: int, round_index: int, kind: str = SENT_TRAINING) -> None:
        """On disk before the masked input leaves: the client never sends another of ``kind``
        for this round or an earlier one."""
        self._make_folder(client_id)
        atomic_write(self._folder(client_id) / kind, f"{round_index}\n".encode(), private=True)

    @staticmethod
    def flush() -> None:
        """Put every record saved so far on disk: one sync for a host's whole round, where an
        fsync per record cost more than the local training of a small client (bench/engine_overhead.py)."""
        os.sync()

    def latest(self, client_id: int, upto: int) -> int | None:
        """The round of the record a restore to round ``upto`` uses (None: never trained)."""
        return next((v for v in self.versions(client_id) if v <= upto), None)

    def load(self, client_id: int, upto: int) -> Any | None:
        """The client's record as of round ``upto``, or None if it had not trained by then.

        Raises :class:`state_codec.StateFileError` when that record is damaged."""
        version = self.latest(client_id, upto)
        if version is None:
            return None
        path = self._path(client_id, version)
        try:
            return state_codec.loads(path.read_bytes())
        except OSError as err:
            raise state_codec.StateFileError(f"{path}: unreadable ({err.strerror or err})") from None
        except state_codec.StateFileError as err:
            raise state_codec.StateFileError(f"{path}: {err}") from None
