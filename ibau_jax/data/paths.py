"""Where data lives on disk: the project's shared data folder and the download cache.

Both are read from the environment at call time (``$IBAU_SHARED``, ``$IBAU_CACHE``), so a
test or a user can redirect them without touching code.
"""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["default_shared_dir", "default_cache_dir"]


def default_shared_dir() -> Path:
    """The shared data folder that tests and benchmarks read.

    ``$IBAU_SHARED`` if set, else ``../shared`` relative to the current working directory
    (the folder beside the project checkout). Library functions never use this implicitly;
    they take explicit paths.
    """
    env = os.environ.get("IBAU_SHARED")
    if env:
        return Path(env).expanduser()
    return Path.cwd().parent / "shared"


def default_cache_dir() -> Path:
    """Where downloads go: ``$IBAU_CACHE`` if set, else ``~/.cache/ibau_jax``."""
    env = os.environ.get("IBAU_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ibau_jax"
