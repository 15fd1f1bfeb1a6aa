"""Tests for ibau_jax.data.digits: the demo's 32×32 digits and CIFAR-10 subsets."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_digits

from ibau_jax.data import DataError
from ibau_jax.data.digits import DemoData, load_cifar10_subsets, load_digits_32

N_DIGITS = 1797  # scikit-learn's bundled 8×8 digits


@pytest.fixture(scope="module")
def digits():
    d = load_digits()
    return d.images, d.target


def _reference_image(img8: np.ndarray) -> np.ndarray:
    """Independent nearest upsampling by a loop: pixel (r, c) of every channel is img8[r // 4, c // 4] / 16."""
    out = np.empty((32, 32, 3), np.float32)
    for r in range(32):
        for c in range(32):
            out[r, c, :] = img8[r // 4, c // 4] / 16.0
    return out


def test_digits_shapes_range_and_split_sizes():
    d = load_digits_32(seed=0, n_clean=300, n_test=200)
    assert isinstance(d, DemoData) and d.name == "digits" and d.num_classes == 10
    assert d.clean_x.shape == (300, 32, 32, 3) and d.test_x.shape == (200, 32, 32, 3)
    assert d.train_x.shape == (N_DIGITS - 500, 32, 32, 3)
    assert [len(d.clean_y), len(d.test_y), len(d.train_y)] == [300, 200, N_DIGITS - 500]
    for x in (d.train_x, d.clean_x, d.test_x):
        assert x.dtype == np.float32 and x.min() == 0.0 and x.max() == 1.0
        np.testing.assert_array_equal(x * 16, np.round(x * 16))  # the 17 grey levels 0/16 .. 16/16
    for y in (d.train_y, d.clean_y, d.test_y):
        assert y.dtype == np.int32 and set(np.unique(y)) <= set(range(10))


def test_digits_is_the_seeded_permutation_of_sklearn(digits):
    images, target = digits
    d = load_digits_32(seed=3, n_clean=10, n_test=5)
    perm = np.random.default_rng(3).permutation(N_DIGITS)  # the documented split
    order = np.concatenate([perm[:10], perm[10:15], perm[15:]])
    x = np.concatenate([d.clean_x, d.test_x, d.train_x])
    y = np.concatenate([d.clean_y, d.test_y, d.train_y])
    np.testing.assert_array_equal(y, target[order])
    for i in (0, 9, 10, 14, 15, N_DIGITS - 1):  # first/last of every part
        np.testing.assert_array_equal(x[i], _reference_image(images[order[i]]))
    # Every digit is used exactly once: the three parts' labels add up to the whole set.
    np.testing.assert_array_equal(np.bincount(y, minlength=10), np.bincount(target, minlength=10))


def test_digits_deterministic_given_the_seed():
    a, b, c = (load_digits_32(s, 50, 50) for s in (7, 7, 8))
    for f in ("train_x", "train_y", "clean_x", "clean_y", "test_x", "test_y"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
    assert not np.array_equal(a.clean_y, c.clean_y) or not np.array_equal(a.clean_x, c.clean_x)


def test_digits_too_few_for_training():
    assert len(load_digits_32(0, N_DIGITS - 2, 1).train_y) == 1  # one digit left is enough
    with pytest.raises(DataError, match=r"--n-clean 1000 \+ --n-test 797 leave no digits to train on "
                                        r"\(1797 in all\); lower --n-clean or --n-test"):
        load_digits_32(0, 1000, 797)


def test_cifar10_subsets_from_npz(tmp_path):
    rng = np.random.default_rng(0)
    # Each image's pixels encode its own index, so a subset can be traced back by hand.
    def part(start, n):
        idx = np.arange(start, start + n)
        x = np.broadcast_to((idx % 256).astype(np.uint8)[:, None, None, None], (n, 32, 32, 3)).copy()
        x[:, 0, 0, 0] = idx // 256
        return x, rng.integers(0, 10, n)

    train_x, train_y = [], []
    for i in range(1, 6):
        x, y = part(20 * (i - 1), 20)
        np.savez(tmp_path / f"train_{i}.npz", x=x, y=y)
        train_x.append(x)
        train_y.append(y)
    test_x, test_y = part(0, 30)
    np.savez(tmp_path / "test.npz", x=test_x, y=test_y)
    train_x, train_y = np.concatenate(train_x), np.concatenate(train_y)

    d = load_cifar10_subsets(tmp_path, seed=5, n_train=40, n_clean=12, n_test=8, download=False)
    r = np.random.default_rng(5)
    tr = r.permutation(100)[:40]          # train subset first, then the test subset, one generator
    te = r.permutation(30)[:20]
    assert d.name == "cifar10" and d.num_classes == 10
    np.testing.assert_array_equal(d.train_x, train_x[tr] / np.float32(255))
    np.testing.assert_array_equal(d.train_y, train_y[tr])
    np.testing.assert_array_equal(d.clean_x, test_x[te[:12]] / np.float32(255))
    np.testing.assert_array_equal(d.clean_y, test_y[te[:12]])
    np.testing.assert_array_equal(d.test_x, test_x[te[12:]] / np.float32(255))
    np.testing.assert_array_equal(d.test_y, test_y[te[12:]])
    assert d.train_x.dtype == np.float32 and d.train_y.dtype == np.int32
