"""The image-dataset container, its pixel conversion, and the original I-BAU split.

Images stay ``uint8`` (N, 32, 32, 3), RGB, NHWC on the host; :func:`to_float` converts a
batch to float32 in [0, 1] (no normalization, as in the original I-BAU code) right before it
goes to the model. Labels are ``int32`` (N,). :func:`load_npz_dataset` reads the npz layout
(``x`` uint8 N×32×32×3, ``y`` integer labels) that both CIFAR-10 and GTSRB use.
"""
from __future__ import annotations

import os
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .errors import DataError

__all__ = ["IMAGE_SHAPE", "Split", "Dataset", "to_float", "ibau_split", "batches", "load_npz_dataset"]

IMAGE_SHAPE: tuple[int, int, int] = (32, 32, 3)

Split = Literal["test", "train"]


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
