"""The error family of ``ibau_jax.models``."""
from __future__ import annotations

from ..errors import UserError


class ModelError(UserError):
    """An unknown model or conv implementation, a bad class count, or a mask/feature request
    that does not fit the model (a wrong name or shape)."""
