"""Tests for ibau_jax.data: real shared data, a fake official archive, safety, bad inputs."""
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
from PIL import Image

from ibau_jax import data
from ibau_jax.data import DataError, Dataset
from conftest import shared_path, shared_root

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_dir() -> Path:
    shared_path("datasets/cifar10/test.npz")  # fails under CI=true, skips elsewhere, when absent
    return shared_root()


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    # Never touch ~/.cache or the network from tests.
    monkeypatch.setenv("IBAU_CACHE", str(tmp_path / "default-cache"))

    def no_network(url, dst):
        raise AssertionError(f"test tried to download {url}")

    monkeypatch.setattr(data, "_fetch_url", no_network)


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


def test_real_ibau_split(cifar_test):
    clean, acc = data.ibau_split(cifar_test)
    assert len(clean) == 5000 and len(acc) == 5000
    assert np.array_equal(clean.x, cifar_test.x[:5000]) and np.array_equal(clean.y, cifar_test.y[:5000])
    assert np.array_equal(acc.x, cifar_test.x[5000:]) and np.array_equal(acc.y, cifar_test.y[5000:])
    assert clean.name == "cifar10-test-clean" and acc.name == "cifar10-test-acc"
    xb = data.batches(clean.x, 100)
    assert xb.shape == (50, 100, 32, 32, 3)
    assert np.array_equal(xb[1, 0], cifar_test.x[100])


def test_real_gtsrb():
    g = data.load_gtsrb(shared_dir() / "datasets" / "gtsrb")
    assert g.x.shape == (12630, 32, 32, 3) and g.x.dtype == np.uint8
    assert g.num_classes == 43 and g.y.dtype == np.int32 and g.y.max() == 42


# --------------------------------------------------------------------------- helpers


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


def test_default_shared_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("IBAU_SHARED", str(tmp_path))
    assert data.default_shared_dir() == tmp_path
    monkeypatch.delenv("IBAU_SHARED")
    monkeypatch.chdir(tmp_path)
    assert data.default_shared_dir() == tmp_path.parent / "shared"


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


def test_verify_md5(tmp_path):
    p = tmp_path / "f.bin"
    p.write_bytes(b"hello")
    data.verify_md5(p, hashlib.md5(b"hello").hexdigest())
    with pytest.raises(DataError, match=r"checksum mismatch for .*f\.bin.*delete it and retry"):
        data.verify_md5(p, data.CIFAR10_MD5)


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

    monkeypatch.setattr(data, "_fetch_url", fake_fetch)
    monkeypatch.setattr(data, "CIFAR10_MD5", fake_cifar["md5"])
    ds = data.load_cifar10(None, split="test", cache_dir=cache, download=True)
    _check(ds, fake_cifar["expected"], "test")
    assert [c[0] for c in calls] == [data.CIFAR10_URL]
    assert sorted(p.name for p in cache.iterdir()) == [data.CIFAR10_TAR_NAME]  # no temp left
    # Second call uses the cache, no download.
    _check(data.load_cifar10(None, split="train", cache_dir=cache), fake_cifar["expected"], "train")
    assert len(calls) == 1


def test_download_into_default_cache_when_dir_empty(fake_cifar, tmp_path, monkeypatch):
    cache = tmp_path / "envcache"
    monkeypatch.setenv("IBAU_CACHE", str(cache))
    monkeypatch.setattr(data, "_fetch_url", lambda url, dst: shutil.copy(fake_cifar["tar"], dst))
    monkeypatch.setattr(data, "CIFAR10_MD5", fake_cifar["md5"])
    empty = tmp_path / "empty"
    empty.mkdir()
    _check(data.load_cifar10(empty, download=True), fake_cifar["expected"], "test")
    assert (cache / data.CIFAR10_TAR_NAME).is_file()


