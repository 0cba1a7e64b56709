"""Starting or joining Ray, and checking up front that an experiment fits on it.

Everything here fails in seconds with one line: a malformed or unreachable ``--address``, more
client actors or CPUs per actor than the cluster has, an object store larger than memory.
Ray itself would retry a dead address for minutes or wait for resources forever.

A local Ray started by a process that is then SIGKILLed leaves some of its processes behind
(Ray's dashboard and runtime-env agents outlive the raylet). The run directory records the
processes its local Ray started (:func:`local_ray_processes`), and a resume reaps those that
are still alive (:func:`reap`) before it starts a Ray of its own.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import sys
from pathlib import Path
from typing import Any

from fedrlhf_ray.errors import ConfigError, UserError
from fedrlhf_ray.rundir import warn
from fedrlhf_ray.schema import ExperimentConfig

CONNECT_TIMEOUT_S = 5.0


def requested_address(address: str | None) -> str | None:
    return address or os.environ.get("RAY_ADDRESS") or None


def _check_address(address: str) -> None:
    """A GCS address ``host:port`` that accepts connections (or ``auto``)."""
    if address == "auto":
        return
    if address.startswith("ray://"):
        raise UserError(
            f"--address {address}: Ray Client addresses are not supported; give the cluster's GCS "
            "address host:6379, or run on the head node (ray job submit)"
        )
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(f"--address {address!r}: expected HOST:PORT of a Ray cluster's head, e.g. 10.0.0.5:6379")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S) as conn:
            speaks_grpc = _answers_http2(conn)
    except OSError as err:
        raise UserError(
            f"--address {address}: no Ray cluster reachable ({err.strerror or err}); check the head's address "
            "and that `ray start --head` runs there"
        ) from None
    if not speaks_grpc:
        # Ray would retry such an address for minutes.
        raise UserError(
            f"--address {address}: something answers there, but not a Ray cluster's GCS; give the head's "
            "GCS address (port 6379 unless `ray start --head --port` said otherwise)"
        )


def _answers_http2(conn: socket.socket) -> bool:
    """A Ray GCS is a gRPC server: to the HTTP/2 preface it answers with a SETTINGS frame."""
    conn.settimeout(CONNECT_TIMEOUT_S)
    conn.sendall(_HTTP2_PREFACE + _EMPTY_SETTINGS_FRAME)
    reply = b""
    try:
        while len(reply) < 9:
            chunk = conn.recv(9 - len(reply))
            if not chunk:
                break
            reply += chunk
    except OSError:
        return False
    return len(reply) == 9 and reply[3] == _SETTINGS_FRAME_TYPE


_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_EMPTY_SETTINGS_FRAME = bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])  # length 0, type SETTINGS, no flags, stream 0
_SETTINGS_FRAME_TYPE = 4


def ensure_ray(cfg: ExperimentConfig, address: str | None = None) -> str:
    """Connect to ``address`` (or $RAY_ADDRESS), else start a local Ray sized by ``cfg.ray``.

    Returns ``"joined"`` (an existing cluster), ``"started"`` (a local Ray this process owns)
    or ``"existing"`` (Ray was already initialised: a test session, a Tune trial)."""
    import ray

    address = requested_address(address)
    if ray.is_initialized():
        return "joined" if address else "existing"
    if address:
        _check_address(address)
        try:
            ray.init(address=address, log_to_driver=False, logging_level=logging.ERROR)
        except (ConnectionError, ValueError, RuntimeError) as err:
            raise UserError(
                f"--address {address}: could not join the Ray cluster ({str(err).splitlines()[0]})"
            ) from None
        return "joined"
    for warning in check_machine(cfg):
        warn(warning)
    ray.init(
        num_cpus=cfg.ray.num_cpus,
        object_store_memory=cfg.ray.object_store_mb * 1024 * 1024,
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.ERROR,
    )
    return "started"


def local_ray_processes() -> dict[str, Any]:
    """This process and the processes its local Ray started (pid and start time, so that a
    reused pid is never mistaken for one of them), and the Ray session they belong to."""
    import psutil

    me = psutil.Process()
    children = [{"pid": c.pid, "started": c.create_time()} for c in me.children(recursive=True)]
    sessions = {s for s in map(_session_of, me.children(recursive=True)) if s is not None}
    return {
        "owner": {"pid": me.pid, "started": me.create_time()},
        "session": next(iter(sessions)) if len(sessions) == 1 else None,
        "processes": children,
    }


def _alive(entry: Any) -> Any:
    import psutil

    try:
        proc = psutil.Process(int(entry["pid"]))
        if abs(proc.create_time() - float(entry["started"])) < 1e-3:
            return proc
    except (psutil.Error, KeyError, TypeError, ValueError, OverflowError):
        pass
    return None


# A Ray session's folder (``<temp dir>/session_<date>_<time>_<pid>``): every process of a local
# Ray names it in its command line or holds its log files open.
_SESSION_RE = re.compile(r"/session_\d{4}-\d{2}-\d{2}_\d{2}-\d{2}-\d{2}_\d+_\d+(?=/|$)")


def _session_of(proc: Any) -> str | None:
    import psutil

    try:
        texts = list(proc.cmdline()) + [f.path for f in proc.open_files()]
    except psutil.Error:
        return None
    for text in texts:
        found = _SESSION_RE.search(text)
        if found:
            return found.group(0).lstrip("/")  # the session's name: its date, time and pid
    return None


def _left_behind(proc: Any, session: str) -> bool:
    """Whether ``proc`` is a process of the Ray session ``session`` that no live program owns:
    it and every ancestor up to init are that session's (a dead run's Ray is reparented to
    init; a live run's hangs under the program that started it)."""
    import psutil

    if _session_of(proc) != session:
        return False
    try:
        ancestors = proc.parents()
    except psutil.Error:
        return False
    return all(a.pid == 1 or _session_of(a) == session for a in ancestors)


