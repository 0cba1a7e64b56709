"""How a round's updates come back to the driver: a :class:`Collector` over the host pool.

:class:`PlainCollector` returns the clients' updates (under the straggler deadline); the secure
collector (``privacy.secure_round.SecureCollector``) returns only the survivors' sum. The driver
aggregates either with its strategy: the updates with ``aggregate``, a sum with
``aggregate_sum`` (:class:`~fedrlhf_ray.strategies.SumAggregator`). A collector that wraps
another (the leakage audit's) sees exactly what the driver received.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from fedrlhf_ray.local_trainer import ClientUpdate, MaskedUpdate, RoundInstructions, Weights


class RoundSpent(Exception):
    """A round that failed after clients sent it masked inputs. It is never run again: a second
    execution over another set of clients would give the driver the difference of two sums, one
    client's update. ``contributors``: how many inputs the failed round's sum could have held."""

    def __init__(self, reason: str, contributors: int) -> None:
        super().__init__(reason)
        self.contributors = contributors


class Hosts(Protocol):
    """What a collector asks of the host pool (``host_pool.HostPool``)."""

    def by_host(self, client_ids: Sequence[int]) -> dict[int, list[int]]: ...

    def call_once(
        self, method: str, round_index: int, groups: dict[int, list[int]], args: dict[int, tuple[Any, ...]]
    ) -> dict[int, Any]: ...

    def call(
        self, method: str, round_index: int, groups: dict[int, list[int]], *rest: Any
    ) -> tuple[dict[int, Any], list[int]]: ...

    def stream(
        self, method: str, round_index: int, groups: dict[int, list[int]], *rest: Any, needed: int, deadline: float
    ) -> Any: ...


@dataclass
class Collected:
    """What a round's collection gave the driver.

    ``updates``: the updates that arrived (masked ones count as arrived but can only be summed);
    ``total``: under secure aggregation, the survivors' Σ w·θ by name and Σ w (else None);
    ``metrics``: the collector's round metrics; ``received_bytes``: what crossed to the driver;
    ``skipped``: no sum could be formed safely (too few clients sampled), so none was asked for.
    """

    updates: Sequence[ClientUpdate | MaskedUpdate]
    received_bytes: float
    metrics: dict[str, float] = field(default_factory=dict)
    total: tuple[Weights, float] | None = None
    skipped: bool = False


class Collector(Protocol):
    def collect(
        self, hosts: Hosts, round_index: int, sampled: list[int], global_ref: Any,
        instructions: RoundInstructions, shared: Mapping[str, np.ndarray], keep_from: int, digest: str = "",
    ) -> Collected:
        """Train the sampled clients from the global weights (``global_ref``, whose
        ``round_input_digest`` with the instructions is ``digest``) and collect the round; the
        client stores keep the records a restore of round ``keep_from`` needs."""
        ...


@dataclass(frozen=True)
class PlainCollector:
    """The clients' updates, in the clear; with a straggler timeout, those that arrive before it
    (or the first ``min_results``).

    Each host streams its clients' updates back from one call. A client still training at the
    deadline is left out of this round's aggregate; its host finishes it (and its record
    advances, as a real client's local state would) before serving anything else.
    """

    straggler_timeout_s: float | None
    min_results: int

    def collect(
        self, hosts: Hosts, round_index: int, sampled: list[int], global_ref: Any,
        instructions: RoundInstructions, shared: Mapping[str, np.ndarray], keep_from: int, digest: str = "",
    ) -> Collected:
        groups = hosts.by_host(sampled)
        updates: list[ClientUpdate]
        if self.straggler_timeout_s is None:  # nothing to time out: one reply per host is cheapest
            replies, _ = hosts.call("train_batch", round_index, groups, global_ref, instructions, keep_from)
            updates = [u for batch in replies.values() for u in batch]
        else:
            deadline = time.monotonic() + self.straggler_timeout_s
            updates = list(hosts.stream(
                "train_clients", round_index, groups, global_ref, instructions, keep_from,
                needed=min(self.min_results, len(sampled)), deadline=deadline,
            ))
        # Aggregation order must not depend on which host finished first.
        updates.sort(key=lambda u: u.client_id)
        return Collected(
            updates,
            received_bytes=float(sum(a.nbytes for u in updates for a in u.weights.values())),
            metrics={"fed/env_steps": float(sum(u.num_samples for u in updates))},
        )