def test_download_checksum_mismatch_leaves_nothing(fake_cifar, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setattr(data, "_fetch_url", lambda url, dst: shutil.copy(fake_cifar["tar"], dst))
    with pytest.raises(DataError, match="checksum mismatch.*retry"):
        data.load_cifar10(None, cache_dir=cache, download=True)
    assert list(cache.iterdir()) == []


def test_interrupted_download_leaves_nothing(tmp_path, monkeypatch):
    cache = tmp_path / "cache"

    def broken_fetch(url, dst):
        Path(dst).write_bytes(b"partial")
        raise OSError("connection reset")

    monkeypatch.setattr(data, "_fetch_url", broken_fetch)
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


def test_gtsrb_missing(tmp_path):
    with pytest.raises(DataError, match=r"expected .*test_roi32\.npz"):
        data.load_gtsrb(tmp_path)


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


# --------------------------------------------------------------------------- GTSRB archive

def _gtsrb_image(w: int, h: int, seed: int) -> np.ndarray:
    """Random pixels: any off-by-one in the crop or a different filter changes the result."""
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _expected_roi32(img: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    x1, y1, x2, y2 = box
    roi = Image.fromarray(img).crop((x1, y1, x2 + 1, y2 + 1))
    return np.asarray(roi.resize((32, 32), Image.Resampling.BILINEAR))


_HEADER = "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"


def _write_gtsrb_rows(images_dir: Path, csv_path: Path, rows: list[tuple[str, int, int, tuple, int]],
                      seed: int) -> list[np.ndarray]:
    """Write .ppm images and their csv; return the expected 32×32 crops in csv order."""
    images_dir.mkdir(parents=True, exist_ok=True)
    lines, expected = [_HEADER], []
    for i, (name, w, h, box, cls) in enumerate(rows):
        img = _gtsrb_image(w, h, seed + i)
        Image.fromarray(img).save(images_dir / name)
        lines.append(f"{name};{w};{h};{box[0]};{box[1]};{box[2]};{box[3]};{cls}")
        expected.append(_expected_roi32(img, box))
    csv_path.write_text("\r\n".join(lines) + "\r\n")  # the official files use CRLF
    return expected


_TRAIN_CLASSES = {  # class id -> rows (file name, width, height, inclusive ROI box)
    0: [("00000_00000.ppm", 40, 37, (5, 6, 34, 30)), ("00000_00001.ppm", 31, 33, (0, 0, 30, 32))],
    2: [("00000_00000.ppm", 45, 41, (3, 4, 40, 38))],
    42: [("00001_00000.ppm", 29, 35, (2, 5, 25, 30)), ("00001_00001.ppm", 52, 48, (7, 3, 47, 44))],
}
_TEST_ROWS = [  # csv order deliberately not the file-name order
    ("00002.ppm", 40, 37, (5, 6, 34, 30), 16),
    ("00000.ppm", 53, 54, (6, 5, 48, 49), 1),
    ("00001.ppm", 42, 45, (5, 5, 36, 40), 42),
]


@pytest.fixture
def gtsrb_archive(tmp_path):
    root = tmp_path / "gtsrb"
    train_expected, train_labels = [], []
    for cls, rows in _TRAIN_CLASSES.items():
        cdir = root / "Final_Training" / "Images" / f"{cls:05d}"
        train_expected += _write_gtsrb_rows(cdir, cdir / f"GT-{cls:05d}.csv",
                                            [(n, w, h, b, cls) for n, w, h, b in rows], seed=100 * cls)
        train_labels += [cls] * len(rows)
    test_dir = root / "Final_Test" / "Images"
    test_expected = _write_gtsrb_rows(test_dir, test_dir / "GT-final_test.csv", _TEST_ROWS, seed=7)
    return {"root": root, "train_x": np.stack(train_expected), "train_y": train_labels,
            "test_x": np.stack(test_expected), "test_y": [r[4] for r in _TEST_ROWS]}


def test_gtsrb_archive_train(gtsrb_archive):
    with pytest.warns(UserWarning, match="only 3 of 43 class folders"):
        g = data.load_gtsrb(gtsrb_archive["root"], split="train")
    assert g.name == "gtsrb-train" and g.num_classes == 43
    assert g.x.shape == (5, 32, 32, 3) and g.x.dtype == np.uint8 and g.y.dtype == np.int32
    assert g.y.tolist() == gtsrb_archive["train_y"] == [0, 0, 2, 42, 42]
    assert np.array_equal(g.x, gtsrb_archive["train_x"])


def test_gtsrb_archive_test_order_and_crop(gtsrb_archive):
    g = data.load_gtsrb(gtsrb_archive["root"])  # split='test' is the default
    assert g.name == "gtsrb-test" and g.x.shape == (3, 32, 32, 3)
    assert g.y.tolist() == [16, 1, 42]  # csv order, not file-name order
    assert np.array_equal(g.x, gtsrb_archive["test_x"])


def test_gtsrb_roi_is_inclusive(tmp_path):
    """Independent of PIL: solid ROI colours show which pixels the crop keeps."""
    w, h, (x1, y1, x2, y2) = 40, 37, (5, 6, 34, 30)
    img = np.zeros((h, w, 3), np.uint8)
    img[:, :] = (0, 255, 0)                          # outside the box: green
    img[y1:y2 + 1, x1:x2 + 1] = (255, 0, 0)          # the inclusive box: red ...
    img[y1:y2 + 1, x2] = (0, 0, 255)                 # ... with its last column (X2) blue
    images = tmp_path / "Final_Test" / "Images"
    images.mkdir(parents=True)
    Image.fromarray(img).save(images / "00000.ppm")
    (images / "GT-final_test.csv").write_text(f"{_HEADER}\n00000.ppm;{w};{h};{x1};{y1};{x2};{y2};3\n")
    x = data.load_gtsrb(tmp_path).x[0].astype(int)
    assert (x[..., 1] == 0).all()                    # no green: nothing outside the box
    assert (x[:, 0] == (255, 0, 0)).all()            # left edge: pure red
    assert x[:, -1, 2].min() > 100                   # right edge: column X2 (blue) was kept
    assert x.shape == (32, 32, 3)


def test_gtsrb_gtsrb_subfolder_and_csv_in_root(gtsrb_archive, tmp_path):
    # As the official zips unpack: DIR/GTSRB/Final_Test/Images/*.ppm and DIR/GT-final_test.csv.
    d = tmp_path / "unzipped"
    shutil.copytree(gtsrb_archive["root"] / "Final_Test", d / "GTSRB" / "Final_Test")
    (d / "GTSRB" / "Final_Test" / "Images" / "GT-final_test.csv").rename(d / "GT-final_test.csv")
    g = data.load_gtsrb(d)
    assert np.array_equal(g.x, gtsrb_archive["test_x"]) and g.y.tolist() == [16, 1, 42]


def test_gtsrb_npz_preferred_over_archive(gtsrb_archive):
    root = gtsrb_archive["root"]
    x = np.full((2, 32, 32, 3), 7, np.uint8)
    np.savez(root / "test_roi32.npz", x=x, y=np.array([4, 5]))
    np.savez(root / "train_roi32.npz", x=x[:1], y=np.array([6]))
    assert data.load_gtsrb(root).y.tolist() == [4, 5]
    t = data.load_gtsrb(root, split="train")
    assert t.y.tolist() == [6] and t.name == "gtsrb-train"


def test_real_gtsrb_npz_matches_official_csv():
    npz = shared_path("datasets/gtsrb/test_roi32.npz")
    csv_path = shared_path("datasets/gtsrb/GT-final_test.csv")
    g = data.load_gtsrb(npz.parent, split="test")
    rows = data._read_gtsrb_csv(csv_path, npz.parent)  # the real annotation file parses cleanly
    assert len(rows) == len(g) == 12630
    assert [r.label for r in rows] == g.y.tolist()
    assert rows[0].path.name == "00000.ppm" and rows[0].box == (6, 5, 48, 49) and rows[0].label == 16


def test_gtsrb_progress_bar(gtsrb_archive, monkeypatch, capsys):
    data.load_gtsrb(gtsrb_archive["root"])
    assert "reading GTSRB" not in capsys.readouterr().err  # 3 files < 200: no bar
    monkeypatch.setattr(data, "_PROGRESS_MIN_FILES", 1)
    data.load_gtsrb(gtsrb_archive["root"])
    assert "reading GTSRB test" in capsys.readouterr().err


def _test_csv(root: Path) -> Path:
    return root / "Final_Test" / "Images" / "GT-final_test.csv"


@pytest.mark.parametrize("edit, pattern", [
    (lambda t: t.replace("ClassId", "Class"), r"GT-final_test\.csv, line 1: missing column\(s\) \['ClassId'\]"),
    (lambda t: t.replace("00000.ppm;53;54;6;", "00000.ppm;53;5x4;6;"),
     r"GT-final_test\.csv, line 3: Height must be an integer, got '5x4'"),
    (lambda t: t.replace("00001.ppm;42;45;5;5;36;40;42", "00001.ppm;42;45"),
     r"GT-final_test\.csv, line 4: expected 8 ';'-separated fields, got 3"),
    (lambda t: t.replace(";36;40;42", ";36;40;43"), r"GT-final_test\.csv, line 4: ClassId 43 is outside 0\.\.42"),
    (lambda t: t.replace(";36;40;42", ";36;40;-1"), r"line 4: ClassId -1 is outside 0\.\.42"),
    (lambda t: t.replace("5;5;36;40", "5;5;42;40"), r"line 4: ROI box \(5, 5\)-\(42, 40\) \(inclusive\) is outside the 42x45 image"),
    (lambda t: t.replace("5;6;34;30", "34;6;5;30"), r"line 2: ROI box .* is outside"),
    (lambda t: t.replace("00002.ppm", "missing.ppm"), r"line 2: image file .*missing\.ppm not found"),
    (lambda t: t.replace("00002.ppm", "../00002.ppm"), r"line 2: Filename must be a plain file name"),
    (lambda t: t.replace("00000.ppm;53;54", "00000.ppm;54;54"), r"line 3: .*00000\.ppm is 53x54 but the csv says 54x54"),
    (lambda t: t.splitlines()[0], r"GT-final_test\.csv: no images listed"),
    (lambda t: "", r"GT-final_test\.csv: empty file"),
])
def test_gtsrb_bad_csv(gtsrb_archive, edit, pattern):
    p = _test_csv(gtsrb_archive["root"])
    p.write_text(edit(p.read_text()))
    with pytest.raises(DataError, match=pattern):
        data.load_gtsrb(gtsrb_archive["root"])


def test_gtsrb_corrupt_image(gtsrb_archive):
    (gtsrb_archive["root"] / "Final_Test" / "Images" / "00000.ppm").write_bytes(b"P6\n53 54\n255\n\x00\x01")
    with pytest.raises(DataError, match=r"GT-final_test\.csv, line 3: cannot read image .*00000\.ppm"):
        data.load_gtsrb(gtsrb_archive["root"])


def test_gtsrb_train_errors(gtsrb_archive):
    images = gtsrb_archive["root"] / "Final_Training" / "Images"
    p = images / "00002" / "GT-00002.csv"
    p.write_text(p.read_text().replace(";38;2", ";38;5"))
    with pytest.raises(DataError, match=r"GT-00002\.csv, line 2: ClassId 5 does not match the folder 00002"):
        data.load_gtsrb(gtsrb_archive["root"], split="train")
    p.unlink()
    with pytest.raises(DataError, match=r"GT-00002\.csv not found.*GTSRB_Final_Training_Images\.zip"):
        data.load_gtsrb(gtsrb_archive["root"], split="train")
    shutil.rmtree(images / "00002")
    (images / "00043").mkdir()
    with pytest.raises(DataError, match=r"00043: class folder outside 00000\.\.00042"):
        data.load_gtsrb(gtsrb_archive["root"], split="train")


def test_gtsrb_test_images_without_gt_csv(gtsrb_archive):
    _test_csv(gtsrb_archive["root"]).unlink()
    with pytest.raises(DataError, match=r"no GT-final_test\.csv .*GTSRB_Final_Test_GT\.zip"):
        data.load_gtsrb(gtsrb_archive["root"])


def test_gtsrb_nothing_there(tmp_path):
    with pytest.raises(DataError) as e:
        data.load_gtsrb(tmp_path, split="train")
    msg = str(e.value)
    for part in ("train_roi32.npz", "Final_Training/Images/000NN/*.ppm", "GT-000NN.csv",
                 "https://benchmark.ini.rub.de/gtsrb_dataset.html", "GTSRB_Final_Training_Images.zip",
                 "GTSRB_Final_Test_Images.zip", "GTSRB_Final_Test_GT.zip", f"extract them into {tmp_path}"):
        assert part in msg, part
    with pytest.raises(DataError, match=r"test_roi32\.npz.*Final_Test/Images/\*\.ppm.*GT-final_test\.csv"):
        data.load_gtsrb(tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        data.load_gtsrb(tmp_path / "nope")
    with pytest.raises(DataError, match="split must be"):
        data.load_gtsrb(tmp_path, split="val")


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
