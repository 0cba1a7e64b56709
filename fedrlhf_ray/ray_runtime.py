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
import socket
from typing import Any

from fedrlhf_ray.config import ExperimentConfig, check_machine
from fedrlhf_ray.errors import UserError
from fedrlhf_ray.rundir import warn

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
    reused pid is never mistaken for one of them)."""
    import psutil

    me = psutil.Process()
    children = [{"pid": c.pid, "started": c.create_time()} for c in me.children(recursive=True)]
    return {"owner": {"pid": me.pid, "started": me.create_time()}, "processes": children}


def _alive(entry: dict[str, Any]) -> Any:
    import psutil

    try:
        proc = psutil.Process(int(entry["pid"]))
        if abs(proc.create_time() - float(entry["started"])) < 1e-3:
            return proc
    except (psutil.Error, KeyError, TypeError, ValueError):
        pass
    return None


def reap(record: dict[str, Any] | None, run_dir: str) -> int:
    """Kill what is left of a dead run's local Ray; returns how many processes were killed.

    A run whose process still lives is not touched: it is refused in one line."""
    if not record:
        return 0
    if _alive(record.get("owner", {})) is not None:
        raise UserError(
            f"--resume {run_dir}: the run is still running (process {record['owner']['pid']}); stop it first"
        )
    killed = 0
    for entry in record.get("processes", []):
        proc = _alive(entry)
        if proc is not None:
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
    if num_hosts * per > cpus + 1e-9:
        raise UserError(
            f"ray.num_workers: {num_hosts} client actors × {per:g} CPUs need {num_hosts * per:g}, the Ray "
            f"cluster has {cpus:g}; lower ray.num_workers or ray.cpus_per_worker"
        )
