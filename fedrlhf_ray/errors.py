"""User-facing error types: cheap to import (no Ray, no MLflow), shared by every layer.

Anything raised as a :class:`UserError` is a mistake the user can fix; the CLI prints its
message as one ``fedrlhf: error: ...`` line and exits with status 2, never a traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A user mistake; its message is one line that names the problem and what to do.
    ``resumable``: whether resuming the run can help once the user has acted (a full disk: yes;
    a client that refuses its driver's instructions: no, the same driver would be refused again)."""

    resumable = True


class ConfigError(UserError, ValueError):
    """A mistake in a config file, an override or a sweep file."""


class SweepError(UserError):
    """A sweep ran to its end without a usable result (no trial reported its metric): its runs
    are closed and there is nothing to resume."""
