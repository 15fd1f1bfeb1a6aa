"""Tests for ibau_jax.data.cifar10: real shared data, a fake official archive, the cache and
download, safety against malicious pickles, bad inputs, and the optional tfds source."""
from __future__ import annotations

import hashlib
import io
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
import types
from pathlib import Path

import numpy as np
import pytest

from ibau_jax import data
from ibau_jax.data import DataError, Dataset
import ibau_jax.data.cifar10 as data_cifar10
import ibau_jax.data.download as data_download
from conftest import shared_path, shared_root

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_dir() -> Path:
    shared_path("datasets/cifar10/test.npz")  # fails under CI=true, skips elsewhere, when absent
    return shared_root()


pytestmark = pytest.mark.usefixtures("isolated_cache")


# --------------------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def cifar_test() -> Dataset:
    return data.load_cifar10(shared_dir() / "datasets" / "cifar10", split="test", download=False)


def test_real_cifar10_test(cifar_test):
    d = cifar_test
    assert d.x.shape == (10000, 32, 32, 3) and d.x.dtype == np.uint8
    assert d.y.shape == (10000,) and d.y.dtype == np.int32
    assert d.num_classes == 10 and d.name == "cifar10-test"
    assert np.array_equal(np.bincount(d.y, minlength=10), np.full(10, 1000))
    # Official test_batch starts with labels cat, ship, ship, airplane, frog.
    assert d.y[:5].tolist() == [3, 8, 8, 0, 6]


def test_real_cifar10_npz_source_forced(cifar_test):
    d = data.load_cifar10(shared_dir() / "datasets" / "cifar10", source="npz", download=False)
    assert np.array_equal(d.x, cifar_test.x) and np.array_equal(d.y, cifar_test.y)


def test_real_cifar10_train_file():
    path = shared_dir() / "datasets" / "cifar10" / "train_1.npz"
    d = data.load_npz_dataset(path, num_classes=10, name="cifar10-train1")
    assert d.x.shape == (10000, 32, 32, 3) and d.x.dtype == np.uint8
    assert d.y.dtype == np.int32 and 0 <= d.y.min() and d.y.max() <= 9
    # Official data_batch_1 starts with frog, truck, truck, deer, automobile.
    assert d.y[:5].tolist() == [6, 9, 9, 4, 1]


# --------------------------------------------------------------------------- fake archive

N_TRAIN_PER_BATCH = 4
N_TEST = 6


def _pickle_batch(x_nhwc: np.ndarray, y: np.ndarray) -> bytes:
    # Official layout: rows of 3072 bytes, channel-major (R plane, G plane, B plane).
    flat = np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2)).reshape(len(x_nhwc), 3072)
    d = {b"batch_label": b"fake", b"labels": [int(v) for v in y], b"data": flat,
         b"filenames": [b"img%d.png" % i for i in range(len(y))]}
    return pickle.dumps(d, protocol=2)


