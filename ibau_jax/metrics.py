"""Clean accuracy and attack success rate (ASR), in both conventions.

- ``asr_all``: every triggered image counts (the original I-BAU code; a clean model scores
  about 1/classes because target-class images are included);
- ``asr_nontarget``: only images whose true class differs from the target (BackdoorBench).
"""
from __future__ import annotations

from functools import partial
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

# apply_fn(variables, x (N, H, W, C)) -> logits (N, classes); must be hashable (it is a static jit argument).
ApplyFn = Callable[[Any, jax.Array], jax.Array]


def pad_to_batches(x: Any, batch_size: int) -> tuple[np.ndarray, int]:
    """x (N, ...) -> (ceil(N / batch_size), batch_size, ...) zero-padded at the tail, and N."""
    x = np.asarray(x, np.float32)
    n = x.shape[0]
    nb = -(-n // batch_size)
    pad = ((0, nb * batch_size - n),) + ((0, 0),) * (x.ndim - 1)
    return np.pad(x, pad).reshape(nb, batch_size, *x.shape[1:]), n


@partial(jax.jit, static_argnums=0)
def predict_batches(apply_fn: ApplyFn, variables: Any, xb: jax.Array) -> jax.Array:
    """Argmax predictions (B, n) for batches xb (B, n, H, W, C), one compiled loop over B."""
    return jax.lax.map(lambda xi: jnp.argmax(apply_fn(variables, xi), -1), xb)


def predict(apply_fn: ApplyFn, variables: Any, x: np.ndarray | jax.Array, batch_size: int = 500) -> np.ndarray:
    """Argmax predictions (N,) of ``apply_fn(variables, .)`` over x (N, H, W, C).

    Batches run inside one compiled loop; the tail is padded to a whole batch and dropped,
    so any N works.
    """
    xb, n = pad_to_batches(x, batch_size)
    return np.asarray(predict_batches(apply_fn, variables, xb)).reshape(-1)[:n]


def accuracy(preds: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of ``preds == labels``."""
    return float(np.mean(np.asarray(preds) == np.asarray(labels)))


def attack_success(preds: np.ndarray, targets: np.ndarray, true_labels: np.ndarray) -> dict[str, float]:
    """ASR of predictions on triggered images.

    preds, targets (the attack's label for each image), true_labels: (N,).
    Returns ``{'asr_all', 'asr_nontarget'}``.
    """
    preds, targets, true_labels = map(np.asarray, (preds, targets, true_labels))
    hit = preds == targets
    keep = true_labels != targets
    return {"asr_all": float(hit.mean()),
            "asr_nontarget": float(hit[keep].mean()) if keep.any() else float("nan")}


def evaluate(apply_fn: ApplyFn, variables: Any, acc_x: np.ndarray, acc_y: np.ndarray, asr_x: np.ndarray,
             asr_targets: np.ndarray, asr_true: np.ndarray, batch_size: int = 500) -> dict[str, float]:
    """``{'clean_acc', 'asr_all', 'asr_nontarget'}`` of a model on an accuracy set and a triggered set."""
    out = {"clean_acc": accuracy(predict(apply_fn, variables, acc_x, batch_size), acc_y)}
    out.update(attack_success(predict(apply_fn, variables, asr_x, batch_size), asr_targets, asr_true))
    return out
