"""The run directory: every file name, atomic writes, and reading rows back.

A run directory holds::

    config.yaml            the resolved experiment config
    status.json            running | completed | failed | interrupted, with details
    summary.json           the initial and final evaluation (a finished run)
    metrics.jsonl          one row per round (round 0 = the initial evaluation)
    client_metrics.jsonl   one row per client, round and kind (train / eval)
    mlflow_run.json        which MLflow run the directory belongs to
    ray_processes.json     the processes of the local Ray the run started (reaped on resume)
    checkpoint-RRRRRR.npz  the driver's checkpoints, the last two kept: round, global weights,
                           strategy state (no client's record: those live in the client store)
    clients/               the default client-side state store (see ``client_store``)
    learning_curves.png, global_weights.npz   artifacts of a finished run

Writes go to a temporary file in the same folder and are committed with ``os.replace``, so a
crash or a full disk never leaves a half-written file under a real name; a failed write removes
its temporary file and says which file could not be written and why.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import stat
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from fedrlhf_ray import state_codec
from fedrlhf_ray.errors import UserError

CONFIG = "config.yaml"
STATUS = "status.json"
SUMMARY = "summary.json"
METRICS = "metrics.jsonl"
CLIENT_METRICS = "client_metrics.jsonl"
MLFLOW_RUN = "mlflow_run.json"
RAY_PROCESSES = "ray_processes.json"
CURVES = "learning_curves.png"
FINAL_WEIGHTS = "global_weights.npz"
CLIENT_STORE = "clients"
CHECKPOINT_PREFIX = "checkpoint"
SAMPLES_DIR = "samples"  # the IMDb task's sample generations, one text file a round
CHECKPOINTS_KEPT = 2
_CHECKPOINT_RE = re.compile(rf"^{CHECKPOINT_PREFIX}-(\d{{6}})\.npz$")


class StorageError(UserError):
    """A file of the run could not be written (disk full, read-only, ...)."""


def atomic_write(
    path: Path, data: bytes, durable: bool = True, recycle: Path | None = None, private: bool = False
) -> None:
    """Write ``data`` to ``path`` all or nothing (temporary file, ``os.replace``); ``durable``
    also fsyncs it first, else the caller syncs a batch of files at once. ``private``: the file
    is readable by its owner only (0600). A link planted at ``path`` is replaced, never
    followed; the temporary file is created anew (a link planted there is refused).

    ``recycle`` names an obsolete file (gone afterwards either way) whose inode the write takes
    over: renamed to the temporary name and overwritten, which costs a sixth of creating a
    file and deleting the old one on ext4 (bench/engine_overhead.py writes 50 a round)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        try:
            if recycle is None:
                raise FileNotFoundError
            os.replace(recycle, tmp)
            fd = os.open(tmp, os.O_WRONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            tmp.unlink(missing_ok=True)  # a leftover of a killed writer with this pid
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600 if private else 0o666)
        if private:
            os.fchmod(fd, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.ftruncate(fd, len(data))
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise StorageError(f"could not write {path}: {err.strerror or err}") from None


def read_or_make_secret(path: Path, size: int) -> bytes:
    """The ``size``-byte secret kept at ``path``, drawn from the operating system's entropy and
    written there (0600) when there is none. Raises :class:`OSError` when it cannot be read and
    :class:`ValueError` when it is not ``size`` bytes."""
    try:
        secret = path.read_bytes()
    except FileNotFoundError:
        secret = secrets.token_bytes(size)
        atomic_write(path, secret, private=True)
        return secret
    if len(secret) != size:
        raise ValueError(f"{len(secret)} bytes, not {size}")
    return secret


def append_rows(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    """Append JSON lines; on a failed write the file is cut back to what it was."""
    text = "".join(json.dumps(row) + "\n" for row in rows)
    if not text:
        return
    size = path.stat().st_size if path.exists() else 0
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o666)
        with open(fd, "a") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        try:
            if path.is_symlink():
                raise StorageError(f"could not write {path}: it is a symbolic link") from None
            if size:
                os.truncate(path, size)
            else:
                path.unlink(missing_ok=True)
        except OSError:
            pass
        raise StorageError(f"could not write {path}: {err.strerror or err}") from None


def find_link(root: Path) -> Path | None:
    """The first symbolic link, or file with another hard link, at or under ``root`` (never
    followed), or None. A run directory holds neither: one planted there would make a resume
    write, or read, a file outside it."""
    if root.is_symlink():
        return root
    if not root.is_dir():
        return None
    for folder, dirs, files in os.walk(root, followlinks=False):
        for name in dirs + files:
            path = Path(folder) / name
            info = path.lstat()
            if stat.S_ISLNK(info.st_mode) or (stat.S_ISREG(info.st_mode) and info.st_nlink > 1):
                return path
    return None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The rows of a ``*.jsonl`` file (none if missing); a torn last line (a crash while
    appending) is not a row."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


class RunDir:
    """One run directory; see the module docstring."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def __str__(self) -> str:
        return str(self.path)

    # -- small files ---------------------------------------------------------------------------
    def write_config(self, cfg_dict: dict[str, Any]) -> None:
        atomic_write(self.path / CONFIG, yaml.safe_dump(cfg_dict, sort_keys=False).encode())

    def write_json(self, name: str, data: dict[str, Any]) -> None:
        atomic_write(self.path / name, json.dumps(data, indent=2, default=str).encode())

    def read_json(self, name: str) -> dict[str, Any] | None:
        """A JSON file of the run, or None when it is missing or damaged."""
        try:
            data = json.loads((self.path / name).read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def write_status(self, state: str, **extra: Any) -> None:
        self.write_json(STATUS, {"state": state, **extra})

    def status(self) -> str | None:
        data = self.read_json(STATUS)
        return None if data is None else str(data.get("state"))

    def save_final_weights(self, weights: dict[str, Any]) -> None:
        """The final global model as ``.npz`` (parameter name → array), no pickle."""
        import io

        import numpy as np

        buffer = io.BytesIO()
        np.savez(buffer, **weights)
        atomic_write(self.path / FINAL_WEIGHTS, buffer.getvalue())

    def write_samples(self, round_index: int, text: str, client: int | None = None) -> str:
        """A round's sample generations, of the global model or of ``client``'s own; returns the
        file's name relative to the run dir."""
        whose = f"_client_{client:03d}" if client is not None else ""
        name = f"{SAMPLES_DIR}/round_{round_index:04d}{whose}.txt"
        (self.path / SAMPLES_DIR).mkdir(exist_ok=True)
        atomic_write(self.path / name, text.encode())
        return name

    # -- metrics -------------------------------------------------------------------------------
    def append_metrics(self, rows: list[dict[str, Any]], client_rows: list[dict[str, Any]]) -> None:
        append_rows(self.path / METRICS, rows)
        append_rows(self.path / CLIENT_METRICS, client_rows)

    def metrics(self) -> list[dict[str, Any]]:
        return read_jsonl(self.path / METRICS)

    def client_metrics(self) -> list[dict[str, Any]]:
        return read_jsonl(self.path / CLIENT_METRICS)

    def round_metrics(self, round_index: int) -> dict[str, Any]:
        return next((r for r in self.metrics() if r.get("round") == round_index), {})

    def last_evaluation(self) -> dict[str, Any]:
        """The ``eval/`` metrics of the latest evaluated round (round 0 included)."""
        evaluated = [r for r in self.metrics() if any(k.startswith("eval/") for k in r)]
        return {k: v for k, v in evaluated[-1].items() if k.startswith("eval/")} if evaluated else {}

    def truncate_metrics(self, last_round: int) -> None:
        """Drop rows past ``last_round``: they come from a round that ended before its checkpoint."""
        for name in (METRICS, CLIENT_METRICS):
            file = self.path / name
            if file.exists():
                rows = [r for r in read_jsonl(file) if int(r.get("round", -1)) <= last_round]
                atomic_write(file, "".join(json.dumps(r) + "\n" for r in rows).encode())

    # -- the driver's checkpoints --------------------------------------------------------------
    def checkpoint_rounds(self) -> list[int]:
        """Rounds with a checkpoint file, newest first."""
        if not self.path.is_dir():
            return []
        found = (_CHECKPOINT_RE.match(p.name) for p in self.path.iterdir())
        return sorted((int(m.group(1)) for m in found if m), reverse=True)

    def checkpoint_path(self, round_index: int) -> Path:
        return self.path / f"{CHECKPOINT_PREFIX}-{round_index:06d}.npz"

    def save_checkpoint(self, round_index: int, state: dict[str, Any]) -> None:
        """Commit round ``round_index``'s checkpoint, then drop all but the last two."""
        # Private: it holds the strategy's state, e.g. DP's secret.
        atomic_write(self.checkpoint_path(round_index), state_codec.dumps(state), private=True)
        for old in self.checkpoint_rounds()[CHECKPOINTS_KEPT:]:
            self.checkpoint_path(old).unlink(missing_ok=True)

    def load_checkpoint(self, round_index: int) -> dict[str, Any]:
        """Raises :class:`state_codec.StateFileError` when the file is damaged."""
        try:
            data = self.checkpoint_path(round_index).read_bytes()
        except OSError as err:
            raise state_codec.StateFileError(f"unreadable ({err.strerror or err})") from None
        state = state_codec.loads(data)
        if not isinstance(state, dict) or state.get("round") != round_index:
            raise state_codec.StateFileError("not a checkpoint of this round")
        return state

    def oldest_kept_checkpoint(self) -> int:
        """The round the client stores must still be able to restore (0: the start)."""
        rounds = self.checkpoint_rounds()
        return rounds[CHECKPOINTS_KEPT - 1] if len(rounds) >= CHECKPOINTS_KEPT else 0


WARNING_PREFIX = "fedrlhf: warning: "


def warn(message: str) -> None:
    """One warning line on stderr (the CLI's errors use the same prefix)."""
    print(f"{WARNING_PREFIX}{message}", file=sys.stderr)
