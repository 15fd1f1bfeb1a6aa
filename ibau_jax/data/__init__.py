"""Datasets for ibau-jax: CIFAR-10 and GTSRB as uint8 NHWC numpy arrays.

Images stay ``uint8`` (N, 32, 32, 3), RGB, NHWC on the host; convert a batch with
:func:`to_float` (float32 in [0, 1], no normalization, as in the original I-BAU code)
right before it goes to the model. Labels are ``int32`` (N,).

CIFAR-10 can be read from

* the npz layout (``test.npz``, ``train_1.npz`` .. ``train_5.npz``, each with ``x`` uint8
  N×32×32×3 and ``y`` integer labels), or
* the official ``cifar-10-python.tar.gz`` (the file itself, a directory holding it, or a
  directory holding the extracted ``cifar-10-batches-py/``), optionally downloaded into a
  cache directory and checked against its published md5, or
* tensorflow-datasets (``source='tfds'``, optional extra ``ibau-jax[tfds]``; imported
  lazily, so the core never imports tensorflow).

GTSRB can be read from ``test_roi32.npz`` / ``train_roi32.npz`` or from the official
archives (``Final_Training/Images/000NN/*.ppm``, ``Final_Test/Images/*.ppm`` with their
``GT-*.csv`` annotations), each image cropped to its sign's ROI and resized to 32×32.

The official batches are Python pickles. They are read with a restricted unpickler that
only resolves the few globals a numpy array needs, so a tampered archive cannot run code.

User-facing code always takes explicit paths; :func:`default_shared_dir` exists only so
tests and benchmarks can find the project's shared data folder.
"""
from __future__ import annotations

import csv
import hashlib
import os
import pickle
import tarfile
import tempfile
import urllib.error
import urllib.request
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal

import numpy as np

__all__ = [
    "DataError",
    "Dataset",
    "to_float",
    "load_cifar10",
    "load_npz_dataset",
    "load_gtsrb",
    "ibau_split",
    "batches",
    "default_shared_dir",
    "default_cache_dir",
    "download_file",
    "verify_md5",
    "md5sum",
    "CIFAR10_URL",
    "CIFAR10_MD5",
    "CIFAR10_TAR_NAME",
    "CIFAR10_CLASSES",
]

IMAGE_SHAPE: tuple[int, int, int] = (32, 32, 3)

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_TAR_NAME = "cifar-10-python.tar.gz"
CIFAR10_EXTRACTED_DIR = "cifar-10-batches-py"
CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)
_CIFAR10_BATCHES = {
    "train": tuple(f"data_batch_{i}" for i in range(1, 6)),
    "test": ("test_batch",),
}
_CIFAR10_NPZ = {
    "train": tuple(f"train_{i}.npz" for i in range(1, 6)),
    "test": ("test.npz",),
}

GTSRB_NUM_CLASSES = 43
GTSRB_TEST_NPZ = "test_roi32.npz"
GTSRB_TRAIN_NPZ = "train_roi32.npz"
GTSRB_URL = "https://benchmark.ini.rub.de/gtsrb_dataset.html"
GTSRB_TEST_CSV = "GT-final_test.csv"
_GTSRB_COLUMNS = ("Filename", "Width", "Height", "Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2", "ClassId")
_PROGRESS_MIN_FILES = 200  # no progress bar below this many image files

Split = Literal["test", "train"]
Source = Literal["auto", "npz", "tar", "tfds"]
DATA_SOURCES: tuple[str, ...] = ("auto", "npz", "tar", "tfds")
TFDS_MISSING_MESSAGE = ("--data-source tfds needs tensorflow-datasets and tensorflow: "
                        "pip install 'ibau-jax[tfds]'")


class DataError(ValueError):
    """Missing, corrupt or malformed data. The message names the problem and the fix."""


# --------------------------------------------------------------------------- dataset


