"""Tests for ibau_jax.data.dataset: the Dataset container, to_float, the I-BAU split, npz files."""
from __future__ import annotations

import numpy as np
import pytest

from ibau_jax import data
from ibau_jax.data import DataError, Dataset
from ibau_jax.errors import UserError
from conftest import CIFAR_DIR, shared_path


def test_real_ibau_split():
    cifar_test = data.load_cifar10(shared_path(CIFAR_DIR), split="test", download=False)
    clean, acc = data.ibau_split(cifar_test)
    assert len(clean) == 5000 and len(acc) == 5000
    assert np.array_equal(clean.x, cifar_test.x[:5000]) and np.array_equal(clean.y, cifar_test.y[:5000])
    assert np.array_equal(acc.x, cifar_test.x[5000:]) and np.array_equal(acc.y, cifar_test.y[5000:])
    assert clean.name == "cifar10-test-clean" and acc.name == "cifar10-test-acc"
    xb = data.batches(clean.x, 100)
    assert xb.shape == (50, 100, 32, 32, 3)
    assert np.array_equal(xb[1, 0], cifar_test.x[100])


def test_data_error_is_a_user_error():
    # The CLI prints UserErrors as one line (exit 2); ValueError stays for older callers.
    assert issubclass(DataError, UserError) and issubclass(DataError, ValueError)


def test_to_float():
    x = np.array([[0, 51, 255]], dtype=np.uint8)
    f = data.to_float(x)
    assert f.dtype == np.float32
    np.testing.assert_allclose(f, [[0.0, 0.2, 1.0]])
    with pytest.raises(DataError, match="expects uint8"):
        data.to_float(f)


def test_batches_and_split_errors():
    x = np.arange(10)
    assert data.batches(x, 5).shape == (2, 5)
    with pytest.raises(DataError, match=r"batch size 3 does not divide N = 10.*choose a batch size"):
        data.batches(x, 3)
    with pytest.raises(DataError, match="positive integer"):
        data.batches(x, 0)
    ds = Dataset(np.zeros((4, 32, 32, 3), np.uint8), np.zeros(4, np.int32), 10, "tiny")
    with pytest.raises(DataError, match=r"0 < n_clean < 4"):
        data.ibau_split(ds, n_clean=4)
    clean, acc = data.ibau_split(ds, n_clean=1)
    assert len(clean) == 1 and len(acc) == 3


def test_dataset_validation():
    x = np.zeros((3, 32, 32, 3), np.uint8)
    y = np.zeros(3, np.int32)
    with pytest.raises(DataError, match=r"shape \(N, 32, 32, 3\)"):
        Dataset(np.zeros((3, 28, 28, 3), np.uint8), y, 10, "t")
    with pytest.raises(DataError, match="must be uint8"):
        Dataset(x.astype(np.float32), y, 10, "t")
    with pytest.raises(DataError, match="must be int32"):
        Dataset(x, y.astype(np.int64), 10, "t")
    with pytest.raises(DataError, match="3 images but 2 labels"):
        Dataset(x, y[:2], 10, "t")
    with pytest.raises(DataError, match=r"out of range \[0, 10\)"):
        Dataset(x, np.array([0, 10, 1], np.int32), 10, "t")
    with pytest.raises(DataError, match=r"out of range"):
        Dataset(x, np.array([0, -1, 1], np.int32), 10, "t")


# --------------------------------------------------------------------------- npz


def test_npz_labels_out_of_range(tmp_path):
    p = tmp_path / "g.npz"
    np.savez(p, x=np.zeros((2, 32, 32, 3), np.uint8), y=np.array([0, 43], np.int64))
    with pytest.raises(DataError, match=r"g\.npz: labels out of range \[0, 43\): min 0, max 43"):
        data.load_npz_dataset(p, 43, "gtsrb")
    # A huge int64 must not wrap into range through the int32 cast.
    np.savez(p, x=np.zeros((1, 32, 32, 3), np.uint8), y=np.array([2**32], np.int64))
    with pytest.raises(DataError, match="out of range"):
        data.load_npz_dataset(p, 43, "gtsrb")


def test_npz_object_array_refused(tmp_path):
    p = tmp_path / "o.npz"
    np.savez(p, x=np.array([object()], dtype=object), y=np.zeros(1, np.int64))
    with pytest.raises(DataError, match=r"o\.npz: corrupt or unreadable"):
        data.load_npz_dataset(p, 10, "o")