def reap(record: dict[str, Any] | None, run_dir: str) -> int:
    """Kill what is left of a dead run's local Ray; returns how many processes were killed.

    ``record`` comes from a file in the run directory, which anyone may have edited: it names
    candidates, never what to kill. A process dies only if it is alive with the recorded start
    time, belongs to the recorded Ray session (its command line or open log files name that
    session's folder) and nothing but that session and init lies above it. A run whose
    process still lives is not touched: it is refused in one line."""
    if not isinstance(record, dict):
        return 0
    owner = _alive(record.get("owner"))
    if owner is not None and owner.pid != os.getpid():
        raise UserError(
            f"--resume {run_dir}: the run is still running (process {owner.pid}); stop it first"
        )
    session = record.get("session")
    processes = record.get("processes")
    if not isinstance(session, str) or not _SESSION_RE.search("/" + session) or not isinstance(processes, list):
        return 0
    killed = 0
    for entry in processes:
        proc = _alive(entry)
        if proc is not None and proc.pid != os.getpid() and _left_behind(proc, session):
            try:
                proc.kill()
                killed += 1
            except Exception:  # noqa: BLE001 - it may exit by itself meanwhile
                pass
    return killed


def check_fits(cfg: ExperimentConfig, num_hosts: int) -> None:
    """``num_hosts`` client actors of ``cfg.ray.cpus_per_worker`` CPUs each fit the cluster."""
    import ray

    resources: dict[str, Any] = ray.cluster_resources()
    cpus = float(resources.get("CPU", 0.0))
    per = cfg.ray.cpus_per_worker
    if per > cpus:
        raise UserError(f"ray.cpus_per_worker: got {per:g} — the Ray cluster has {cpus:g} CPUs in all")
    driver = cfg.ray.driver_resources or {}
    driver_cpus = float(driver.get("CPU", 0.0))
    if num_hosts * per + driver_cpus > cpus + 1e-9:
        also = f" and the driver actor {driver_cpus:g}" if driver_cpus else ""
        raise UserError(
            f"ray.num_workers: {num_hosts} client actors × {per:g} CPUs{also} need {num_hosts * per + driver_cpus:g}, "
            f"the Ray cluster has {cpus:g}; lower ray.num_workers or ray.cpus_per_worker"
        )
    for name, amount in driver.items():
        if name != "CPU" and float(resources.get(name, 0.0)) < amount:
            raise UserError(
                f"ray.driver_resources: {name}={amount:g} — the Ray cluster has {float(resources.get(name, 0.0)):g} "
                f"of {name!r}; give a resource a node offers (ray start --resources) or leave it unset"
            )


