"""Shared helpers for the bilevel examples: CIFAR-10 features, timing, markdown tables."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable

import jax
import numpy as np
import optax

REPO = Path(__file__).resolve().parents[2]


def cifar_features(n: int, d: int, classes: tuple[int, ...] | None = None, seed: int = 0):
    """The first ``n`` CIFAR-10 test images (of ``classes``, if given) as (n, d) float64
    features: pixels/255, standardised, Gaussian random projection to d, standardised again.
    Returns (features, labels re-indexed 0..len(classes)-1)."""
    root = Path(os.environ.get("IBAU_SHARED", REPO.parent / "shared")) / "datasets" / "cifar10"
    data = np.load(root / "test.npz")
    x, y = data["x"], data["y"]
    if classes is not None:
        keep = np.isin(y, classes)
        x, y = x[keep], np.searchsorted(np.asarray(classes), y[keep])
    x = x[:n].reshape(n, -1).astype(np.float64) / 255.0
    x = (x - x.mean(0)) / (x.std(0) + 1e-8)
    proj = np.random.default_rng(seed).normal(size=(x.shape[1], d)) / np.sqrt(x.shape[1])
    f = x @ proj
    return (f - f.mean(0)) / f.std(0), y[:n]


def time_call(fn: Callable, *args, reps: int = 5) -> float:
    """Median wall time (s) of a compiled ``fn(*args)`` after one warm-up call."""
    jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def rel_err(a, b) -> float:
    a = np.concatenate([np.ravel(np.asarray(v)) for v in jax.tree.leaves(a)])
    b = np.concatenate([np.ravel(np.asarray(v)) for v in jax.tree.leaves(b)])
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def markdown(rows: list[dict], cols: list[str]) -> str:
    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(out)


def write_json(path: str | Path, payload: dict) -> None:
    """Write the results atomically (an interrupted run never leaves half a file)."""
    from ibau_jax.results import write_atomic

    write_atomic(Path(path), json.dumps(payload, indent=2))


def hypergrad_descent(hg: Callable, solve_inner: Callable, opt, steps: int) -> Callable:
    """Jitted ``descend(θ, w) -> (θ_T, w*(θ_T))``: ``steps`` optax steps on θ with ``hg(w, θ)[1]``,
    the inner solution warm-started by ``solve_inner(θ, w)`` before every hypergradient."""
    @jax.jit
    def descend(th, w):
        def body(carry, _):
            th, w, st = carry
            w = solve_inner(th, w)
            upd, st = opt.update(hg(w, th)[1], st)
            return (optax.apply_updates(th, upd), w, st), None
        (th, w, _), _ = jax.lax.scan(body, (th, w, opt.init(th)), None, length=steps)
        return th, solve_inner(th, w)
    return descend
