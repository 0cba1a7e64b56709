"""The pool of client actors (hosts) a driver talks to.

A :class:`HostPool` starts W client actors and waits until each is up, serves client k on host
k mod W, calls a method on the hosts of some clients (once, or retried once on a host Ray
restarted), streams one call's replies under a deadline, reports placement and stops the actors.
Every object it receives from a host passes through the ``received`` hook it is given (the
driver's :meth:`~fedrlhf_ray.driver.FederatedDriver._received`, which tests and the audit
record). It counts the actor restarts and retried clients of the round in progress.

A host whose process dies is restarted by Ray; its calls are not retried blindly: the pool
decides what to retry (:meth:`call`) and what not (:meth:`call_once`: a host lost there takes
its clients out of the round).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import ray
from ray.exceptions import RayActorError, RayTaskError

from fedrlhf_ray.attacks import Attack
from fedrlhf_ray.client import ClientActor
from fedrlhf_ray.errors import UserError
from fedrlhf_ray.local_trainer import LocalTrainer
from fedrlhf_ray.privacy.client_policy import ClientPolicy
from fedrlhf_ray.rundir import warn

# Building a client actor loads its clients' data and an RLlib algorithm: seconds, not minutes.
ACTOR_START_TIMEOUT_S = 300.0


def client_error(err: Exception) -> Exception:
    """A client actor's own one-line error (a refusal, a full disk, bad data) as itself, not as
    Ray's wrapper with the actor's traceback; any other error as it came."""
    cause = getattr(err, "cause", None)
    if isinstance(err, RayTaskError) and isinstance(cause, UserError):
        return cause
    return err


def _get(ref: Any) -> Any:
    try:
        return ray.get(ref)
    except RayActorError:
        raise
    except RayTaskError as err:
        raise client_error(err) from None


class HostPool:
    """W client actors; see the module docstring."""

    def __init__(
        self,
        trainer_factories: Sequence[Callable[[], LocalTrainer]],
        store_root: str,
        personal_prefixes: tuple[str, ...],
        attack: Attack | None,
        cpus_per_host: float,
        received: Callable[[Any], Any],
        policy: ClientPolicy | None = None,
    ) -> None:
        self.received = received
        self.cpus_per_host = cpus_per_host
        self.actor_restarts = 0
        self.retried_clients = 0
        # Ray actor handles: their methods are called with .remote(), which Ray's typing of a
        # ray.remote(class) cannot express, so the handles are typed Any.
        self.hosts: list[Any] = [
            ClientActor.options(num_cpus=cpus_per_host, max_restarts=-1, max_task_retries=0).remote(
                factory, store_root, personal_prefixes, attack, policy
            )
            for factory in trainer_factories
        ]
        self._wait_ready()

    @property
    def num_hosts(self) -> int:
        return len(self.hosts)

    def _wait_ready(self) -> None:
        refs = [h.ready.remote() for h in self.hosts]
        done, pending = ray.wait(refs, num_returns=len(refs), timeout=ACTOR_START_TIMEOUT_S)
        if pending:
            self.shutdown()
            raise UserError(
                f"{len(pending)} of {len(refs)} client actors did not start within {ACTOR_START_TIMEOUT_S:.0f}s: "
                f"the cluster lacks {self.cpus_per_host:g} free CPU(s) per actor; lower "
                "ray.num_workers or ray.cpus_per_worker, or free the cluster"
            )
        for ref in done:
            self.received(ray.get(ref))

    def await_restart(self, h: int) -> bool:
        """Until Ray has restarted host ``h`` (a call right after the death may still reach
        the dead process); False if it does not come back."""
        deadline = time.monotonic() + ACTOR_START_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                self.received(ray.get(self.hosts[h].ready.remote(), timeout=ACTOR_START_TIMEOUT_S))
                return True
            except RayActorError:
                time.sleep(0.5)
            except ray.exceptions.GetTimeoutError:
                return False
        return False

    def shutdown(self) -> None:
        for host in self.hosts:
            ray.kill(host)

    def by_host(self, client_ids: Sequence[int]) -> dict[int, list[int]]:
        """Clients grouped by the host that serves them (client k on host k mod W)."""
        groups: dict[int, list[int]] = {}
        for c in client_ids:
            groups.setdefault(c % self.num_hosts, []).append(c)
        return groups

    def first(self, method: str) -> Any:
        """``host.method()`` of the first host (every host builds the same policy)."""
        return self.received(_get(getattr(self.hosts[0], method).remote()))

    def _fetch(self, refs: dict[int, Any]) -> tuple[dict[int, Any], list[int]]:
        """Every host's reply (through ``received``) and the hosts whose actor died. Every
        reply is fetched before another error is re-raised: Ray prints a traceback for each
        error nobody fetched, which would bury the one-line message of this one."""
        replies: dict[int, Any] = {}
        lost: list[int] = []
        error: Exception | None = None
        for h, ref in refs.items():
            try:
                replies[h] = self.received(ray.get(ref))
            except RayActorError:
                lost.append(h)
            except Exception as err:  # noqa: BLE001 - re-raised below
                error = error or client_error(err)
        if error is not None:
            raise error
        return replies, lost

    def call_once(
        self, method: str, round_index: int, groups: dict[int, list[int]], args: dict[int, tuple[Any, ...]]
    ) -> dict[int, Any]:
        """``host.method(round_index, ids, *args[h])`` on every host of ``groups``, not retried:
        a host that dies is left out of the replies (its clients drop out), and later calls
        find it restarted."""
        replies, lost = self._fetch(
            {h: getattr(self.hosts[h], method).remote(round_index, ids, *args.get(h, ())) for h, ids in groups.items()}
        )
        for h in lost:
            self.actor_restarts += 1
            warn(f"client actor {h} died in round {round_index}; its {len(groups[h])} client(s) drop out")
            self.await_restart(h)
        return replies

    def call(
        self, method: str, round_index: int, groups: dict[int, list[int]], *rest: Any
    ) -> tuple[dict[int, Any], list[int]]:
        """``host.method(round_index, ids, *rest)`` on every host of ``groups``; a host that dies
        is retried once after Ray restarted it. Returns the replies by host and the hosts lost twice."""
        replies, lost = self._fetch(
            {h: getattr(self.hosts[h], method).remote(round_index, ids, *rest) for h, ids in groups.items()}
        )
        failed = []
        for h in lost:
            self.actor_restarts += 1
            self.retried_clients += len(groups[h])
            warn(
                f"client actor {h} died in round {round_index}; retrying its {len(groups[h])} client(s) on its restart"
            )
            try:
                if not self.await_restart(h):
                    raise RayActorError()
                retry = getattr(self.hosts[h], method).remote(round_index, groups[h], *rest)
                replies[h] = self.received(_get(retry))
            except RayActorError:
                # Lost twice: the round goes on without these clients; Ray restarts the host
                # again, and later calls must find it up.
                self.actor_restarts += 1
                self.await_restart(h)
                failed.append(h)
        return replies, failed

    def stream(
        self, method: str, round_index: int, groups: dict[int, list[int]], *rest: Any,
        needed: int, deadline: float,
    ) -> Iterator[Any]:
        """The items ``host.method(round_index, ids, *rest)`` yields on every host of ``groups``,
        as they arrive, until all are in or, once ``needed`` arrived, ``deadline`` (monotonic)
        passed. A host that dies is retried once on its restart for its clients not yet
        received (items carry ``client_id``)."""
        streams = {
            getattr(self.hosts[h], method).remote(round_index, ids, *rest): (h, ids, True) for h, ids in groups.items()
        }
        arrived: set[int] = set()
        while streams:
            timeout = None if len(arrived) < needed else max(0.0, deadline - time.monotonic())
            ready, _ = ray.wait(list(streams), num_returns=1, timeout=timeout)
            if not ready:
                return  # deadline passed with enough results
            stream: Any = ready[0]  # an ObjectRefGenerator; ray.wait is typed for ObjectRefs only
            h, ids, first_try = streams[stream]
            try:
                item = self.received(_get(next(stream)))
            except StopIteration:
                del streams[stream]
                continue
            except RayActorError:
                del streams[stream]
                self.actor_restarts += 1
                alive = self.await_restart(h)
                missing = [c for c in ids if c not in arrived]
                if first_try and missing and alive:
                    self.retried_clients += len(missing)
                    warn(
                        f"client actor {h} died in round {round_index}; retrying {len(missing)} client(s) on its "
                        "restart"
                    )
                    streams[getattr(self.hosts[h], method).remote(round_index, missing, *rest)] = (h, missing, False)
                continue
            arrived.add(item.client_id)
            yield item

    def placement(self, training_clients: Sequence[int]) -> list[dict[str, Any]]:
        """Which Ray node runs each client host, and which clients it serves."""
        nodes = [self.received(n) for n in ray.get([h.node_id.remote() for h in self.hosts])]
        groups = self.by_host(training_clients)
        return [{"host": i, "node_id": n, "clients": groups.get(i, [])} for i, n in enumerate(nodes)]