@dataclass(frozen=True, eq=False)  # eq=False: element-wise array comparison makes no sense here
class Dataset:
    """An image classification dataset held on the host.

    Attributes:
        x: uint8 array (N, 32, 32, 3), RGB, NHWC.
        y: int32 array (N,), class ids in [0, num_classes).
        num_classes: number of classes (10 for CIFAR-10, 43 for GTSRB).
        name: a label used in logs and error messages, e.g. ``"cifar10-test"``.

    The arrays are not copied; slices made by :func:`ibau_split` are views.
    """

    x: np.ndarray
    y: np.ndarray
    num_classes: int
    name: str

    def __post_init__(self) -> None:
        x, y, name = self.x, self.y, self.name
        if not isinstance(x, np.ndarray) or not isinstance(y, np.ndarray):
            raise DataError(
                f"dataset {name!r}: x and y must be numpy arrays, got "
                f"{type(x).__name__} and {type(y).__name__}; convert with np.asarray(...)"
            )
        if x.ndim != 4 or x.shape[1:] != IMAGE_SHAPE:
            raise DataError(
                f"dataset {name!r}: images must have shape (N, 32, 32, 3) (NHWC, RGB), got "
                f"{x.shape}; resize to 32x32 and transpose NCHW data to NHWC"
            )
        if x.dtype != np.uint8:
            raise DataError(
                f"dataset {name!r}: images must be uint8 in [0, 255], got dtype {x.dtype}; "
                "store raw pixels (e.g. np.round(x * 255).astype(np.uint8)) and use to_float() later"
            )
        if y.ndim != 1:
            raise DataError(
                f"dataset {name!r}: labels must be a 1-D array of class ids, got shape {y.shape}; "
                "convert one-hot labels with y.argmax(-1)"
            )
        if y.dtype != np.int32:
            raise DataError(
                f"dataset {name!r}: labels must be int32, got dtype {y.dtype}; "
                "convert with y.astype(np.int32)"
            )
        if len(x) != len(y):
            raise DataError(
                f"dataset {name!r}: {len(x)} images but {len(y)} labels; "
                "x and y must have the same length"
            )
        if not isinstance(self.num_classes, (int, np.integer)) or self.num_classes < 1:
            raise DataError(
                f"dataset {name!r}: num_classes must be a positive integer, got {self.num_classes!r}"
            )
        if len(y):
            lo, hi = int(y.min()), int(y.max())
            if lo < 0 or hi >= self.num_classes:
                raise DataError(
                    f"dataset {name!r}: labels out of range [0, {self.num_classes}): "
                    f"min {lo}, max {hi}; check num_classes or the label encoding"
                )

    def __len__(self) -> int:
        return len(self.y)

    def slice(self, start: int, stop: int, name: str | None = None) -> "Dataset":
        """Images ``start..stop-1`` as a new Dataset (array views, no copy)."""
        return Dataset(self.x[start:stop], self.y[start:stop], self.num_classes,
                       name if name is not None else f"{self.name}[{start}:{stop}]")


def to_float(x: Any) -> Any:
    """uint8 images (..., H, W, C) -> float32 in [0, 1] (same shape).

    Works on numpy and jax arrays. Refuses non-uint8 input so images are never scaled twice.
    """
    if x.dtype != np.uint8:
        raise DataError(
            f"to_float expects uint8 pixels in [0, 255], got dtype {x.dtype}; "
            "it was probably converted already"
        )
    return x.astype(np.float32) / np.float32(255.0)


# --------------------------------------------------------------------------- splits


def ibau_split(test: Dataset, n_clean: int = 5000) -> tuple[Dataset, Dataset]:
    """The original I-BAU code's split of a test set.

    Returns ``(clean_set, acc_set)``:

    * ``clean_set`` = test images ``0 .. n_clean-1``: the defender's clean data used for
      unlearning (5,000 CIFAR-10 images, in 50 batches of 100, fixed order);
    * ``acc_set`` = test images ``n_clean .. end``: used to measure clean accuracy.

    The attack-success-rate set is the triggered copies of ``clean_set`` (all images,
    target-class ones included, relabelled to the target); the attacks module builds it.
    """
    n = len(test)
    if not isinstance(n_clean, (int, np.integer)) or not 0 < n_clean < n:
        raise DataError(
            f"ibau_split: n_clean must satisfy 0 < n_clean < {n} (the size of {test.name!r}), "
            f"got {n_clean!r}; both the clean set and the accuracy set need images"
        )
    return (
        test.slice(0, n_clean, f"{test.name}-clean"),
        test.slice(n_clean, n, f"{test.name}-acc"),
    )


