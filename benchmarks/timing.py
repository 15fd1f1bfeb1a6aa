"""Best-of-N wall time of a JAX call, shared by the benchmark scripts (run as ``python
benchmarks/NAME.py``, which puts this folder on ``sys.path``)."""
from __future__ import annotations

import time
from typing import Any, Callable

import jax


def best_seconds(fn: Callable[..., Any], *args: Any, reps: int, warmup: bool = True) -> float:
    """The fastest of ``reps`` calls ``fn(*args)``, each waited for (``block_until_ready``); one
    untimed call first when ``warmup`` (the compilation of a jitted ``fn``)."""
    if warmup:
        jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t0)
    return best
