"""Clean accuracy, attack success rate (ASR) in both conventions, robust accuracy and DER.

- ``clean_acc``: accuracy on clean images;
- ``asr_all``: every triggered image counts (the original I-BAU code; a clean model scores
  about 1/classes because target-class images are included);
- ``asr_nontarget``: only images whose true class differs from the target (BackdoorBench);
- ``robust_acc`` (RA): accuracy of the triggered non-target images against their TRUE labels
  (BackdoorBench): how many backdoored inputs a defended model still classifies correctly;
- ``der``: BackdoorBench's defense effectiveness rating of a defense, from the metrics before
  and after it, DER = [max(0, ΔASR) − max(0, ΔACC) + 1] / 2 with ΔASR = ASR_before − ASR_after
  (asr_all) and ΔACC = ACC_before − ACC_after (clean_acc); 1 is best, 0.5 no change.

Evaluation batches run in one compiled loop, optionally split over a device mesh
(``sharding``); any device count works (the eval batch is rounded up to a multiple of it and
the padding dropped).
"""
from __future__ import annotations

from functools import partial
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from . import sharding

# apply_fn(variables, x (N, H, W, C)) -> logits (N, classes); must be hashable (it is a static jit argument).
ApplyFn = Callable[[Any, jax.Array], jax.Array]
METRICS = ("clean_acc", "asr_all", "asr_nontarget", "robust_acc")


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


def predict(apply_fn: ApplyFn, variables: Any, x: np.ndarray | jax.Array, batch_size: int = 500,
            mesh: Any = None) -> np.ndarray:
    """Argmax predictions (N,) of ``apply_fn(variables, .)`` over x (N, H, W, C).

    Batches run inside one compiled loop; the tail is padded to a whole batch and dropped,
    so any N works. With ``mesh`` each batch is split over its devices (the batch size is
    rounded up to a multiple of the device count).
    """
    if mesh is None:
        xb, n = pad_to_batches(x, batch_size)
        return np.asarray(predict_batches(apply_fn, variables, xb)).reshape(-1)[:n]
    xb, n = pad_to_batches(x, sharding.padded_size(batch_size, mesh))
    preds = predict_batches(apply_fn, sharding.replicate(mesh, variables), sharding.shard(mesh, xb, axis=1))
    return sharding.gather(preds, mesh).reshape(-1)[:n]


def accuracy(preds: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of ``preds == labels``."""
    return float(np.mean(np.asarray(preds) == np.asarray(labels)))


def class_accuracy(preds: np.ndarray, labels: np.ndarray, num_classes: int) -> list[float | None]:
    """Accuracy within each true class: entry c = mean(preds[labels == c] == c), None for a class
    with no image. preds, labels: (N,) ints in [0, num_classes)."""
    preds, labels = np.asarray(preds), np.asarray(labels)
    right = np.bincount(labels[preds == labels], minlength=num_classes)
    total = np.bincount(labels, minlength=num_classes)
    return [float(r / t) if t else None for r, t in zip(right, total)]


def attack_success(preds: np.ndarray, targets: np.ndarray, true_labels: np.ndarray) -> dict[str, float]:
    """ASR and robust accuracy of predictions on triggered images.

    preds, targets (the attack's label for each image), true_labels: (N,).
    Returns ``{'asr_all', 'asr_nontarget', 'robust_acc'}``; the last two count only the images
    whose true label differs from their attack label (None when there is none).
    """
    preds, targets, true_labels = map(np.asarray, (preds, targets, true_labels))
    hit = preds == targets
    keep = true_labels != targets
    return {"asr_all": float(hit.mean()),
            "asr_nontarget": float(hit[keep].mean()) if keep.any() else None,
            "robust_acc": float((preds[keep] == true_labels[keep]).mean()) if keep.any() else None}


def evaluate(apply_fn: ApplyFn, variables: Any, acc_x: np.ndarray, acc_y: np.ndarray, asr_x: np.ndarray,
             asr_targets: np.ndarray, asr_true: np.ndarray, batch_size: int = 500,
             mesh: Any = None, num_classes: int = 0) -> dict[str, Any]:
    """``{'clean_acc', 'asr_all', 'asr_nontarget', 'robust_acc'}`` of a model on an accuracy set
    and a triggered set (``asr_true``: the triggered images' true labels); with ``num_classes``
    also ``'class_acc'``, the accuracy set's ``class_accuracy``."""
    preds = predict(apply_fn, variables, acc_x, batch_size, mesh)
    out: dict[str, Any] = {"clean_acc": accuracy(preds, acc_y)}
    out.update(attack_success(predict(apply_fn, variables, asr_x, batch_size, mesh), asr_targets, asr_true))
    if num_classes:
        out["class_acc"] = class_accuracy(preds, acc_y, num_classes)
    return out


def der(before: Mapping[str, float], after: Mapping[str, float]) -> float:
    """Defense effectiveness rating, [max(0, ΔASR) − max(0, ΔACC) + 1] / 2, from ``asr_all`` and
    ``clean_acc`` before and after a defense (BackdoorBench, Wu et al. 2022)."""
    d_asr = before["asr_all"] - after["asr_all"]
    d_acc = before["clean_acc"] - after["clean_acc"]
    return (max(0.0, d_asr) - max(0.0, d_acc) + 1.0) / 2.0
