"""A plain-torch :class:`~fedrlhf_ray.local_trainer.LocalTrainer` (no RLlib) for engine work.

:class:`MLPTrainer` trains one small MLP (``in_dim → hidden → hidden → n_classes``, ReLU) with
minibatch SGD on synthetic classification data. It exists so the federation engine (client
actors, driver, strategies, checkpoints) can be benchmarked and tested in seconds: the local
work is trivial, so whatever else a round costs is the engine's.

Determinism — every random stream is derived from the root ``seed`` with
:func:`fedrlhf_ray.seeding.derive_seed`, never from torch's global RNG:

* initial weights: ``(seed, "init")`` — every instance (every client actor) builds the same
  model, as the driver expects;
* a fixed linear teacher shared by all clients: ``(seed, "teacher")``;
* client ``c``'s data (``n_samples`` features ~ N(0, 1), label = argmax(teacher logits + noise)),
  generated lazily on first use and cached: ``(seed, "data", c)``;
* the batch order of ``train``: ``(seed, "batches", round, c)``; of ``finetune``:
  ``(seed, "finetune", round, c)``.

So the result of a round depends only on (seed, round, client, incoming weights): a plain
in-process loop and the Ray engine compute the same thing.

A client's record (:meth:`MLPTrainer.save_client`) is tiny — ``{"rounds_done": n}``; plain SGD
has no optimizer state. :class:`MLPTrainerFactory` is the picklable zero-argument factory that
runs inside a client actor, and :func:`mlp_trainer_factory` gives the
``(host_index, num_hosts) -> factory`` callable that
:class:`~fedrlhf_ray.driver.FederatedDriver` takes as ``trainer_factory``.
"""

from __future__ import annotations

import functools
import os
import signal
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from fedrlhf_ray.local_trainer import Weights
from fedrlhf_ray.seeding import derive_seed

LABEL_NOISE = 0.5  # std of the noise added to the teacher's logits before the argmax


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


