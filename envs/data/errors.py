"""The exception every data problem raises (MovieLens, IMDb, ...)."""

from __future__ import annotations


class DatasetError(ValueError):
    """A user-facing data problem (missing, corrupt or malformed dataset); one-line message."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))
