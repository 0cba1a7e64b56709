"""A round under secure aggregation: the driver's side of ``privacy.secagg``'s protocol.

The driver relays and sums; the clients' actors hold every secret. Five calls per host:
``secagg_keys`` (public keys out, each advertisement signed with the client's registered
identity, ``privacy.pki``), ``secagg_shares`` (sealed shares out, relayed to their recipients),
``train_masked`` (the masked vectors w·θ ‖ w), ``secagg_confirm`` (each survivor signs the
survivor set) and ``secagg_reveal`` (the shares that remove the masks, given only against
enough neighbours' signatures of the same set). A host lost in a phase is not retried (its
secrets died with it); its clients drop out: before sharing they leave the round, after it
the survivors' shares remove their masks. The result is the survivors' sum Σ w·θ and Σ w (w: a client's sample count, or
1 under DP), exact up to fixed-point rounding (≤ n·2^-(f+1) per coordinate); the strategy
turns it into the new model (the dense weighted FedAvg, or DP's noised step).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedrlhf_ray.collectors import Collected, Hosts, RoundSpent
from fedrlhf_ray.local_trainer import MaskedUpdate, RoundInstructions, Weights
from fedrlhf_ray.metrics import metric_means
from fedrlhf_ray.privacy.client_dp import UNCLIPPED_KEY
from fedrlhf_ray.privacy.secagg import (
    RING,
    SecAggError,
    dequantize,
    evaluation_session,
    round_graph,
    share_threshold,
    unmask_sum,
)


@dataclass(frozen=True)
class SecureCollector:
    """Settings of ``privacy.secure_aggregation`` and the round it runs (a
    :class:`~fedrlhf_ray.collectors.Collector` whose result is the survivors' sum only)."""

    fraction_bits: int
    threshold_fraction: float
    neighbours: int | None
    seed: int
    # Against a malicious server: the consistency round before any share is revealed.
    consistency_round: bool = True
    # Called with (round, the fewest inputs a sum of it could hold) before any masked input of
    # the round is asked for: the driver notes it durably, so it never runs the round again.
    before_sending: Callable[[int, int], None] | None = None

    def collect(
        self, hosts: Hosts, round_index: int, sampled: list[int], global_ref: Any,
        instructions: RoundInstructions, shared: Mapping[str, np.ndarray], keep_from: int, digest: str = "",
    ) -> Collected:
        """The survivors' Σ w·θ (by name as in ``shared``, plus DP's not-clipped bit when the
        instructions ask for it) and Σ w, and their masked updates. No survivors: zeros and 0.
        ``digest``: the round's :func:`~fedrlhf_ray.privacy.client_policy.round_input_digest`."""
        counting = instructions.dp is not None and instructions.dp.count
        template = {**shared, UNCLIPPED_KEY: np.zeros(1)} if counting else dict(shared)
        zeros = {k: np.zeros(np.shape(v)) for k, v in template.items()}
        if len(sampled) < 3:
            # Only DP's Poisson sampling draws so few: no sum of them could hide an update, so
            # the round collects none (DP still releases its noise).
            return Collected([], received_bytes=0.0, metrics={"secagg/skipped": 1.0}, total=(zeros, 0.0),
                             skipped=True)
        flat, updates, metrics = self._session(
            hosts, round_index, sampled, digest, "train_masked", (global_ref, instructions, keep_from),
            self.before_sending,
        )
        total, weight = zeros, 0.0
        if updates:
            size = sum(int(np.size(v)) for v in template.values())
            weight = float(flat[size])
            if weight <= 0:
                raise RoundSpent(f"round {round_index}: the survivors' total sample count is {weight:g}", len(updates))
            total = unflatten(flat[:size], template, dtype=np.dtype(np.float64))
            names = updates[0].names
            # The clients' scalar metrics, summed with their updates: means only, when all name
            # the same metrics (else their values were summed out of line, and are left out).
            if all(u.names == names for u in updates):
                metrics.update({f"{k}/mean": v for k, v in metric_means(flat[size + 1 :], names).items()})
        return Collected(
            updates, received_bytes=float(sum(u.masked.nbytes for u in updates)), metrics=metrics,
            total=(total, weight),
        )

    def evaluate(
        self, hosts: Hosts, round_index: int, clients: list[int], global_ref: Any, finetune_iterations: int,
        digest: str, before_sending: Callable[[int, int], None] | None = None,
    ) -> tuple[dict[str, float], int]:
        """Held-out metrics of round ``round_index``'s model summed securely over ``clients``:
        each metric's mean over the clients that had it, and how many clients the sum holds. The
        driver never sees one client's metrics. Raises :class:`RoundSpent` when the session
        fails after its masked inputs were asked for, :class:`SecAggError` before."""
        session = evaluation_session(round_index)
        flat, updates, _ = self._session(
            hosts, session, clients, digest, "evaluate_masked", (global_ref, finetune_iterations, round_index),
            before_sending,
        )
        if not updates:
            return {}, 0
        names = updates[0].names
        if any(u.names != names for u in updates):
            # The values of different names were summed together: nothing of it is usable.
            raise RoundSpent(f"round {round_index}: the clients' evaluations name different metrics", len(updates))
        return metric_means(flat, names), len(updates)

    def _session(
        self, hosts: Hosts, session: int, clients: list[int], digest: str, masked_method: str,
        masked_args: tuple[Any, ...], before_sending: Callable[[int, int], None] | None,
    ) -> tuple[np.ndarray, list[MaskedUpdate], dict[str, float]]:
        """One run of the protocol over ``clients``: the survivors' unmasked sum (dequantized),
        their masked inputs and the session's metrics. ``masked_method`` (``train_masked`` or
        ``evaluate_masked``) makes the masked inputs from ``masked_args``."""
        r = session
        groups = hosts.by_host(clients)
        replies = hosts.call_once("secagg_keys", r, groups, {h: (digest,) for h in groups})
        keys = {c: k for reply in replies.values() for c, k in reply.items()}
        members = sorted(keys)
        if len(members) < 3:
            raise SecAggError(f"round {r}: {len(members)} clients answered; secure aggregation needs at least 3")
        graph = round_graph(members, self.neighbours, self.seed, r)
        threshold = share_threshold(min(len(v) for v in graph.values()), self.threshold_fraction)

        groups = hosts.by_host(members)
        share_args = {
            h: ({c: {j: keys[j] for j in graph[c]} for c in ids}, threshold, members) for h, ids in groups.items()
        }
        replies = hosts.call_once("secagg_shares", r, groups, share_args)
        sealed = {c: s for reply in replies.values() for c, s in reply.items()}
        active = sorted(sealed)
        held: dict[int, dict[int, bytes]] = {c: {} for c in active}
        for sender, blobs in sealed.items():
            for receiver, blob in blobs.items():
                if receiver in held:
                    held[receiver][sender] = blob

        # A sum needs each survivor's self-mask rebuilt from t other survivors' shares.
        fewest = min(len(active), threshold + 1)
        if before_sending is not None:
            before_sending(r, fewest)
        try:
            return self._masked_phase(
                hosts, r, clients, masked_method, masked_args, graph, keys, active, held, threshold
            )
        except SecAggError as err:
            raise RoundSpent(str(err), fewest) from None

    def _masked_phase(
        self, hosts: Hosts, r: int, clients: list[int], masked_method: str, masked_args: tuple[Any, ...],
        graph: dict[int, list[int]], keys: dict[int, tuple[bytes, bytes, bytes]], active: list[int],
        held: dict[int, dict[int, bytes]], threshold: int,
    ) -> tuple[np.ndarray, list[MaskedUpdate], dict[str, float]]:
        """Masked inputs out, shares revealed, the sum unmasked. Once it starts the session is
        spent: a failure raises :class:`RoundSpent`, never a retry."""
        groups = hosts.by_host(active)
        args = {h: (*masked_args, {c: held[c] for c in ids}, active, self.fraction_bits) for h, ids in groups.items()}
        replies = hosts.call_once(masked_method, r, groups, args)
        updates = sorted((u for reply in replies.values() for u in reply), key=lambda u: u.client_id)
        survivors = [u.client_id for u in updates]
        metrics = {
            "fed/dropouts": float(len(clients) - len(survivors)),
            "secagg/neighbours": float(min(len(v) for v in graph.values())),
            "secagg/threshold": float(threshold),
        }
        if not survivors:
            return np.zeros(0), [], metrics
        masked_sum = np.zeros(len(updates[0].masked), dtype=RING)
        for u in updates:
            masked_sum = masked_sum + u.masked
        # The consistency round: every survivor signs the survivor set, and reveals only once
        # enough of its neighbours signed the same one (a driver telling clients different sets
        # gets no share from them).
        self._enough_neighbours(r, survivors, set(survivors), graph, threshold, "survived")
        signed = dict.fromkeys(survivors, b"")
        if self.consistency_round:
            groups = hosts.by_host(survivors)
            replies = hosts.call_once("secagg_confirm", r, groups, {h: (survivors,) for h in groups})
            signed = {c: sig for reply in replies.values() for c, sig in reply.items()}
            self._enough_neighbours(r, survivors, set(signed), graph, threshold, "confirmed the survivors")
        groups = hosts.by_host(sorted(signed))
        reveal_args = {
            h: (survivors, {c: {j: signed[j] for j in graph[c] if j in signed} for c in ids})
            for h, ids in groups.items()
        }
        replies = hosts.call_once("secagg_reveal", r, groups, reveal_args)
        revealed = {c: shares for reply in replies.values() for c, shares in reply.items()}
        in_round = set(active)
        sub_graph = {c: [j for j in graph[c] if j in in_round] for c in active}
        public = {c: (k[0], k[1]) for c, k in keys.items()}
        total = unmask_sum(masked_sum, r, sub_graph, public, set(survivors), revealed, threshold)
        return dequantize(total, self.fraction_bits), updates, metrics

    @staticmethod
    def _enough_neighbours(
        r: int, survivors: list[int], present: set[int], graph: Mapping[int, list[int]], threshold: int, what: str
    ) -> None:
        """Every survivor has ``threshold`` neighbours in ``present``, as its clients will check
        (else unmasking could not succeed, and the round is spent without asking them)."""
        short = [u for u in survivors if sum(j in present for j in graph[u]) < threshold]
        if short:
            raise SecAggError(
                f"round {r}: fewer than {threshold} of client {short[0]}'s neighbours {what} "
                "(too many dropouts for the threshold)"
            )


def unflatten(flat: np.ndarray, template: Mapping[str, np.ndarray], dtype: np.dtype | None = None) -> Weights:
    """A flat vector (keys in sorted order, as the clients flatten) back to named arrays, in
    ``dtype`` or the template's float dtypes."""
    out: Weights = {}
    offset = 0
    for k in sorted(template):
        ref = np.asarray(template[k])
        size = ref.size
        kind = dtype or (ref.dtype if np.issubdtype(ref.dtype, np.floating) else np.dtype(np.float64))
        out[k] = flat[offset : offset + size].reshape(ref.shape).astype(kind)
        offset += size
    if offset != flat.size:
        raise SecAggError(f"the unmasked sum has {flat.size} values, the shared weights {offset}")
    return out