def _add_bytes(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


@pytest.fixture
def fake_cifar(tmp_path):
    """A tiny cifar-10-python.tar.gz in the official layout, plus the expected arrays."""
    rng = np.random.default_rng(0)
    expected = {}
    src = tmp_path / "src"
    (src / "cifar-10-batches-py").mkdir(parents=True)
    train_x, train_y = [], []
    for i in range(1, 6):
        x = rng.integers(0, 256, (N_TRAIN_PER_BATCH, 32, 32, 3), dtype=np.uint8)
        y = rng.integers(0, 10, N_TRAIN_PER_BATCH)
        (src / "cifar-10-batches-py" / f"data_batch_{i}").write_bytes(_pickle_batch(x, y))
        train_x.append(x)
        train_y.append(y)
    x = rng.integers(0, 256, (N_TEST, 32, 32, 3), dtype=np.uint8)
    y = rng.integers(0, 10, N_TEST)
    (src / "cifar-10-batches-py" / "test_batch").write_bytes(_pickle_batch(x, y))
    (src / "cifar-10-batches-py" / "batches.meta").write_bytes(pickle.dumps({b"num_cases_per_batch": 4}, protocol=2))
    expected["test"] = (x, y)
    expected["train"] = (np.concatenate(train_x), np.concatenate(train_y))

    archive_dir = tmp_path / "archive"
    archive_dir.mkdir()
    tar_path = archive_dir / data.CIFAR10_TAR_NAME
    with tarfile.open(tar_path, "w:gz") as tar:
        tar.add(src / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    return {"tar": tar_path, "extracted_parent": src, "expected": expected,
            "md5": hashlib.md5(tar_path.read_bytes()).hexdigest()}


def _check(ds: Dataset, expected, split: str) -> None:
    x, y = expected[split]
    assert ds.x.dtype == np.uint8 and ds.x.shape == x.shape
    assert ds.y.dtype == np.int32
    assert np.array_equal(ds.x, x)  # exact pixels, NHWC
    assert np.array_equal(ds.y, y)
    assert ds.name == f"cifar10-{split}"


@pytest.mark.parametrize("split", ["test", "train"])
@pytest.mark.parametrize("form", ["file", "dir", "extracted_parent", "extracted_dir"])
def test_fake_archive_decodes_exact_pixels(fake_cifar, split, form):
    path = {
        "file": fake_cifar["tar"],
        "dir": fake_cifar["tar"].parent,
        "extracted_parent": fake_cifar["extracted_parent"],
        "extracted_dir": fake_cifar["extracted_parent"] / "cifar-10-batches-py",
    }[form]
    ds = data.load_cifar10(path, split=split, download=False)
    _check(ds, fake_cifar["expected"], split)


def test_channel_major_decoding_by_hand(fake_cifar):
    # Independent check of the layout: pixel (r, c) of channel ch is byte ch*1024 + r*32 + c.
    ds = data.load_cifar10(fake_cifar["tar"], download=False)
    x, _ = fake_cifar["expected"]["test"]
    flat = np.ascontiguousarray(x.transpose(0, 3, 1, 2)).reshape(len(x), 3072)
    assert ds.x[2, 5, 7, 1] == flat[2, 1 * 1024 + 5 * 32 + 7]


def test_tar_source_skips_npz(fake_cifar, tmp_path):
    d = fake_cifar["tar"].parent
    # A bogus test.npz would be preferred by 'auto'; source='tar' must ignore it.
    (d / "test.npz").write_bytes(b"not a zip")
    _check(data.load_cifar10(d, source="tar", download=False), fake_cifar["expected"], "test")
    with pytest.raises(DataError, match=r"test\.npz.*corrupt"):
        data.load_cifar10(d, source="auto", download=False)


# --------------------------------------------------------------------------- cache and download


def test_cached_archive_checksum_mismatch(fake_cifar, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    shutil.copy(fake_cifar["tar"], cache / data.CIFAR10_TAR_NAME)
    # The real md5 is expected; the fake archive does not match it.
    with pytest.raises(DataError, match="checksum mismatch.*delete it and retry"):
        data.load_cifar10(None, cache_dir=cache, download=False)


def test_download_lands_atomically_in_cache(fake_cifar, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    calls = []

    def fake_fetch(url, dst):
        calls.append((url, Path(dst)))
        # Written to a temp file beside the destination, never the destination itself.
        assert Path(dst).parent == cache and Path(dst).name != data.CIFAR10_TAR_NAME
        assert not (cache / data.CIFAR10_TAR_NAME).exists()
        shutil.copy(fake_cifar["tar"], dst)

    monkeypatch.setattr(data_download, "_fetch_url", fake_fetch)
    monkeypatch.setattr(data_cifar10, "CIFAR10_MD5", fake_cifar["md5"])
    ds = data.load_cifar10(None, split="test", cache_dir=cache, download=True)
    _check(ds, fake_cifar["expected"], "test")
    assert [c[0] for c in calls] == [data.CIFAR10_URL]
    assert sorted(p.name for p in cache.iterdir()) == [data.CIFAR10_TAR_NAME]  # no temp left
    # Second call uses the cache, no download.
    _check(data.load_cifar10(None, split="train", cache_dir=cache), fake_cifar["expected"], "train")
    assert len(calls) == 1


def test_explicit_empty_dir_never_falls_back_to_the_cache_or_network(fake_cifar, tmp_path, monkeypatch):
    """An explicit --data-dir is never replaced by a download (nor by a cached archive): the
    error says what the folder lacks and how to download instead."""
    cache = tmp_path / "envcache"
    monkeypatch.setenv("IBAU_CACHE", str(cache))
    calls = []
    monkeypatch.setattr(data_download, "_fetch_url", lambda url, dst: calls.append(url))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError) as e:
        data.load_cifar10(empty, download=True)
    assert calls == [] and not cache.exists()
    msg = str(e.value)
    assert str(empty / "test.npz") in msg and "leave out --data-dir" in msg and str(cache) in msg
    cache.mkdir()
    shutil.copy(fake_cifar["tar"], cache / data.CIFAR10_TAR_NAME)  # a cached archive is not used either
    with pytest.raises(DataError, match="CIFAR-10 test data not found"):
        data.load_cifar10(empty, download=True)


def test_download_checksum_mismatch_leaves_nothing(fake_cifar, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setattr(data_download, "_fetch_url", lambda url, dst: shutil.copy(fake_cifar["tar"], dst))
    with pytest.raises(DataError, match="checksum mismatch.*retry"):
        data.load_cifar10(None, cache_dir=cache, download=True)
    assert list(cache.iterdir()) == []


def test_interrupted_download_leaves_nothing(tmp_path, monkeypatch):
    cache = tmp_path / "cache"

    def broken_fetch(url, dst):
        Path(dst).write_bytes(b"partial")
        raise OSError("connection reset")

    monkeypatch.setattr(data_download, "_fetch_url", broken_fetch)
    with pytest.raises(DataError, match="could not download.*connection reset"):
        data.load_cifar10(None, cache_dir=cache, download=True)
    assert list(cache.iterdir()) == []


# --------------------------------------------------------------------------- malicious pickle


class _Evil:
    def __init__(self, cmd: str):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({b"data": _Evil(f"touch {marker}"), b"labels": [0]}, protocol=2)
    assert b"system" in payload  # really a GLOBAL to os.system (posix.system)
    tar_path = tmp_path / data.CIFAR10_TAR_NAME
    with tarfile.open(tar_path, "w:gz") as tar:
        _add_bytes(tar, "cifar-10-batches-py/test_batch", payload)
    with pytest.raises(DataError, match=r"refusing to load global .*system"):
        data.load_cifar10(tar_path, split="test", download=False)
    assert not marker.exists()

    # Same through the extracted layout.
    ext = tmp_path / "x" / "cifar-10-batches-py"
    ext.mkdir(parents=True)
    (ext / "test_batch").write_bytes(payload)
    with pytest.raises(DataError, match="refusing to load global"):
        data.load_cifar10(ext.parent, split="test", download=False)
    assert not marker.exists()


# --------------------------------------------------------------------------- bad inputs


def test_missing_directory(tmp_path):
    with pytest.raises(DataError, match=r"does not exist.*--data-dir"):
        data.load_cifar10(tmp_path / "nope", download=False)


def test_missing_files_without_download(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    with pytest.raises(DataError) as e:
        data.load_cifar10(d, download=False, cache_dir=tmp_path / "cache")
    msg = str(e.value)
    assert str(d / "test.npz") in msg and str(d / data.CIFAR10_TAR_NAME) in msg
    assert "--data-dir" in msg and "download" in msg
    with pytest.raises(DataError, match=r"train_1\.npz.*train_5\.npz"):
        data.load_cifar10(d, split="train", source="npz", download=False)
    with pytest.raises(DataError, match="not found at .*download=False"):
        data.load_cifar10(None, download=False, cache_dir=tmp_path / "cache")


def test_incomplete_npz_layout(tmp_path):
    np.savez(tmp_path / "train_1.npz", x=np.zeros((2, 32, 32, 3), np.uint8), y=np.zeros(2, np.int64))
    with pytest.raises(DataError, match=r"incomplete .*train_2\.npz"):
        data.load_cifar10(tmp_path, split="train", download=False)


def test_corrupt_npz(tmp_path):
    (tmp_path / "test.npz").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(DataError, match=r"test\.npz: corrupt or unreadable npz"):
        data.load_cifar10(tmp_path, download=False)


def test_npz_missing_key(tmp_path):
    np.savez(tmp_path / "test.npz", images=np.zeros((2, 32, 32, 3), np.uint8))
    with pytest.raises(DataError, match=r"missing array\(s\) \['x', 'y'\]"):
        data.load_cifar10(tmp_path, download=False)


def test_npz_wrong_image_shape(tmp_path):
    np.savez(tmp_path / "test.npz", x=np.zeros((2, 28, 28, 3), np.uint8), y=np.zeros(2, np.int64))
    with pytest.raises(DataError, match=r"test\.npz: .*shape \(N, 32, 32, 3\).*\(2, 28, 28, 3\)"):
        data.load_cifar10(tmp_path, download=False)


def test_corrupt_tar(tmp_path):
    p = tmp_path / data.CIFAR10_TAR_NAME
    p.write_bytes(b"\x1f\x8b" + b"\x00" * 100)
    with pytest.raises(DataError, match=r"cifar-10-python\.tar\.gz"):
        data.load_cifar10(p, download=False)


def test_truncated_tar(fake_cifar, tmp_path):
    raw = fake_cifar["tar"].read_bytes()
    p = tmp_path / data.CIFAR10_TAR_NAME
    p.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match=r"cifar-10-python\.tar\.gz.*(corrupt|unreadable)"):
        data.load_cifar10(p, split="test", download=False)


def test_tar_missing_member(tmp_path):
    p = tmp_path / data.CIFAR10_TAR_NAME
    with tarfile.open(p, "w:gz") as tar:
        _add_bytes(tar, "cifar-10-batches-py/data_batch_1", b"")
    with pytest.raises(DataError, match=r"member cifar-10-batches-py/test_batch is missing"):
        data.load_cifar10(p, split="test", download=False)


def test_bad_arguments(tmp_path):
    with pytest.raises(DataError, match="split must be"):
        data.load_cifar10(tmp_path, split="val")
    with pytest.raises(DataError, match="source must be"):
        data.load_cifar10(tmp_path, source="hdf5")


# --------------------------------------------------------------------------- tfds


def test_tfds_missing(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import now raises ImportError
    with pytest.raises(DataError) as e:
        data.load_cifar10(tmp_path, source="tfds")
    assert str(e.value) == ("--data-source tfds needs tensorflow-datasets and tensorflow: "
                            "pip install 'ibau-jax[tfds]'")


def _fake_tfds(monkeypatch, arrays=None, error=None):
    calls = []
    mod = types.ModuleType("tensorflow_datasets")

    def load(name, **kwargs):
        calls.append((name, kwargs))
        if error is not None:
            raise error
        return {"tensors": arrays}

    mod.load = load
    mod.as_numpy = lambda t: t["tensors"]
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", mod)
    return calls


def _shuffled_cifar(n=6, split="test"):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    y = rng.integers(0, 10, n).astype(np.int64)
    perm = rng.permutation(n)  # tfds stores examples shuffled; ids give the official index
    ids = np.array([f"{split}_{i:05d}".encode() for i in perm], dtype=object)
    return x, y, perm, {"image": x[perm], "label": y[perm], "id": ids}


def test_tfds_success_restores_official_order(monkeypatch, tmp_path):
    x, y, _, arrays = _shuffled_cifar(split="train")
    calls = _fake_tfds(monkeypatch, arrays)
    d = data.load_cifar10(tmp_path, split="train", source="tfds", download=False)
    assert calls == [("cifar10", {"split": "train", "batch_size": -1, "data_dir": str(tmp_path),
                                  "download": False})]
    assert d.name == "cifar10-train" and d.y.dtype == np.int32 and d.x.dtype == np.uint8
    assert np.array_equal(d.x, x) and np.array_equal(d.y, y)


def test_tfds_without_ids_warns(monkeypatch):
    _, _, perm, arrays = _shuffled_cifar()
    del arrays["id"]
    calls = _fake_tfds(monkeypatch, arrays)
    with pytest.warns(UserWarning, match="official CIFAR-10 order cannot be restored"):
        d = data.load_cifar10(None, source="tfds")
    assert calls[0][1]["data_dir"] is None and calls[0][1]["split"] == "test"
    assert np.array_equal(d.x, arrays["image"])


def test_tfds_bad_results(monkeypatch):
    _, _, _, arrays = _shuffled_cifar()
    arrays["id"] = arrays["id"].copy()
    arrays["id"][0] = b"train_00000"
    _fake_tfds(monkeypatch, arrays)
    with pytest.raises(DataError, match=r"unexpected example id 'train_00000'"):
        data.load_cifar10(None, source="tfds")
    arrays["id"][0] = b"test_00099"
    with pytest.raises(DataError, match="not a permutation"):
        data.load_cifar10(None, source="tfds")
    _fake_tfds(monkeypatch, {"image": np.zeros((2, 32, 32, 3), np.uint8), "label": np.array([0, 10])})
    with pytest.warns(UserWarning), pytest.raises(DataError, match=r"labels out of range \[0, 10\)"):
        data.load_cifar10(None, source="tfds")
    _fake_tfds(monkeypatch, error=RuntimeError("no network"))
    with pytest.raises(DataError, match=r"could not load it \(RuntimeError: no network\)"):
        data.load_cifar10(None, source="tfds")


def test_core_does_not_import_tensorflow():
    code = ("import sys, ibau_jax.data, ibau_jax.cli; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'tensorflow_datasets')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO_ROOT)
