"""Mitigation by patching: the clean set with reversed triggers stamped on a fraction of it,
labels kept TRUE, for fine-tuning (Neural Cleanse's "unlearning", also TABOR's and
DeepInspect's).

Neural Cleanse (Wang et al., S&P 2019, §VI-C) fine-tunes on the clean data where 20% of the
images carry the reversed trigger of a flagged class and keep their correct label, so the
model learns to ignore the trigger. :func:`patched_clean_set` builds that set; the defenses
then run the ``ft`` defense (``defenses.ft.FineTuning``) on it.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from ..errors import ConfigError
from .base import CleanSet

Stamp = Callable[[np.ndarray, int], np.ndarray]


def patched_clean_set(clean_set: CleanSet, stamp: Stamp, classes: Sequence[int], fraction: float,
                      rng: np.random.Generator) -> tuple[CleanSet, np.ndarray]:
    """A copy of ``clean_set`` where ``round(fraction · N)`` images, chosen by ``rng``, carry a trigger.

    stamp(x (n, H, W, C), c) -> (n, H, W, C): class c's reversed trigger applied to x (values
    in [0, 1]). The chosen images are split evenly over ``classes`` (in the given order);
    labels are unchanged. With no classes the set is returned as is. Returns the new set and
    the (N,) int array of the class whose trigger each image carries (−1: untouched).
    """
    if not 0.0 <= fraction <= 1.0:
        raise ConfigError(f"the patched fraction must be in [0, 1], got {fraction!r}")
    n = len(clean_set)
    which = np.full(n, -1, np.int64)
    if not classes or fraction == 0.0:
        return clean_set, which
    x = np.array(clean_set.x, np.float32, copy=True)
    chosen = rng.permutation(n)[: int(round(fraction * n))]
    for c, idx in zip(classes, np.array_split(chosen, len(classes))):
        if len(idx):
            stamped = np.asarray(stamp(x[idx], int(c)), np.float32)
            if stamped.shape != x[idx].shape or not np.isfinite(stamped).all():
                raise ConfigError(f"the trigger of class {c} gave {stamped.shape} images (or non-finite values) "
                                  f"for {x[idx].shape}")
            x[idx] = np.clip(stamped, 0.0, 1.0)
            which[idx] = int(c)
    return CleanSet(x, np.asarray(clean_set.y), clean_set.num_classes), which
