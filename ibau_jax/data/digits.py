"""The demo's small datasets: scikit-learn's bundled digits at 32×32, and CIFAR-10 subsets.

Digits: scikit-learn's bundled 8×8 digits (1797 images, 10 classes, values 0..16), scaled
to [0, 1] and upsampled to 32×32 by nearest neighbour (each pixel becomes a 4×4 block:
crisp strokes, and the BadNets patch at rows/cols 27..30 lands on a black border block),
grey copied to 3 channels. A seeded permutation splits it into train / clean (the
defender's I-BAU set) / test, so the demo runs with no download. scikit-learn is imported
only when the digits are loaded.
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np

from .cifar10 import load_cifar10
from .dataset import to_float
from .errors import DataError

__all__ = ["DemoData", "load_digits_32", "load_cifar10_subsets"]


@dataclasses.dataclass
class DemoData:
    """Train / clean / test arrays of one demo dataset, images already float32 in [0, 1]."""

    train_x: np.ndarray   # (N, 32, 32, 3) float32 in [0, 1]
    train_y: np.ndarray   # (N,) int32
    clean_x: np.ndarray   # defender's clean set
    clean_y: np.ndarray
    test_x: np.ndarray    # clean accuracy / ASR set
    test_y: np.ndarray
    num_classes: int
    name: str


def load_digits_32(seed: int, n_clean: int, n_test: int) -> DemoData:
    """sklearn digits -> 32×32×3 float32 (nearest upsampling ×4), split by a seeded permutation.

    With ``perm = np.random.default_rng(seed).permutation(1797)`` applied to the images, the
    clean set is ``[0, n_clean)``, the test set ``[n_clean, n_clean + n_test)`` and the
    training set the rest. Raises DataError when ``n_clean + n_test`` leaves nothing to train on.
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    n = len(d.target)
    if n_clean + n_test >= n:
        raise DataError(f"--n-clean {n_clean} + --n-test {n_test} leave no digits to train on "
                        f"({n} in all); lower --n-clean or --n-test so that their sum is below {n}")
    x = (d.images / 16.0).astype(np.float32)                      # (1797, 8, 8)
    x = np.repeat(np.repeat(x, 4, axis=1), 4, axis=2)              # (1797, 32, 32)
    x = np.repeat(x[..., None], 3, axis=-1)                        # (1797, 32, 32, 3)
    y = d.target.astype(np.int32)
    perm = np.random.default_rng(seed).permutation(len(y))
    x, y = x[perm], y[perm]
    c, t = n_clean, n_clean + n_test
    return DemoData(x[t:], y[t:], x[:c], y[:c], x[c:t], y[c:t], 10, "digits")


def load_cifar10_subsets(data_dir: str | os.PathLike | None, seed: int, n_train: int, n_clean: int,
                         n_test: int, download: bool) -> DemoData:
    """Random subsets: train from CIFAR-10's training set, clean and test from its test set.

    ``rng = np.random.default_rng(seed)`` draws the training permutation first (its first
    ``n_train`` indices), then the test permutation (its first ``n_clean`` indices form the
    clean set, the next ``n_test`` the test set).
    """
    test = load_cifar10(data_dir, split="test", download=download)
    train = load_cifar10(data_dir, split="train", download=download)
    rng = np.random.default_rng(seed)
    tr = rng.permutation(len(train))[:n_train]
    te = rng.permutation(len(test))[: n_clean + n_test]
    f = to_float
    return DemoData(f(train.x[tr]), train.y[tr], f(test.x[te[:n_clean]]), test.y[te[:n_clean]],
                    f(test.x[te[n_clean:]]), test.y[te[n_clean:]], 10, "cifar10")
