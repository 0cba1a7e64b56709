"""Client actors: each hosts a pool of virtual clients over one local trainer.

A :class:`ClientHost` keeps, per virtual client it has served, one :class:`ClientRecord`: the
trainer's record (reward model, feedback, human RNG, optimizer state) and the parameters that
never leave the client (a personal head, or the whole model for the local-only baseline).
Memory therefore grows with the clients' records, not with K processes or K RLlib algorithms.
Clients are pinned to hosts (``client_id % W``) so a record never moves.

``ClientActor`` is the same class as a Ray actor; tests can use the plain class.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

import ray

from fedrlhf_ray.local_trainer import ClientUpdate, LocalTrainer, Weights
from fedrlhf_ray.strategies import split_personal


@dataclass
class ClientRecord:
    trainer_state: Any = None
    personal: Weights = field(default_factory=dict)


class ClientHost:
    """Serves the virtual clients assigned to it; see the module docstring."""

    def __init__(
        self,
        trainer_factory: Callable[[], LocalTrainer],
        personal_prefixes: Collection[str] = (),
    ) -> None:
        self.trainer = trainer_factory()
        self.personal_prefixes = tuple(personal_prefixes)
        self.records: dict[int, ClientRecord] = {}

    def ready(self) -> bool:
        return True

    def node_id(self) -> str:
        """The Ray node this host runs on (``"local"`` outside Ray)."""
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"

    def initial_weights(self) -> Weights:
        """The freshly built policy's parameters (every host builds the same ones)."""
        return self.trainer.get_weights()

    def _swap_in(self, client_id: int, global_weights: Weights) -> ClientRecord:
        record = self.records.get(client_id, ClientRecord())
        self.trainer.load_client(client_id, record.trainer_state)
        # Personal parameters (a head, or everything for the local baseline) override the
        # global ones: they are this client's own.
        self.trainer.set_weights({**global_weights, **record.personal})
        return record

    def train_client(
        self, round_index: int, client_id: int, global_weights: Weights, proximal: bool = False
    ) -> ClientUpdate:
        """One local round; returns only shared weights, the sample count and scalars."""
        self._swap_in(client_id, global_weights)
        # The proximal anchor is the shared model only: personal parameters are not pulled
        # towards the global copy, which nobody trains.
        anchor = (
            {k: v for k, v in global_weights.items() if not k.startswith(self.personal_prefixes)}
            if proximal
            else None
        )
        num_samples, metrics = self.trainer.train(round_index, anchor)
        shared, personal = split_personal(self.trainer.get_weights(), self.personal_prefixes)
        self.records[client_id] = ClientRecord(self.trainer.save_client(), personal)
        return ClientUpdate(client_id, shared, int(num_samples), {k: float(v) for k, v in metrics.items()})

    def train_clients(
        self, round_index: int, client_ids: list[int], global_weights: Weights, proximal: bool = False
    ):
        """The round's clients of this host, one after the other, streamed back as they finish.

        One remote call per host and round instead of one per client: Ray's per-call cost
        (~1 ms) is what dominated the engine's overhead with light local training.
        """
        for client_id in client_ids:
            yield self.train_client(round_index, client_id, global_weights, proximal)

    def train_batch(
        self, round_index: int, client_ids: list[int], global_weights: Weights, proximal: bool = False
    ) -> list[ClientUpdate]:
        """Like :meth:`train_clients` but in one reply (no straggler deadline to honour)."""
        return list(self.train_clients(round_index, client_ids, global_weights, proximal))

    def evaluate_clients(
        self, round_index: int, client_ids: list[int], global_weights: Weights, finetune_iterations: int = 0
    ) -> list[dict[str, float]]:
        return [
            self.evaluate_client(round_index, c, global_weights, finetune_iterations) for c in client_ids
        ]

    def evaluate_client(
        self, round_index: int, client_id: int, global_weights: Weights, finetune_iterations: int = 0
    ) -> dict[str, float]:
        """Held-out metrics of the model this client would use, ``eval/...``.

        With fine-tuning, also the plain global model's (``eval_global/...``); fine-tuning
        happens on a throw-away copy: the client's record is not touched.
        """
        self._swap_in(client_id, global_weights)
        if finetune_iterations <= 0:
            return self.trainer.evaluate(round_index)
        before = self.trainer.evaluate(round_index)
        self.trainer.finetune(round_index, finetune_iterations)
        after = self.trainer.evaluate(round_index)
        return {**{k.replace("eval/", "eval_global/", 1): v for k, v in before.items()}, **after}

    def get_records(self) -> dict[int, ClientRecord]:
        return self.records

    def set_records(self, records: dict[int, ClientRecord]) -> None:
        self.records = dict(records)


ClientActor = ray.remote(ClientHost)
