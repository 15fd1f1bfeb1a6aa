"""Mitigation by patching: the clean set with reversed triggers stamped on a fraction of it,
labels kept TRUE, for fine-tuning (Neural Cleanse's "unlearning", also TABOR's and
DeepInspect's).

Neural Cleanse (Wang et al., S&P 2019, §VI-C) fine-tunes on the clean data where 20% of the
images carry the reversed trigger of a flagged class and keep their correct label, so the
model learns to ignore the trigger. :func:`patched_clean_set` builds that set; the defenses
then run the ``ft`` defense (``defenses.ft.FineTuning``) on it.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

from ..errors import ConfigError, check_finite
from .base import CleanSet
from .ft import FTConfig

Stamp = Callable[[np.ndarray, int], np.ndarray]


@dataclasses.dataclass(frozen=True)
class PatchingConfig:
    """The mitigation settings shared by the defenses that patch (``nc``, ``tabor``, ``deepinspect``).

    mitigate: fine-tune when a class is flagged (off: detection only). patch_fraction 0.2: NC
    §VI-C ("20% of the data carries the reversed trigger, labels kept"). ft_epochs 10, ft_lr
    0.01, ft_batch_size 128, crop_pad 4, flip: the ``ft`` defense's recipe (:class:`FTConfig`,
    whose docstring cites them; NC fine-tunes one epoch on 10 % of the training set, ibau-jax's
    5,000-image clean set is smaller, so it takes ``ft``'s 10 epochs).
    """

    mitigate: bool = True
    patch_fraction: float = 0.2
    ft_epochs: int = 10
    ft_lr: float = 0.01
    ft_batch_size: int = 128
    crop_pad: int = 4
    flip: bool = True

    def __post_init__(self):
        for name in ("ft_epochs", "ft_batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {v!r} (--set {name}=...)")
        if check_finite("ft_lr", self.ft_lr) <= 0:
            raise ConfigError(f"ft_lr must be a finite number > 0, got {self.ft_lr!r} (--set ft_lr=...)")
        if not 0 <= check_finite("patch_fraction", self.patch_fraction) <= 1:
            raise ConfigError(f"patch_fraction must be in [0, 1], got {self.patch_fraction!r} "
                              f"(--set patch_fraction=0.2)")
        if isinstance(self.crop_pad, bool) or not isinstance(self.crop_pad, (int, np.integer)) or self.crop_pad < 0:
            raise ConfigError(f"crop_pad must be an integer >= 0, got {self.crop_pad!r} (--set crop_pad=...)")

    def ft_config(self) -> FTConfig:
        """The fine-tuning that follows the patching, as the ``ft`` defense's config."""
        return FTConfig(epochs=self.ft_epochs, lr=self.ft_lr, batch_size=self.ft_batch_size,
                        crop_pad=self.crop_pad, flip=self.flip)


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