# -- what the machine and the config allow ------------------------------------------------------
def check_config(cfg: ExperimentConfig) -> None:
    """A set ``ray.num_cpus`` must fit the client actors (raises ValueError naming the field)."""
    if cfg.ray.num_cpus is not None:
        shortfall = _cpu_shortfall(cfg, cfg.ray.num_cpus, "ray.num_cpus")
        if shortfall:
            raise ValueError(shortfall)


def _cpu_shortfall(cfg: ExperimentConfig, cpus: float, what: str) -> str | None:
    """Why the client actors cannot all be placed on ``cpus`` CPUs (Ray would wait forever), or None."""
    ray_cfg = cfg.ray
    per_worker = ray_cfg.cpus_per_worker
    if per_worker > cpus:
        return f"ray.cpus_per_worker: got {per_worker:g} — at most {what} ({cpus:g}), or no client actor can start"
    if ray_cfg.num_workers is not None:
        workers = min(ray_cfg.num_workers, cfg.clients.num_clients)  # as many actors as the driver starts
        needed = workers * per_worker
        if needed > cpus + 1e-9:  # 1e-9: e.g. 3 × 0.1 CPUs is 0.30000000000000004
            return (
                f"ray.num_workers: got {ray_cfg.num_workers} — {workers} client actors × ray.cpus_per_worker "
                f"{per_worker:g} = {needed:g} CPUs, more than {what} ({cpus:g})"
            )
    return None


def _memory_bytes() -> int:
    """Memory a local Ray may use: the machine's, or a lower cgroup (container) limit, as Ray reads it."""
    import psutil

    total = psutil.virtual_memory().total
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            limit = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if limit.isdigit():
            total = min(total, int(limit))
    return total


def _shm_free_bytes() -> int | None:
    """Free bytes in /dev/shm, where a local Ray on Linux keeps its object store; None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        stats = os.statvfs("/dev/shm")
    except OSError:
        return None
    return stats.f_bsize * stats.f_bavail


def _machine_cpus() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


# Ray refuses an object store larger than /dev/shm above this size (ray_constants.REQUIRE_SHM_SIZE_THRESHOLD)
# unless RAY_OBJECT_STORE_ALLOW_SLOW_STORAGE is set; below it, it falls back to (slow) /tmp.
_RAY_SHM_REQUIRED_ABOVE = 10**10
_MB = 1024 * 1024


def check_machine(cfg: ExperimentConfig) -> list[str]:
    """Check ``cfg.ray`` against this machine before starting a local Ray on it.

    Raises a one-line ConfigError when Ray could not start, or could never place the client
    actors; returns one-line warnings for what would only run slowly. Not for a joined cluster
    or a Tune trial: their resources are elsewhere.
    """
    ray_cfg = cfg.ray
    if ray_cfg.num_cpus is None:  # a set num_cpus is checked by validation (Ray oversubscribes it)
        shortfall = _cpu_shortfall(cfg, _machine_cpus(), "this machine's CPUs")
        if shortfall:
            raise ConfigError(shortfall)
    store = ray_cfg.object_store_mb * _MB
    memory = _memory_bytes()
    if store > memory:
        raise ConfigError(
            f"ray.object_store_mb: got {ray_cfg.object_store_mb} — more than this machine's memory ({memory // _MB} MB)"
        )
    shm = _shm_free_bytes()
    if shm is None or store <= shm:
        return []
    if store > _RAY_SHM_REQUIRED_ABOVE and not os.environ.get("RAY_OBJECT_STORE_ALLOW_SLOW_STORAGE"):
        raise ConfigError(
            f"ray.object_store_mb: got {ray_cfg.object_store_mb} — more than /dev/shm's free {shm // _MB} MB "
            "(enlarge /dev/shm, e.g. docker run --shm-size, or lower it)"
        )
    slow = (
        f"ray.object_store_mb: {ray_cfg.object_store_mb} MB is more than /dev/shm's free {shm // _MB} MB: "
        "Ray keeps the object store in /tmp instead, which is slower"
    )
    return [slow]
