"""A sweep directory's seal: what lets ``fedrlhf tune --resume`` trust the files Tune unpickles.

Ray Tune restores a sweep from pickles it wrote into the sweep directory (``tuner.pkl``, its
searcher's and scheduler's state), and unpickling a file runs whatever code it names. So every
time a sweep stops (completed, failed, interrupted) the platform seals its directory: an
HMAC-SHA256, under a key kept in the user's config folder (``$XDG_CONFIG_HOME/fedrlhf`` or
``~/.config/fedrlhf``, mode 0600), of every file's path and bytes. A resume checks the seal
before Tune reads anything: a file planted, changed or removed since, a link, or no seal (a
sweep killed with SIGKILL never sealed itself) is one line, and nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

from fedrlhf_ray.errors import UserError
from fedrlhf_ray.rundir import atomic_write, find_link, read_or_make_secret

SEAL = ".fedrlhf-seal"
_KEY_BYTES = 32


def key_file() -> Path:
    """Where this user's sealing key lives."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "fedrlhf" / "sweep-seal.key"


def _key() -> bytes:
    path = key_file()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        return read_or_make_secret(path, _KEY_BYTES)
    except OSError as err:
        raise UserError(f"{path}: cannot read the sweep-sealing key ({err.strerror or err})") from None
    except ValueError:
        raise UserError(
            f"{path}: the sweep-sealing key is damaged; delete it (sealed sweeps then cannot resume)"
        ) from None


def _digest(sweep_dir: Path, key: bytes) -> str:
    mac = hmac.new(key, b"fedrlhf sweep seal v1\0", hashlib.sha256)
    files = sorted(p for p in sweep_dir.rglob("*") if p.is_file() and p.name != SEAL)
    for path in files:
        rel = path.relative_to(sweep_dir).as_posix().encode()
        mac.update(len(rel).to_bytes(8, "big") + rel)
        data = path.read_bytes()
        mac.update(len(data).to_bytes(8, "big") + data)
    return mac.hexdigest()


def seal(sweep_dir: Path) -> None:
    """Seal ``sweep_dir`` as it is now (it must hold no link)."""
    if find_link(sweep_dir) is None:
        atomic_write(sweep_dir / SEAL, _digest(sweep_dir, _key()).encode())


def check_seal(sweep_dir: Path) -> None:
    """Raise a one-line UserError unless ``sweep_dir`` is exactly as its sweep left it."""
    link = find_link(sweep_dir)
    if link is not None:
        raise UserError(f"--resume {sweep_dir}: {link} is a link; a sweep directory holds none (start the sweep again)")
    try:
        stored = (sweep_dir / SEAL).read_bytes().decode("ascii")
    except (OSError, UnicodeDecodeError):
        raise UserError(
            f"--resume {sweep_dir}: the sweep directory carries no seal of this user's (a sweep killed without "
            "a chance to seal itself, or files from elsewhere); nothing of it is loaded — start the sweep again"
        ) from None
    if not hmac.compare_digest(stored, _digest(sweep_dir, _key())):
        raise UserError(
            f"--resume {sweep_dir}: files changed since the sweep stopped (its seal does not match); nothing "
            "of it is loaded — start the sweep again"
        )
