"""The exception every MovieLens data problem raises: the data loaders' one (see ``envs.data.errors``)."""

from __future__ import annotations

from envs.data.errors import DatasetError

__all__ = ["DatasetError"]