class MLPTrainer:
    """Local SGD on a small MLP for the virtual clients ``client_ids`` (see the module docstring).

    ``sleep_s[client_id]`` makes :meth:`train` sleep that long first (straggler tests).
    A round with ``proximal_mu > 0`` adds FedProx's μ/2·‖θ − anchor‖² to the loss (the
    strategy's instruction). ``pooled_clients`` maps an extra client id to the
    clients whose data it concatenates (the centralized baseline's pooled client).
    ``lr_decay`` scales a client's learning rate by ``lr_decay ** rounds_done``: with a value
    below 1 the result of a round depends on the client's record, which resume and fault tests
    need. ``crash`` injects a fault: ``{"round": r, "client": c, "times": n, "marker": path,
    "how": "sigkill" | "ray_kill"}`` makes the first ``n`` attempts at that client's round kill
    the actor's process (``marker`` counts attempts across restarts).
    """

    def __init__(
        self,
        client_ids: Iterable[int],
        *,
        seed: int = 0,
        n_samples: int = 200,
        in_dim: int = 32,
        hidden: int = 64,
        n_classes: int = 10,
        batch_size: int = 32,
        lr: float = 0.01,
        epochs: int = 1,
        sleep_s: Mapping[int, float] | None = None,
        pooled_clients: Mapping[int, Sequence[int]] | None = None,
        lr_decay: float = 1.0,
        crash: Mapping[str, Any] | None = None,
    ) -> None:
        torch.set_num_threads(1)
        self.pooled_clients = {int(k): [int(c) for c in v] for k, v in (pooled_clients or {}).items()}
        self.client_ids = sorted({int(c) for c in client_ids} | set(self.pooled_clients))
        self._known = set(self.client_ids)
        self.seed = int(seed)
        self.n_samples = int(n_samples)
        self.in_dim = int(in_dim)
        self.n_classes = int(n_classes)
        self.batch_size = int(batch_size)
        self.lr = float(lr)
        self.epochs = int(epochs)
        self.sleep_s = {int(k): float(v) for k, v in (sleep_s or {}).items()}
        self.lr_decay = float(lr_decay)
        self.crash = dict(crash) if crash else None
        if self.n_samples < 1 or self.batch_size < 1 or self.epochs < 0:
            raise ValueError("n_samples and batch_size must be >= 1 and epochs >= 0")

        self.model = nn.Sequential(
            nn.Linear(self.in_dim, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, self.n_classes),
        )
        g = _generator(derive_seed(self.seed, "init"))
        with torch.no_grad():
            for module in self.model:
                if isinstance(module, nn.Linear):
                    bound = 1.0 / module.in_features**0.5
                    module.weight.uniform_(-bound, bound, generator=g)
                    module.bias.uniform_(-bound, bound, generator=g)
        self._params = dict(self.model.named_parameters())
        self._teacher = torch.randn(
            self.in_dim, self.n_classes, generator=_generator(derive_seed(self.seed, "teacher"))
        )
        self._data: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.current: int | None = None
        self.rounds_done = 0

    # -- data --------------------------------------------------------------------------------
    def client_data(self, client_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(features float32 [n, in_dim], labels int64 [n]) of ``client_id``; made once, cached."""
        client_id = int(client_id)
        if client_id not in self._data:
            if client_id in self.pooled_clients:
                parts = [self._make_data(c) for c in self.pooled_clients[client_id]]
                self._data[client_id] = (
                    torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])
                )
            else:
                self._data[client_id] = self._make_data(client_id)
        return self._data[client_id]

    def _make_data(self, client_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = _generator(derive_seed(self.seed, "data", client_id))
        x = torch.randn(self.n_samples, self.in_dim, generator=g)
        noise = LABEL_NOISE * torch.randn(self.n_samples, self.n_classes, generator=g)
        y = (x @ self._teacher + noise).argmax(dim=1)
        return x, y

    # -- LocalTrainer ------------------------------------------------------------------------
    def load_client(self, client_id: int, state: Any | None) -> None:
        client_id = int(client_id)
        if client_id not in self._known:
            raise KeyError(f"client {client_id} is not served by this trainer (it has {self.client_ids})")
        self.current = client_id
        self.rounds_done = 0 if state is None else int(state["rounds_done"])

    def save_client(self) -> dict[str, int]:
        self._require_client()
        return {"rounds_done": self.rounds_done}

    def get_weights(self) -> Weights:
        return {k: v.detach().numpy().copy() for k, v in self.model.state_dict().items()}

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        state = self.model.state_dict()
        unknown = [k for k in weights if k not in state]
        if unknown:
            raise KeyError(f"unknown parameter {unknown[0]!r}; the model has {list(state)}")
        for k, v in weights.items():
            arr = np.asarray(v)
            if arr.shape != tuple(state[k].shape):
                raise ValueError(f"{k}: got shape {arr.shape}, the model has {tuple(state[k].shape)}")
            # Into the parameter's memory through a numpy view: no copy of the (possibly
            # read-only, object-store-backed) input array is kept.
            np.copyto(state[k].numpy(), arr, casting="same_kind")

    def train(
        self, round_index: int, anchor: Weights | None, proximal_mu: float = 0.0
    ) -> tuple[int, dict[str, float]]:
        cid = self._require_client()
        start = time.perf_counter()
        if self.sleep_s.get(cid, 0.0) > 0:
            time.sleep(self.sleep_s[cid])
        self._maybe_crash(round_index, cid)
        anchor_t = None
        if anchor is not None and proximal_mu > 0:
            # Personal parameters have no global copy: the proximal term covers the shared ones.
            anchor_t = {
                k: torch.from_numpy(np.asarray(anchor[k], dtype=np.float32)) for k in self._params if k in anchor
            }
        g = _generator(derive_seed(self.seed, "batches", round_index, cid))
        loss = self._sgd(cid, self.epochs, g, anchor_t, proximal_mu, self.lr * self.lr_decay**self.rounds_done)
        self.rounds_done += 1
        n = int(self.client_data(cid)[0].shape[0])
        return n, {"train/loss": loss, "train/seconds": time.perf_counter() - start}

    def finetune(self, round_index: int, iterations: int) -> None:
        cid = self._require_client()
        g = _generator(derive_seed(self.seed, "finetune", round_index, cid))
        self._sgd(cid, int(iterations), g, None, lr=self.lr * self.lr_decay**self.rounds_done)

    @torch.no_grad()
    def samples(self, round_index: int) -> str | None:
        return None

    def evaluate(self, round_index: int) -> dict[str, float]:
        cid = self._require_client()
        x, y = self.client_data(cid)
        logits = self.model(x)
        return {
            "eval/loss": float(F.cross_entropy(logits, y)),
            "eval/accuracy": float((logits.argmax(dim=1) == y).float().mean()),
        }

    # -- internals ---------------------------------------------------------------------------
    def _maybe_crash(self, round_index: int, cid: int) -> None:
        spec = self.crash
        if spec is None or (spec["round"], spec["client"]) != (round_index, cid):
            return
        marker = Path(spec["marker"])
        attempts = int(marker.read_text()) if marker.exists() else 0
        if attempts >= int(spec.get("times", 1)):
            return
        marker.write_text(str(attempts + 1))
        if spec.get("how", "sigkill") == "ray_kill":
            import ray

            ray.kill(ray.get_runtime_context().current_actor, no_restart=False)
            time.sleep(600)  # ray.kill ends this process before the sleep does
        os.kill(os.getpid(), signal.SIGKILL)

    def _require_client(self) -> int:
        if self.current is None:
            raise RuntimeError("no client loaded: call load_client() first")
        return self.current

    def _sgd(
        self, cid: int, epochs: int, g: torch.Generator, anchor: dict[str, torch.Tensor] | None,
        proximal_mu: float = 0.0, lr: float | None = None,
    ) -> float:
        """``epochs`` epochs of minibatch SGD; the mean loss of the last epoch (nan if none)."""
        x, y = self.client_data(cid)
        n = x.shape[0]
        params: list[torch.Tensor] = list(self._params.values())
        names = list(self._params)
        last = float("nan")
        for _ in range(epochs):
            order = torch.randperm(n, generator=g)
            total = 0.0
            for i in range(0, n, self.batch_size):
                idx = order[i : i + self.batch_size]
                loss = F.cross_entropy(self.model(x[idx]), y[idx])
                if anchor is not None:
                    prox = sum(((p - anchor[k]) ** 2).sum() for k, p in zip(names, params, strict=True) if k in anchor)
                    loss = loss + 0.5 * proximal_mu * prox
                grads = torch.autograd.grad(loss, params)
                with torch.no_grad():
                    torch._foreach_add_(params, grads, alpha=-(self.lr if lr is None else lr))
                total += float(loss.detach()) * len(idx)
            last = total / n
        return last


class MLPTrainerFactory:
    """Picklable zero-argument factory run inside client actor ``host_index`` of ``num_hosts``.

    ``client_ids_or_num_clients``: the client ids, or K for ids ``0..K-1`` (then id K is the
    pooled client of the centralized baseline, over everyone's data). The trainer serves the
    clients with ``cid % num_hosts == host_index``; ``kwargs`` go to :class:`MLPTrainer`.
    """

    def __init__(
        self, client_ids_or_num_clients: int | Iterable[int], host_index: int, num_hosts: int, **kwargs: Any
    ) -> None:
        if isinstance(client_ids_or_num_clients, (int, np.integer)):
            k = int(client_ids_or_num_clients)
            self.client_ids = list(range(k))
            self.pooled = {k: list(range(k))}
        else:
            self.client_ids = sorted(int(c) for c in client_ids_or_num_clients)
            self.pooled = {}
        if not 0 <= host_index < num_hosts:
            raise ValueError(f"host_index {host_index} is not in [0, {num_hosts})")
        self.host_index = int(host_index)
        self.num_hosts = int(num_hosts)
        self.kwargs = kwargs

    def __call__(self) -> MLPTrainer:
        mine = lambda c: c % self.num_hosts == self.host_index  # noqa: E731
        return MLPTrainer(
            [c for c in self.client_ids if mine(c)],
            pooled_clients={k: v for k, v in self.pooled.items() if mine(k)},
            **self.kwargs,
        )


def mlp_trainer_factory(num_clients: int, **kwargs: Any) -> Callable[[int, int], MLPTrainerFactory]:
    """The ``(host_index, num_hosts) -> factory`` callable FederatedDriver's ``trainer_factory``
    expects, for clients ``0..num_clients-1`` (``kwargs`` go to :class:`MLPTrainer`)."""
    return functools.partial(MLPTrainerFactory, int(num_clients), **kwargs)
