"""Datasets for ibau-jax: CIFAR-10 and GTSRB as uint8 NHWC numpy arrays.

Images stay ``uint8`` (N, 32, 32, 3), RGB, NHWC on the host; convert a batch with
:func:`to_float` (float32 in [0, 1], no normalization, as in the original I-BAU code)
right before it goes to the model. Labels are ``int32`` (N,).

One module per concept; this package only re-exports their public names:

* :mod:`.dataset`: the :class:`Dataset` container, :func:`to_float`, the original I-BAU
  split (:func:`ibau_split`, :func:`batches`) and the npz layout (:func:`load_npz_dataset`);
* :mod:`.cifar10`: :func:`load_cifar10` from npz files, the official tarball (read with a
  restricted unpickler), its extracted batches, a verified download, or tensorflow-datasets;
* :mod:`.gtsrb`: :func:`load_gtsrb` from npz or the official archives (ROI crop, 32×32);
* :mod:`.digits`: the demo's bundled scikit-learn digits and CIFAR-10 subsets;
* :mod:`.download`: :func:`md5sum`, :func:`verify_md5`, :func:`download_file`;
* :mod:`.paths`: :func:`default_shared_dir`, :func:`default_cache_dir`;
* :mod:`.errors`: :class:`DataError`, a :class:`ibau_jax.errors.UserError`.

Tests that replace a module-level name must patch the module that reads it (for example
``data.download._fetch_url``, ``data.cifar10.CIFAR10_MD5``), not this package.

User-facing code always takes explicit paths; :func:`default_shared_dir` exists only so
tests and benchmarks can find the project's shared data folder.
"""
from __future__ import annotations

from .cifar10 import (
    CIFAR10_CLASSES,
    CIFAR10_MD5,
    CIFAR10_TAR_NAME,
    CIFAR10_URL,
    DATA_SOURCES,
    Source,
    load_cifar10,
)
from .dataset import IMAGE_SHAPE, Dataset, Split, batches, ibau_split, load_npz_dataset, to_float
from .digits import DemoData, load_cifar10_subsets, load_digits_32
from .download import download_file, md5sum, verify_md5
from .errors import DataError
from .gtsrb import GTSRB_NUM_CLASSES, GTSRB_URL, load_gtsrb
from .paths import default_cache_dir, default_shared_dir

__all__ = [
    "DataError",
    "Dataset",
    "IMAGE_SHAPE",
    "Split",
    "to_float",
    "ibau_split",
    "batches",
    "load_npz_dataset",
    "load_cifar10",
    "Source",
    "DATA_SOURCES",
    "CIFAR10_URL",
    "CIFAR10_MD5",
    "CIFAR10_TAR_NAME",
    "CIFAR10_CLASSES",
    "load_gtsrb",
    "GTSRB_NUM_CLASSES",
    "GTSRB_URL",
    "DemoData",
    "load_digits_32",
    "load_cifar10_subsets",
    "default_shared_dir",
    "default_cache_dir",
    "download_file",
    "verify_md5",
    "md5sum",
]
