"""The one base class of errors a user can cause and fix.

Every error raised because of the user's input (a missing or corrupt file, a checkpoint of
the wrong architecture, an unknown attack or defense, a flag out of range) derives from
:class:`UserError`. The CLI prints those as one line and exits 2; any other exception is a
bug and keeps its traceback. The families (``data.DataError``, ``checkpoints.CheckpointError``,
``attacks.AttackError``, ``training.RunError``) subclass it where they are raised.
"""
from __future__ import annotations

import math
from typing import Any


class UserError(ValueError):
    """An error the user can fix; the message names the problem and the fix.

    A ``ValueError`` subclass so that callers catching ``ValueError`` keep working, but the CLI
    catches only ``UserError``: a plain ``ValueError`` (an internal bug) keeps its traceback.
    """


class ConfigError(UserError):
    """A hyperparameter or setting out of range, non-finite, or unknown."""


def check_finite(name: str, value: Any) -> float:
    """``float(value)``, or ConfigError when it is not a finite real number."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v):
        raise ConfigError(f"{name} must be finite, got {value!r}")
    return v
