"""The error family of :mod:`ibau_jax.data`."""
from __future__ import annotations

from ..errors import UserError

__all__ = ["DataError"]


class DataError(UserError):
    """Missing, corrupt or malformed data. The message names the problem and the fix."""
