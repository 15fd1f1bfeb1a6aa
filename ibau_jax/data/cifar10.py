"""CIFAR-10 as a :class:`~ibau_jax.data.dataset.Dataset`, from any of its usual forms.

* the npz layout (``test.npz``, ``train_1.npz`` .. ``train_5.npz``, each with ``x`` uint8
  N×32×32×3 and ``y`` integer labels), or
* the official ``cifar-10-python.tar.gz`` (the file itself, a directory holding it, or a
  directory holding the extracted ``cifar-10-batches-py/``), optionally downloaded into a
  cache directory and checked against its published md5, or
* tensorflow-datasets (``source='tfds'``, optional extra ``ibau-jax[tfds]``; imported
  lazily, so the core never imports tensorflow).

The official batches are Python pickles. They are read with a restricted unpickler that
only resolves the few globals a numpy array needs, so a tampered archive cannot run code.
"""
from __future__ import annotations

import os
import pickle
import tarfile
import warnings
import zlib
from pathlib import Path
from typing import Any, BinaryIO, Literal

import numpy as np

from .dataset import Dataset, Split, _make_dataset, load_npz_dataset
from .download import download_file, verify_md5
from .errors import DataError
from .paths import default_cache_dir

__all__ = ["load_cifar10", "CIFAR10_URL", "CIFAR10_MD5", "CIFAR10_TAR_NAME", "CIFAR10_CLASSES",
           "DATA_SOURCES", "Source"]

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

Source = Literal["auto", "npz", "tar", "tfds"]
DATA_SOURCES: tuple[str, ...] = ("auto", "npz", "tar", "tfds")
TFDS_MISSING_MESSAGE = ("--data-source tfds needs tensorflow-datasets and tensorflow: "
                        "pip install 'ibau-jax[tfds]'")


# --------------------------------------------------------------------------- cache


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
        how += f" or leave out --data-dir (data_dir=None) to download into the cache ({default_cache_dir()})"
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
    # An explicit folder is never replaced by the cache or the network: say what it lacks.
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
