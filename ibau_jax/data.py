"""Datasets for ibau-jax: CIFAR-10 and GTSRB as uint8 NHWC numpy arrays.

Images stay ``uint8`` (N, 32, 32, 3), RGB, NHWC on the host; convert a batch with
:func:`to_float` (float32 in [0, 1], no normalization, as in the original I-BAU code)
right before it goes to the model. Labels are ``int32`` (N,).

CIFAR-10 can be read from

* the npz layout (``test.npz``, ``train_1.npz`` .. ``train_5.npz``, each with ``x`` uint8
  N×32×32×3 and ``y`` integer labels), or
* the official ``cifar-10-python.tar.gz`` (the file itself, a directory holding it, or a
  directory holding the extracted ``cifar-10-batches-py/``), optionally downloaded into a
  cache directory and checked against its published md5.

The official batches are Python pickles. They are read with a restricted unpickler that
only resolves the few globals a numpy array needs, so a tampered archive cannot run code.

User-facing code always takes explicit paths; :func:`default_shared_dir` exists only so
tests and benchmarks can find the project's shared data folder.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import tarfile
import tempfile
import urllib.error
import urllib.request
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

Split = Literal["test", "train"]
Source = Literal["auto", "npz", "tar"]


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

    ``source`` restricts the layouts tried: ``'npz'``, ``'tar'`` (archive or extracted), or
    ``'auto'`` (npz, then archive/extracted, then cache/download). Downloaded or cached
    archives are checked against the published md5.
    """
    if split not in _CIFAR10_BATCHES:
        raise DataError(f"split must be 'test' or 'train', got {split!r}")
    if source not in ("auto", "npz", "tar"):
        raise DataError(f"source must be 'auto', 'npz' or 'tar', got {source!r}")
    name = f"cifar10-{split}"
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


# --------------------------------------------------------------------------- GTSRB


def load_gtsrb(data_dir: str | os.PathLike) -> Dataset:
    """Load the GTSRB test set from ``data_dir/test_roi32.npz``.

    Returns x uint8 (12630, 32, 32, 3) RGB NHWC (sign ROI resized to 32×32), y int32 in [0, 43).
    """
    d = Path(data_dir).expanduser()
    path = d / GTSRB_TEST_NPZ
    if not path.is_file():
        raise DataError(
            f"GTSRB test data not found: expected {path} (an npz with x uint8 N×32×32×3 RGB, the "
            "sign ROI resized to 32×32, and y class ids 0..42); put it there or pass --data-dir "
            "(reading the official GTSRB archive is not supported yet)"
        )
    return load_npz_dataset(path, GTSRB_NUM_CLASSES, "gtsrb-test")
