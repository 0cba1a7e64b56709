"""Nested state (dicts, lists, scalars, NumPy arrays, torch tensors) to ``.npz`` + JSON and back.

Client records, optimizer states and RNG states are trees of plain values and arrays. They are
stored as two files: the arrays in an ``.npz`` (read with ``allow_pickle=False``) and the tree
in JSON with each array replaced by a reference. Nothing is ever unpickled, so a state file
planted in a run directory cannot execute code; a file that does not decode is reported as
:class:`StateFileError`, never as a crash deep inside a loader.

Types JSON cannot carry are tagged: ``{"__t": "array", "key": ...}`` (NumPy, also 0-d for NumPy
scalars), ``"tensor"`` (a torch tensor, restored as one), ``"tuple"`` and ``"dict"`` (a mapping
whose keys are not all strings, such as a torch optimizer's parameter ids). Python's big
integers (PCG64's 128-bit state) and non-finite floats pass through JSON as they are.
"""

from __future__ import annotations

import io
import json
import sys
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np

TAG = "__t"
TREE = "__tree__"


class StateFileError(ValueError):
    """A state file that is missing, truncated, or not one this module wrote."""


def encode(tree: Any) -> tuple[Any, dict[str, np.ndarray]]:
    """``tree`` as a JSON-able tree plus the arrays it referenced (keys ``a0``, ``a1`` ...)."""
    arrays: dict[str, np.ndarray] = {}

    def put(array: np.ndarray, kind: str) -> dict[str, str]:
        if array.dtype == object or array.dtype.hasobject:
            raise TypeError("object arrays cannot be stored without pickle")
        key = f"a{len(arrays)}"
        arrays[key] = array
        return {TAG: kind, "key": key}

    def walk(node: Any) -> Any:
        if node is None or isinstance(node, (bool, str)):
            return node
        if isinstance(node, (int, float)) and not isinstance(node, np.generic):
            return node
        if isinstance(node, np.ndarray):
            return put(node, "array")
        if isinstance(node, np.generic):
            return put(np.asarray(node), "array")
        if _is_tensor(node):
            return put(node.detach().cpu().numpy(), "tensor")
        if isinstance(node, tuple):
            return {TAG: "tuple", "items": [walk(x) for x in node]}
        if isinstance(node, list):
            return [walk(x) for x in node]
        if isinstance(node, Mapping):
            if all(isinstance(k, str) for k in node) and TAG not in node:
                return {k: walk(v) for k, v in node.items()}
            return {TAG: "dict", "items": [[walk(k), walk(v)] for k, v in node.items()]}
        raise TypeError(f"cannot store a {type(node).__name__} without pickle")

    return walk(tree), arrays


def decode(tree: Any, arrays: Mapping[str, np.ndarray]) -> Any:
    """Inverse of :func:`encode`."""

    def walk(node: Any) -> Any:
        if isinstance(node, list):
            return [walk(x) for x in node]
        if not isinstance(node, dict):
            return node
        kind = node.get(TAG)
        if kind is None:
            return {k: walk(v) for k, v in node.items()}
        if kind in ("array", "tensor"):
            try:
                array = arrays[node["key"]]
            except KeyError:
                raise StateFileError(f"the state refers to an array {node.get('key')!r} it does not hold") from None
            if kind == "tensor":
                import torch

                return torch.from_numpy(np.array(array, copy=True))
            return array[()] if array.ndim == 0 else array
        if kind == "tuple":
            return tuple(walk(x) for x in node["items"])
        if kind == "dict":
            return {_hashable(walk(k)): walk(v) for k, v in node["items"]}
        raise StateFileError(f"unknown tag {kind!r} in a state file")

    return walk(tree)


def dumps(tree: Any) -> bytes:
    """One ``.npz`` holding the arrays and, as member ``__tree__``, the JSON tree (UTF-8 bytes):
    a single file, so that one ``os.replace`` commits a whole state."""
    meta, arrays = encode(tree)
    buffer = io.BytesIO()
    # One mapping (the array keys are a0, a1 ...: never TREE), typed Any: numpy's stub would
    # match a **dict of arrays against savez's allow_pickle: bool.
    members: dict[str, Any] = {**arrays, TREE: np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)}
    np.savez(buffer, **members)
    return buffer.getvalue()


def loads(data: bytes) -> Any:
    """Inverse of :func:`dumps`; any damage is a :class:`StateFileError`."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            arrays = {k: archive[k] for k in archive.files}
        tree = json.loads(arrays.pop(TREE).tobytes().decode("utf-8"))
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile, UnicodeDecodeError) as err:
        # np.load refuses pickled (object) members with ValueError: a planted pickle lands here.
        raise StateFileError(f"unreadable state ({type(err).__name__}: {err})") from None
    return decode(tree, arrays)


def _is_tensor(node: Any) -> bool:
    torch = sys.modules.get("torch")  # a NumPy-only state never imports torch
    return torch is not None and isinstance(node, torch.Tensor)


def _hashable(key: Any) -> Any:
    return tuple(key) if isinstance(key, list) else key