def batches(x: np.ndarray, batch_size: int) -> np.ndarray:
    """Reshape (N, ...) -> (N // batch_size, batch_size, ...), keeping order (a view).

    Raises DataError if batch_size does not divide N: the original code drops nothing and
    pads nothing, so a silent remainder would change the algorithm.
    """
    x = np.asarray(x)
    if x.ndim < 1:
        raise DataError("batches: expected an array with a leading batch axis, got a scalar")
    n = x.shape[0]
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise DataError(f"batches: batch_size must be a positive integer, got {batch_size!r}")
    if n % batch_size:
        raise DataError(
            f"batches: batch size {batch_size} does not divide N = {n} "
            f"(remainder {n % batch_size}); choose a batch size that divides {n} "
            f"or trim the data to {n - n % batch_size} items"
        )
    return x.reshape((n // batch_size, batch_size) + x.shape[1:])


# --------------------------------------------------------------------------- paths


def default_shared_dir() -> Path:
    """The shared data folder that tests and benchmarks read.

    ``$IBAU_SHARED`` if set, else ``../shared`` relative to the current working directory
    (the folder beside the project checkout). Library functions never use this implicitly;
    they take explicit paths.
    """
    env = os.environ.get("IBAU_SHARED")
    if env:
        return Path(env).expanduser()
    return Path.cwd().parent / "shared"


def default_cache_dir() -> Path:
    """Where downloads go: ``$IBAU_CACHE`` if set, else ``~/.cache/ibau_jax``."""
    env = os.environ.get("IBAU_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ibau_jax"


# --------------------------------------------------------------------------- download


def md5sum(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex md5 of a file, read in chunks."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk_size), b""):
            h.update(block)
    return h.hexdigest()


def verify_md5(path: str | os.PathLike, expected: str) -> None:
    """Raise DataError if the md5 of ``path`` is not ``expected``."""
    actual = md5sum(path)
    if actual != expected.lower():
        raise DataError(
            f"checksum mismatch for {path}: expected md5 {expected}, got {actual}. "
            "The file is corrupt or incomplete; delete it and retry (it will be downloaded again)"
        )


def _fetch_url(url: str, dst: Path) -> None:
    """Stream ``url`` into ``dst`` with a progress bar. The only function that touches the network."""
    from tqdm.auto import tqdm

    with urllib.request.urlopen(url, timeout=60) as resp, open(dst, "wb") as out:
        total = int(resp.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                  desc=f"downloading {Path(url).name}") as bar:
            for block in iter(lambda: resp.read(1 << 20), b""):
                out.write(block)
                bar.update(len(block))


def download_file(url: str, dest: str | os.PathLike, md5: str | None = None) -> Path:
    """Download ``url`` to ``dest`` atomically and return ``dest``.

    The bytes go to a temporary file beside ``dest``, are checked against ``md5`` (if given),
    and only then renamed into place with ``os.replace``; an interrupted or corrupt download
    never leaves a file at ``dest``.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        try:
            _fetch_url(url, tmp)
        except (urllib.error.URLError, OSError, TimeoutError) as e:
            raise DataError(
                f"could not download {url}: {e}. Download it by hand and put it at {dest}, "
                "or pass a data directory that already holds the data"
            ) from e
        if md5 is not None:
            actual = md5sum(tmp)
            if actual != md5.lower():
                raise DataError(
                    f"checksum mismatch for the download of {url}: expected md5 {md5}, got "
                    f"{actual}. The partial file was deleted; retry the download "
                    f"(or put a good copy at {dest})"
                )
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()
    return dest


def _cifar10_archive_in_cache(cache_dir: Path, download: bool) -> Path:
    """Return a verified cached CIFAR-10 archive, downloading it if allowed."""
    path = cache_dir / CIFAR10_TAR_NAME
    if path.is_file():
        verify_md5(path, CIFAR10_MD5)  # looked up at call time so tests can monkeypatch it
        return path
    if not download:
        raise DataError(
            f"CIFAR-10 archive not found at {path} and download=False; put "
            f"{CIFAR10_TAR_NAME} (from {CIFAR10_URL}) there, pass --data-dir, or allow download"
        )
    return download_file(CIFAR10_URL, path, md5=CIFAR10_MD5)


# --------------------------------------------------------------------------- pickles


def _numpy_globals() -> dict[tuple[str, str], Any]:
    # Map both the numpy<2 and numpy>=2 module names to the real objects, so old pickles
    # load without touching the deprecated numpy.core shim.
    try:
        from numpy._core import multiarray  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray  # type: ignore[no-redef]
    import _codecs

    return {
        ("numpy.core.multiarray", "_reconstruct"): multiarray._reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): multiarray._reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _codecs.encode,  # protocol-2 pickles encode bytes this way
    }


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals a plain numpy array needs."""

    _allowed = _numpy_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load global {module}.{name}: only numpy arrays are allowed"
            ) from None


def _load_cifar_batch(f: BinaryIO, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Decode one official CIFAR-10 batch pickle -> (x uint8 (N,32,32,3), y int32 (N,))."""
    try:
        d = _RestrictedUnpickler(f, encoding="bytes").load()
    except pickle.UnpicklingError as e:
        raise DataError(f"{where}: unsafe or corrupt pickle ({e}); use the official archive from {CIFAR10_URL}") from e
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            OSError, zlib.error, tarfile.TarError) as e:
        raise DataError(f"{where}: corrupt CIFAR-10 batch ({type(e).__name__}: {e}); "
                        "delete the file and retry") from e
    if not isinstance(d, dict) or b"data" not in d or b"labels" not in d:
        keys = sorted(d) if isinstance(d, dict) else type(d).__name__
        raise DataError(f"{where}: expected a dict with b'data' and b'labels', got {keys}; "
                        "is this a CIFAR-10 python batch?")
    data, labels = d[b"data"], d[b"labels"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != 3 * 32 * 32:
        desc = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{where}: b'data' must be a uint8 array of shape (N, 3072), got {desc}")
    y = np.asarray(labels)
    if y.ndim != 1 or len(y) != len(data) or (len(y) and not np.issubdtype(y.dtype, np.integer)):
        raise DataError(f"{where}: b'labels' must be {len(data)} integers, got shape {y.shape}")
    # Rows are channel-major (1024 R, 1024 G, 1024 B), each plane row-major: NCHW -> NHWC.
    x = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(x), y.astype(np.int32)


def _read_cifar10_tar(path: Path, split: Split) -> tuple[np.ndarray, np.ndarray]:
    """Read a split's batches straight from the archive (no extraction to disk)."""
    names = _CIFAR10_BATCHES[split]
    xs, ys = [], []
    try:
        with tarfile.open(path, "r:*") as tar:
            members = {Path(m.name).name: m for m in tar.getmembers()
                       if m.isfile() and Path(m.name).parent.name == CIFAR10_EXTRACTED_DIR}
            for name in names:
                member = members.get(name)
                if member is None:
                    raise DataError(
                        f"{path}: member {CIFAR10_EXTRACTED_DIR}/{name} is missing; this is not "
                        f"the official {CIFAR10_TAR_NAME} (get it from {CIFAR10_URL})"
                    )
                f = tar.extractfile(member)
                assert f is not None  # regular file
                with f:
                    x, y = _load_cifar_batch(f, f"{path}:{member.name}")
                xs.append(x)
                ys.append(y)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise DataError(f"{path}: corrupt or unreadable tar archive ({type(e).__name__}: {e}); "
                        f"delete it and retry, or download it again from {CIFAR10_URL}") from e
    return np.concatenate(xs), np.concatenate(ys)


def _read_cifar10_extracted(root: Path, split: Split) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for name in _CIFAR10_BATCHES[split]:
        p = root / name
        if not p.is_file():
            raise DataError(f"{p} is missing; {root} must hold data_batch_1..5 and test_batch "
                            f"(extract {CIFAR10_TAR_NAME} from {CIFAR10_URL})")
        with open(p, "rb") as f:
            x, y = _load_cifar_batch(f, str(p))
        xs.append(x)
        ys.append(y)
    return np.concatenate(xs), np.concatenate(ys)


# --------------------------------------------------------------------------- npz


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read ``x`` and ``y`` from an npz without unpickling anything."""
    if not path.is_file():
        raise DataError(f"{path} not found; expected an .npz file with arrays x (uint8 N×32×32×3) and y")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in ("x", "y") if k not in z.files]
            if missing:
                raise DataError(f"{path}: missing array(s) {missing} (found {z.files}); "
                                "the file must hold x (uint8 N×32×32×3) and y (labels)")
            x, y = z["x"], z["y"]
    except DataError:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, zlib.error, KeyError) as e:
        raise DataError(f"{path}: corrupt or unreadable npz file ({type(e).__name__}: {e}); "
                        "replace it with a good copy") from e
    return x, y


def _make_dataset(x: np.ndarray, y: np.ndarray, num_classes: int, name: str, where: str) -> Dataset:
    """Validate raw arrays (labels of any integer dtype) and build a Dataset."""
    if y.ndim == 1 and not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{where}: labels must be integers, got dtype {y.dtype}")
    if y.ndim == 1 and len(y):
        # Check the range before the int32 cast so huge values cannot wrap into range.
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= num_classes:
            raise DataError(f"{where}: labels out of range [0, {num_classes}): min {lo}, max {hi}; "
                            "check num_classes or the label encoding")
    try:
        return Dataset(x, y.astype(np.int32) if y.ndim == 1 else y, num_classes, name)
    except DataError as e:
        raise DataError(f"{where}: {e}") from None


def load_npz_dataset(path: str | os.PathLike, num_classes: int, name: str) -> Dataset:
    """Load an npz holding ``x`` (uint8 N×32×32×3, RGB, NHWC) and ``y`` (integer labels, N).

    Loaded with ``allow_pickle=False``. Returns a Dataset with y cast to int32.
    """
    path = Path(path)
    x, y = _read_npz(path)
    return _make_dataset(x, y, num_classes, name, str(path))


# --------------------------------------------------------------------------- CIFAR-10


def _missing_cifar10_message(d: Path, split: Split, source: Source) -> str:
    npz = ", ".join(str(d / n) for n in _CIFAR10_NPZ[split])
    parts = []
    if source in ("auto", "npz"):
        parts.append(f"{npz} (npz layout: x uint8 N×32×32×3, y labels)")
    if source in ("auto", "tar"):
        parts.append(f"{d / CIFAR10_TAR_NAME} (official archive, {CIFAR10_URL})")
        parts.append(f"{d / CIFAR10_EXTRACTED_DIR}/ (the extracted archive)")
    how = "pass --data-dir pointing at them"
    if source != "npz":
        how += " or allow download (download=True)"
    return f"CIFAR-10 {split} data not found: expected " + " or ".join(parts) + f"; put the files there, {how}"


def load_cifar10(
    data_dir: str | os.PathLike | None = None,
    split: Split = "test",
    source: Source = "auto",
    download: bool = True,
    cache_dir: str | os.PathLike | None = None,
) -> Dataset:
    """Load a CIFAR-10 split as a Dataset: x uint8 (N, 32, 32, 3) RGB NHWC, y int32 (N,).

    N is 10,000 for ``split='test'`` and 50,000 for ``'train'``, in the official order.

    ``data_dir`` may be:

    * a directory in the npz layout (``test.npz``, ``train_1.npz`` .. ``train_5.npz``);
    * the official ``cifar-10-python.tar.gz`` itself, a directory containing it, or a
      directory containing the extracted ``cifar-10-batches-py/`` (or that folder itself);
    * ``None``: use ``cache_dir`` (default :func:`default_cache_dir`), downloading the
      archive there if ``download`` is true.

    ``source`` restricts the layouts tried: ``'npz'``, ``'tar'`` (archive or extracted),
    ``'auto'`` (npz, then archive/extracted, then cache/download), or ``'tfds'``
    (tensorflow-datasets; see :func:`_load_cifar10_tfds`). Downloaded or cached archives
    are checked against the published md5.
    """
    if split not in _CIFAR10_BATCHES:
        raise DataError(f"split must be 'test' or 'train', got {split!r}")
    if source not in DATA_SOURCES:
        raise DataError(f"source must be one of {', '.join(map(repr, DATA_SOURCES))}, got {source!r}")
    name = f"cifar10-{split}"
    if source == "tfds":
        return _load_cifar10_tfds(data_dir, split, download)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()

    def from_tar(p: Path) -> Dataset:
        x, y = _read_cifar10_tar(p, split)
        return _make_dataset(x, y, 10, name, str(p))

    def from_extracted(p: Path) -> Dataset:
        x, y = _read_cifar10_extracted(p, split)
        return _make_dataset(x, y, 10, name, str(p))

    if data_dir is None:
        if source == "npz":
            raise DataError("source='npz' needs data_dir: a directory holding "
                            + ", ".join(_CIFAR10_NPZ[split]) + "; pass --data-dir")
        return from_tar(_cifar10_archive_in_cache(cache, download))

    d = Path(data_dir).expanduser()
    if d.is_file():
        if source == "npz":
            raise DataError(f"source='npz' needs a directory holding {', '.join(_CIFAR10_NPZ[split])}, "
                            f"got the file {d}")
        return from_tar(d)
    if not d.is_dir():
        raise DataError(
            f"CIFAR-10 data directory {d} does not exist; create it and put test.npz/train_*.npz "
            f"or {CIFAR10_TAR_NAME} there, pass the right --data-dir, or pass data_dir=None to "
            f"download into the cache ({cache})"
        )

    if source in ("auto", "npz"):
        files = [d / n for n in _CIFAR10_NPZ[split]]
        present = [f for f in files if f.is_file()]
        if present and len(present) < len(files):
            missing = [str(f) for f in files if not f.is_file()]
            raise DataError(f"incomplete CIFAR-10 npz layout in {d}: missing {missing}; "
                            "add them or remove the partial set")
        if present:
            # Validate file by file so an error names the offending file.
            parts = [load_npz_dataset(f, 10, name) for f in files]
            if len(parts) == 1:
                return parts[0]
            return Dataset(np.concatenate([p.x for p in parts]),
                           np.concatenate([p.y for p in parts]), 10, name)
        if source == "npz":
            raise DataError(_missing_cifar10_message(d, split, source))

    # source in ("auto", "tar")
    if (d / CIFAR10_TAR_NAME).is_file():
        return from_tar(d / CIFAR10_TAR_NAME)
    if (d / CIFAR10_EXTRACTED_DIR).is_dir():
        return from_extracted(d / CIFAR10_EXTRACTED_DIR)
    if (d / _CIFAR10_BATCHES[split][0]).is_file():  # d is cifar-10-batches-py itself
        return from_extracted(d)
    if (cache / CIFAR10_TAR_NAME).is_file() or download:
        return from_tar(_cifar10_archive_in_cache(cache, download))
    raise DataError(_missing_cifar10_message(d, split, source))


def _load_cifar10_tfds(data_dir: str | os.PathLike | None, split: Split, download: bool) -> Dataset:
    """CIFAR-10 through tensorflow-datasets (the optional ``ibau-jax[tfds]`` extra).

    ``tensorflow_datasets`` is imported here only. ``data_dir`` is the tfds data folder
    (``None``: tfds's default, ``~/tensorflow_datasets``); ``download`` is passed to
    ``tfds.load``. tfds stores the examples shuffled, but each carries an ``id``
    (``"test_00042"``: its index in the official order), so the official order is restored
    from it; without ids the tfds order is kept and a warning says so, because
    :func:`ibau_split` then selects different images than the original code.
    """
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise DataError(TFDS_MISSING_MESSAGE) from e
    tfds_dir = None if data_dir is None else str(Path(data_dir).expanduser())
    where = f"tensorflow-datasets cifar10 split {split!r}" + (f" in {tfds_dir}" if tfds_dir else "")
    try:
        arrays = tfds.as_numpy(tfds.load("cifar10", split=split, batch_size=-1,
                                         data_dir=tfds_dir, download=download))
    except ImportError as e:  # e.g. tensorflow-datasets installed without tensorflow
        raise DataError(f"{TFDS_MISSING_MESSAGE} ({type(e).__name__}: {e})") from e
    except Exception as e:  # tfds raises many types (not found, download, checksum); keep the cause
        raise DataError(f"{where}: tensorflow-datasets could not load it ({type(e).__name__}: {e}); "
                        "check --data-dir (a tfds data folder) or allow download") from e
    if not isinstance(arrays, dict) or "image" not in arrays or "label" not in arrays:
        got = sorted(arrays) if isinstance(arrays, dict) else type(arrays).__name__
        raise DataError(f"{where}: expected a dict with 'image' and 'label' arrays, got {got}")
    x, y = np.asarray(arrays["image"]), np.asarray(arrays["label"])
    if "id" in arrays:
        order = _tfds_official_order(np.asarray(arrays["id"]), split, len(y), where)
        x, y = x[order], y[order]
    else:
        warnings.warn(f"{where}: no 'id' feature, so the official CIFAR-10 order cannot be restored; "
                      "the images keep the tfds order and ibau_split will differ from the original split",
                      stacklevel=3)
    return _make_dataset(np.ascontiguousarray(x), y, 10, f"cifar10-{split}", where)


def _tfds_official_order(ids: np.ndarray, split: Split, n: int, where: str) -> np.ndarray:
    """Permutation sorting tfds examples by their official index (id ``"<split>_<index>"``)."""
    prefix = f"{split}_"
    idx = np.empty(len(ids), np.int64)
    for i, v in enumerate(ids.reshape(-1)):
        s = v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)
        if not s.startswith(prefix) or not s[len(prefix):].isdigit():
            raise DataError(f"{where}: unexpected example id {s!r} (expected '{prefix}NNNNN')")
        idx[i] = int(s[len(prefix):])
    if len(idx) != n or not np.array_equal(np.sort(idx), np.arange(n)):
        raise DataError(f"{where}: example ids are not a permutation of 0..{n - 1}; "
                        "the tfds copy is incomplete or not the official CIFAR-10")
    return np.argsort(idx, kind="stable")


# --------------------------------------------------------------------------- GTSRB


@dataclass(frozen=True)
class _GtsrbRow:
    path: Path          # the image file
    width: int
    height: int
    box: tuple[int, int, int, int]  # X1, Y1, X2, Y2, all inclusive
    label: int
    where: str          # "CSV, line N", for error messages


def _gtsrb_get_message(d: Path) -> str:
    return (f"get GTSRB from {GTSRB_URL}: GTSRB_Final_Training_Images.zip (train), "
            f"GTSRB_Final_Test_Images.zip and GTSRB_Final_Test_GT.zip (test), and extract them into {d}")


def _gtsrb_missing_message(d: Path, split: Split) -> str:
    if split == "test":
        layout = (f"{d / GTSRB_TEST_NPZ} (npz: x uint8 N×32×32×3 RGB, the sign ROI resized to 32×32; "
                  f"y class ids 0..42) or the official layout {d}/Final_Test/Images/*.ppm with "
                  f"{GTSRB_TEST_CSV} in {d}/Final_Test/Images/ or {d}/ (also accepted under {d}/GTSRB/)")
    else:
        layout = (f"{d / GTSRB_TRAIN_NPZ} (npz: x uint8 N×32×32×3 RGB, y class ids 0..42) or the "
                  f"official layout {d}/Final_Training/Images/000NN/*.ppm with "
                  f"{d}/Final_Training/Images/000NN/GT-000NN.csv for NN = 00..42 "
                  f"(also accepted under {d}/GTSRB/)")
    return f"GTSRB {split} data not found: expected {layout}; {_gtsrb_get_message(d)}"


def _read_gtsrb_csv(csv_path: Path, images_dir: Path) -> list[_GtsrbRow]:
    """Parse an official GTSRB annotation file (``;``-separated, header line)."""
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            lines = list(enumerate(csv.reader(f, delimiter=";"), start=1))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{csv_path}: unreadable annotation file ({type(e).__name__}: {e})") from e
    if not lines:
        raise DataError(f"{csv_path}: empty file; expected the header {';'.join(_GTSRB_COLUMNS)}")
    header = [h.strip() for h in lines[0][1]]
    missing = [c for c in _GTSRB_COLUMNS if c not in header]
    if missing:
        raise DataError(f"{csv_path}, line 1: missing column(s) {missing} in header {';'.join(header)!r}; "
                        f"expected {';'.join(_GTSRB_COLUMNS)} (the official GTSRB annotation format)")
    col = {c: header.index(c) for c in _GTSRB_COLUMNS}
    rows: list[_GtsrbRow] = []
    for lineno, fields in lines[1:]:
        if not any(s.strip() for s in fields):
            continue  # blank line
        where = f"{csv_path}, line {lineno}"
        if len(fields) < len(header):
            raise DataError(f"{where}: expected {len(header)} ';'-separated fields, got {len(fields)}")
        values = {}
        for c in _GTSRB_COLUMNS[1:]:
            raw = fields[col[c]].strip()
            try:
                values[c] = int(raw)
            except ValueError:
                raise DataError(f"{where}: {c} must be an integer, got {raw!r}") from None
        name = fields[col["Filename"]].strip()
        if not name or Path(name).name != name or name in (".", ".."):
            raise DataError(f"{where}: Filename must be a plain file name, got {name!r}")
        w, h = values["Width"], values["Height"]
        x1, y1, x2, y2 = (values[c] for c in ("Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2"))
        label = values["ClassId"]
        if not 0 <= label < GTSRB_NUM_CLASSES:
            raise DataError(f"{where}: ClassId {label} is outside 0..{GTSRB_NUM_CLASSES - 1}")
        if w < 1 or h < 1:
            raise DataError(f"{where}: image size {w}x{h} must be positive")
        if not (0 <= x1 <= x2 < w and 0 <= y1 <= y2 < h):
            raise DataError(f"{where}: ROI box ({x1}, {y1})-({x2}, {y2}) (inclusive) is outside the "
                            f"{w}x{h} image {name}; need 0 <= X1 <= X2 < Width and 0 <= Y1 <= Y2 < Height")
        rows.append(_GtsrbRow(images_dir / name, w, h, (x1, y1, x2, y2), label, where))
    if not rows:
        raise DataError(f"{csv_path}: no images listed (only a header)")
    return rows


def _read_gtsrb_images(rows: list[_GtsrbRow], desc: str) -> tuple[np.ndarray, np.ndarray]:
    """Crop each image to its ROI box, resize to 32×32 (Pillow bilinear), RGB uint8."""
    from PIL import Image
    from tqdm.auto import tqdm

    x = np.empty((len(rows),) + IMAGE_SHAPE, np.uint8)
    for i, r in enumerate(tqdm(rows, desc=desc, unit="img", disable=len(rows) < _PROGRESS_MIN_FILES)):
        if not r.path.is_file():
            raise DataError(f"{r.where}: image file {r.path} not found")
        try:
            with Image.open(r.path) as im:
                im.load()
                if im.size != (r.width, r.height):
                    raise DataError(f"{r.where}: {r.path} is {im.size[0]}x{im.size[1]} but the csv says "
                                    f"{r.width}x{r.height}; the annotation file does not match the images")
                x1, y1, x2, y2 = r.box
                # The csv box is inclusive; Pillow's crop box excludes its right/bottom edge.
                roi = im.convert("RGB").crop((x1, y1, x2 + 1, y2 + 1))
                x[i] = np.asarray(roi.resize(IMAGE_SHAPE[1::-1], Image.Resampling.BILINEAR))
        except DataError:
            raise
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise DataError(f"{r.where}: cannot read image {r.path} ({type(e).__name__}: {e})") from e
    return x, np.array([r.label for r in rows], np.int32)


def _gtsrb_roots(d: Path) -> list[Path]:
    # The official zips unpack to GTSRB/Final_*; accept DIR itself or DIR/GTSRB.
    return [d, d / "GTSRB"]


def _gtsrb_test_rows(d: Path) -> list[_GtsrbRow] | None:
    for root in _gtsrb_roots(d):
        images = root / "Final_Test" / "Images"
        if not images.is_dir():
            continue
        for csv_path in (images / GTSRB_TEST_CSV, root / GTSRB_TEST_CSV, d / GTSRB_TEST_CSV):
            if csv_path.is_file():
                return _read_gtsrb_csv(csv_path, images)
        raise DataError(
            f"found {images} but no {GTSRB_TEST_CSV} in {images}/ or {d}/; it comes in "
            f"GTSRB_Final_Test_GT.zip (the GT-final_test.test.csv inside the image zip has no class ids); "
            + _gtsrb_get_message(d))
    return None


def _gtsrb_train_rows(d: Path) -> list[_GtsrbRow] | None:
    for root in _gtsrb_roots(d):
        images = root / "Final_Training" / "Images"
        if not images.is_dir():
            continue
        class_dirs = sorted(p for p in images.iterdir()
                            if p.is_dir() and len(p.name) == 5 and p.name.isdigit())
        if not class_dirs:
            raise DataError(f"{images} holds no class folders 00000..00042; " + _gtsrb_get_message(d))
        rows: list[_GtsrbRow] = []
        for cdir in class_dirs:
            cls = int(cdir.name)
            if cls >= GTSRB_NUM_CLASSES:
                raise DataError(f"{cdir}: class folder outside 00000..{GTSRB_NUM_CLASSES - 1:05d}")
            csv_path = cdir / f"GT-{cdir.name}.csv"
            if not csv_path.is_file():
                raise DataError(f"{csv_path} not found; every class folder of the official training "
                                "archive holds its GT-000NN.csv; " + _gtsrb_get_message(d))
            class_rows = _read_gtsrb_csv(csv_path, cdir)
            for r in class_rows:
                if r.label != cls:
                    raise DataError(f"{r.where}: ClassId {r.label} does not match the folder {cdir.name}")
            rows += class_rows
        if len(class_dirs) < GTSRB_NUM_CLASSES:
            warnings.warn(f"{images}: only {len(class_dirs)} of {GTSRB_NUM_CLASSES} class folders present; "
                          "the training set is incomplete", stacklevel=3)
        return rows
    return None


def load_gtsrb(data_dir: str | os.PathLike, split: Split = "test") -> Dataset:
    """Load a GTSRB split as a Dataset: x uint8 (N, 32, 32, 3) RGB NHWC, y int32 in [0, 43).

    Tried in order:

    1. ``DIR/test_roi32.npz`` (``split='test'``) or ``DIR/train_roi32.npz`` (``'train'``):
       x uint8 N×32×32×3 (sign ROI already resized), y class ids;
    2. the official archive layout, in ``DIR`` or ``DIR/GTSRB`` (as the zips unpack):
       train ``Final_Training/Images/000NN/*.ppm`` with ``000NN/GT-000NN.csv``
       (NN = 00..42, classes in folder order, rows in csv order); test
       ``Final_Test/Images/*.ppm`` with ``GT-final_test.csv`` (from GTSRB_Final_Test_GT.zip)
       in ``Final_Test/Images/`` or ``DIR/``, rows in csv order.

    Archive images are cropped to their ROI box, whose corners ``(Roi.X1, Roi.Y1)`` and
    ``(Roi.X2, Roi.Y2)`` are both inclusive (Pillow crop box ``(X1, Y1, X2 + 1, Y2 + 1)``),
    then resized to 32×32 with Pillow's bilinear filter (which antialiases when shrinking)
    and converted to RGB. A malformed csv, a missing or unreadable image, a ROI outside its
    image or a class id outside 0..42 raises DataError naming the file and line. A progress
    bar is shown from 200 images on. Get the data from https://benchmark.ini.rub.de/gtsrb_dataset.html.
    """
    if split not in ("test", "train"):
        raise DataError(f"split must be 'test' or 'train', got {split!r}")
    d = Path(data_dir).expanduser()
    if not d.is_dir():
        raise DataError(f"GTSRB data directory {d} does not exist; " + _gtsrb_missing_message(d, split))
    name = f"gtsrb-{split}"
    npz = d / (GTSRB_TEST_NPZ if split == "test" else GTSRB_TRAIN_NPZ)
    if npz.is_file():
        return load_npz_dataset(npz, GTSRB_NUM_CLASSES, name)
    rows = _gtsrb_test_rows(d) if split == "test" else _gtsrb_train_rows(d)
    if rows is None:
        raise DataError(_gtsrb_missing_message(d, split))
    x, y = _read_gtsrb_images(rows, f"reading GTSRB {split}")
    return _make_dataset(x, y, GTSRB_NUM_CLASSES, name, str(d))
