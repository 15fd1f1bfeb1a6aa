"""Checkpoint I/O that never executes code from the file and reads no more than the model needs.

Two formats:

* PyTorch ``torch.save`` zip checkpoints (read only). ``data.pkl`` is parsed by a
  restricted unpickler whose ``find_class`` resolves only a short whitelist of globals
  to stand-ins defined here; torch itself is never imported. Unpickling yields tensor
  *records* only; each record is checked against its storage, and each storage against its
  member's size in the zip directory, and the keys, shapes and dtypes against the model,
  before the needed storages (at most ``_BUDGET_FACTOR`` x the model's float32 bytes) are
  read in bounded chunks and converted to the flax layout.
* ibau-jax's own format: one ``.npz`` with '/'-joined variable paths such as
  ``params/conv0/kernel`` (real floating arrays) plus a JSON ``meta``; read member by member
  (never unpickled), every ``.npy`` header checked against the model before its data.

Both loaders refuse non-finite weights (a NaN model would otherwise score as backdoor-free).
Every problem a file can have raises :class:`CheckpointError` (a ``UserError``) with one line.

Variables are nested dicts ``{'params': {...}, 'batch_stats': {...}}`` of numpy arrays with
the tree of ``init_variables(get_model(model, num_classes))``.
"""
from __future__ import annotations

import collections
import contextlib
import io
import json
import os
import pickle
import stat
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import ml_dtypes  # ships with jax; gives numpy a bfloat16
import numpy as np

from .data import CIFAR10_CLASSES, GTSRB_NUM_CLASSES
from .errors import UserError
from .models import MODELS, get_model, init_variables

__all__ = [
    "CheckpointError",
    "atomic_write",
    "FORMAT_VERSION",
    "MODEL_MAPPINGS",
    "load_torch_checkpoint",
    "save_checkpoint",
    "load_checkpoint",
    "load_model",
]

FORMAT_VERSION = 1
_META_KEY = "__meta__"  # npz entry holding the JSON meta as utf-8 bytes (uint8 array)
_STATE_DICT_KEYS = ("net", "state_dict")  # where training scripts usually nest the state_dict

Variables = dict[str, dict[str, Any]]


class CheckpointError(UserError):
    """A checkpoint is missing, corrupt, unsafe or does not fit the requested model."""


# --------------------------------------------------------------------------------------
# Restricted unpickler for torch zip checkpoints
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _StorageType:
    """Stand-in for ``torch.FloatStorage`` etc.: only carries the element dtype.

    Frozen with slots so that a pickle's BUILD opcode cannot alter the shared instances.
    """

    name: str
    dtype: np.dtype

    def __repr__(self) -> str:
        return f"<storage type torch.{self.name}>"


class _StateDict(collections.OrderedDict):
    """Stand-in for ``collections.OrderedDict``; a subclass so BUILD can set ``_metadata``."""


@dataclass(frozen=True, slots=True)
class _Storage:
    """A storage record of the archive, not read yet: ``numel`` elements of ``dtype`` in ``info``.

    Its byte size has been checked against the member's declared size in the zip directory.
    """

    key: str
    dtype: np.dtype
    numel: int
    info: zipfile.ZipInfo

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


@dataclass(frozen=True, slots=True)
class _TensorRef:
    """A tensor record (strided view of a ``_Storage``), validated against it, not read yet."""

    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    @property
    def dtype(self) -> np.dtype:
        return self.storage.dtype


def _rebuild_tensor_v2(storage: Any, storage_offset: Any, size: Any, stride: Any,
                       requires_grad: Any = False, backward_hooks: Any = None,
                       metadata: Any = None) -> _TensorRef:
    """Lazy version of ``torch._utils._rebuild_tensor_v2``: checks the record, reads nothing.

    The view's highest element index ``offset + sum((size_i - 1) * stride_i)`` must lie inside
    the storage, strides must be >= 0, and the view may not have more elements than its storage
    (only overlapping, e.g. stride-0, views can; a state_dict never holds one, and a crafted one
    would make the copy arbitrarily large).
    """
    if not isinstance(storage, _Storage):
        raise CheckpointError("tensor does not reference a storage from this file")
    try:
        offset = int(storage_offset)
        size = tuple(int(s) for s in size)
        stride = tuple(int(s) for s in stride)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"malformed tensor record: {e}") from None
    if len(size) != len(stride) or offset < 0 or any(s < 0 for s in size) or any(s < 0 for s in stride):
        raise CheckpointError(f"malformed tensor record: size {size}, stride {stride}, offset {offset}")
    numel = int(np.prod(size, dtype=object)) if size else 1
    if numel == 0:
        return _TensorRef(storage, 0, size, stride)
    last = offset + sum((n - 1) * st for n, st in zip(size, stride))
    if last >= storage.numel:
        raise CheckpointError(
            f"tensor of size {size} (offset {offset}, stride {stride}) runs past its storage of "
            f"{storage.numel} elements (truncated or corrupt storage)")
    if numel > storage.numel:
        raise CheckpointError(
            f"tensor of size {size} (stride {stride}) has {numel} elements, more than its storage's "
            f"{storage.numel}: overlapping views are not part of a plain state_dict (corrupt or crafted file)")
    return _TensorRef(storage, offset, size, stride)


def _rebuild_parameter(data: Any, requires_grad: Any = False, backward_hooks: Any = None) -> Any:
    """``nn.Parameter`` -> its tensor."""
    return data


_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}

# Exactly the globals a plain state_dict pickle needs; everything else is refused.
_SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): _StateDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageType(name, np.dtype(dt)) for name, dt in _STORAGE_DTYPES.items()},
}

# Weights must be real floating point; everything else (ints, complex, strings, objects) is refused.
_FLOAT_DTYPES = frozenset(np.dtype(d) for d in (np.float16, ml_dtypes.bfloat16, np.float32, np.float64))


def _is_real_float(dtype: np.dtype) -> bool:
    return dtype.kind in "fV" and dtype.newbyteorder("=") in _FLOAT_DTYPES


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler for ``data.pkl`` that maps whitelisted globals to stand-ins, refuses the rest."""

    def __init__(self, data: bytes, storage: Callable[[_StorageType, str, int], _Storage]) -> None:
        super().__init__(io.BytesIO(data))
        self._storage = storage

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _SAFE_GLOBALS[(module, name)]
        except KeyError:
            raise CheckpointError(
                f"refusing to load checkpoint: it references the forbidden global '{module}.{name}', "
                "which could execute code. Only plain state_dicts of tensors are accepted; re-save "
                "the checkpoint as `torch.save({'net': model.state_dict()}, path)` from a trusted "
                "environment.") from None

    def persistent_load(self, pid: Any) -> _Storage:
        # torch writes ('storage', storage_type, key, location, numel).
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise CheckpointError(f"unsupported persistent id in checkpoint: {pid!r:.200}")
        _, storage_type, key, _location, numel = pid
        return self._storage(storage_type, str(key), int(numel))


_LEGACY_MAGIC_PREFIX = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"

# Reading limits. Every archive member is read in chunks of _CHUNK bytes, never past its size
# declared in the zip directory (which is checked first), so a zip bomb costs no memory.
_CHUNK = 1 << 20
_MAX_PICKLE_BYTES = 16 << 20   # a state_dict's data.pkl is ~100 bytes per tensor
_MAX_META_BYTES = 1 << 20      # the .npz's JSON meta
# The storages read may hold at most this many times the model's float32 weights, plus slack:
# float64 weights (2x), a view into a larger storage; not an arbitrary amount of data.
_BUDGET_FACTOR = 4
_BUDGET_SLACK = 1 << 20


def _corrupt(path: Path, why: str) -> CheckpointError:
    return CheckpointError(
        f"{path}: corrupt or not a PyTorch checkpoint ({why}). Check that the file was fully "
        "downloaded/copied and was written by `torch.save`.")


def _check_file(path: Path) -> None:
    if not path.exists():
        raise CheckpointError(
            f"checkpoint file not found: {path}. Pass the path of an existing checkpoint "
            "(e.g. .../ibau-original/checkpoints/badnets_8_02_ckpt.pth or a saved .npz).")
    if not path.is_file():
        raise CheckpointError(f"checkpoint path is not a regular file: {path}. Pass the file itself.")


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, nbytes: int,
                 fail: Callable[[str], CheckpointError], f: Any = None) -> np.ndarray:
    """The first ``nbytes`` bytes of member ``info`` (from ``f``'s position if given), as uint8.

    Read in ``_CHUNK`` pieces into one buffer, so memory follows the bytes that really come out
    of the decompressor; zipfile never yields more than the member's declared size.
    """
    try:
        buf = np.empty(nbytes, np.uint8)
    except (MemoryError, ValueError):
        raise fail(f"member '{info.filename}' would need {nbytes} bytes of memory") from None
    view = memoryview(buf)
    pos = 0
    own = f is None
    f = zf.open(info) if own else f
    try:
        while pos < nbytes:
            n = f.readinto(view[pos:pos + _CHUNK])
            if not n:
                break
            pos += n
    finally:
        if own:
            f.close()
    if pos < nbytes:
        raise fail(f"member '{info.filename}' is truncated: {pos} of {nbytes} bytes")
    return buf


class _TorchArchive:
    """An open ``torch.save`` zip: ``load()`` unpickles ``data.pkl`` into dicts of ``_TensorRef``
    (reading no tensor data); ``tensor(ref)`` reads one, its storage once and in bounded chunks."""

    _ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, pickle.UnpicklingError, EOFError, OSError,
               ValueError, TypeError, AttributeError, IndexError, KeyError, RecursionError,
               NotImplementedError)

    def __init__(self, path: Path, zf: zipfile.ZipFile) -> None:
        self.path = path
        self.zf = zf
        self._storages: dict[str, _Storage] = {}
        self._data: dict[str, np.ndarray] = {}
        self._big_endian = False
        self._prefix = ""

    def _member(self, name: str) -> zipfile.ZipInfo | None:
        try:
            return self.zf.getinfo(name)
        except KeyError:
            return None

    def load(self) -> Any:
        path = self.path
        try:
            pkl_names = [n for n in self.zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
            if len(pkl_names) != 1:
                raise _corrupt(path, "no unique '<prefix>/data.pkl' entry")
            self._prefix = pkl_names[0][: -len("data.pkl")]
            fail = lambda why: _corrupt(path, why)  # noqa: E731
            order = self._member(self._prefix + "byteorder")
            if order is not None:
                if order.file_size > 16:
                    raise _corrupt(path, f"'byteorder' entry of {order.file_size} bytes")
                raw = _read_member(self.zf, order, order.file_size, fail).tobytes()
                self._big_endian = raw.strip() == b"big"
            info = self.zf.getinfo(pkl_names[0])
            if info.file_size > _MAX_PICKLE_BYTES:
                raise _corrupt(path, f"data.pkl declares {info.file_size} bytes, more than the "
                                     f"{_MAX_PICKLE_BYTES} a state_dict's needs")
            data = _read_member(self.zf, info, info.file_size, fail).tobytes()
            return _RestrictedUnpickler(data, self._storage).load()
        except CheckpointError:
            raise
        except self._ERRORS as e:
            raise _corrupt(path, f"{type(e).__name__}: {e}") from None

    def _storage(self, storage_type: _StorageType, key: str, numel: int) -> _Storage:
        """The storage record ``key``, its size checked against the zip directory (nothing read)."""
        name = f"{self._prefix}data/{key}"
        known = self._storages.get(key)
        if known is not None:
            if (known.dtype, known.numel) != (storage_type.dtype, numel):
                raise _corrupt(self.path, f"storage 'data/{key}' is referenced with two different types/sizes")
            return known
        info = self._member(name)
        if info is None:
            raise _corrupt(self.path, f"storage entry 'data/{key}' is missing")
        if numel < 0:
            raise _corrupt(self.path, f"storage 'data/{key}' has {numel} elements")
        storage = _Storage(key, storage_type.dtype, numel, info)
        if info.file_size < storage.nbytes:
            raise _corrupt(self.path, f"storage 'data/{key}' is truncated: {info.file_size} bytes "
                                      f"for {numel} x {storage.dtype.itemsize}-byte elements")
        if info.file_size > storage.nbytes:
            raise _corrupt(self.path, f"storage 'data/{key}' holds {info.file_size} bytes, but its record "
                                      f"declares {numel} x {storage.dtype.itemsize}-byte elements")
        self._storages[key] = storage
        return storage

    def tensor(self, ref: _TensorRef) -> np.ndarray:
        """The tensor ``ref`` as a contiguous native-endian array (its strides were validated)."""
        st = ref.storage
        if st.key not in self._data:  # tensors sharing a storage (views) see the same array
            try:
                raw = _read_member(self.zf, st.info, st.nbytes, lambda why: _corrupt(self.path, why))
            except CheckpointError:
                raise
            except self._ERRORS as e:
                raise _corrupt(self.path, f"{type(e).__name__}: {e}") from None
            dtype = st.dtype.newbyteorder(">" if self._big_endian else "<")
            self._data[st.key] = np.frombuffer(raw, dtype, count=st.numel).astype(st.dtype)
        arr = self._data[st.key]
        if 0 in ref.shape:
            return np.zeros(ref.shape, st.dtype)
        view = np.lib.stride_tricks.as_strided(
            arr[ref.offset:], shape=ref.shape, strides=tuple(s * arr.itemsize for s in ref.stride),
            writeable=False)
        return np.array(view, copy=True)


@contextlib.contextmanager
def _open_torch_archive(path: Path) -> Iterator[_TorchArchive]:
    _check_file(path)
    with open(path, "rb") as f:
        head = f.read(len(_LEGACY_MAGIC_PREFIX))
    if not zipfile.is_zipfile(path):
        if head == _LEGACY_MAGIC_PREFIX:
            raise CheckpointError(
                f"{path}: legacy (pre-1.6, non-zip) PyTorch checkpoint format is not supported. "
                "Re-save it with `torch.save(obj, path, _use_new_zipfile_serialization=True)`.")
        raise _corrupt(path, "not a zip archive")
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError) as e:
        raise _corrupt(path, f"{type(e).__name__}: {e}") from None
    with zf:
        yield _TorchArchive(path, zf)


# --------------------------------------------------------------------------------------
# PyTorch state_dict -> flax variables, one table per model
# --------------------------------------------------------------------------------------

# Layout conversions torch -> flax, and the inverse for shapes (to report torch shapes).
_TO_FLAX: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "conv_kernel": lambda a: np.transpose(a, (2, 3, 1, 0)),  # OIHW -> HWIO
    "dense_kernel": lambda a: np.transpose(a, (1, 0)),       # (out, in) -> (in, out)
    "same": lambda a: a,
}
_TORCH_SHAPE: dict[str, Callable[[tuple[int, ...]], tuple[int, ...]]] = {
    "conv_kernel": lambda s: (s[3], s[2], s[0], s[1]) if len(s) == 4 else s,
    "dense_kernel": lambda s: (s[1], s[0]) if len(s) == 2 else s,
    "same": lambda s: s,
}


@dataclass(frozen=True)
class ModelMapping:
    """How a PyTorch state_dict maps onto a flax model's variables.

    ``entries``: torch key -> (flax collection path, layout conversion name).
    ``ignored_suffixes``: torch keys ending like this carry nothing flax needs.
    ``classifier_weight``: torch key of the final Linear weight, shape (classes, features).
    """

    entries: dict[str, tuple[tuple[str, ...], str]]
    classifier_weight: str
    ignored_suffixes: tuple[str, ...] = (".num_batches_tracked",)


def _small_vgg_mapping() -> ModelMapping:
    # features = [Conv, BN, ELU] x2, MaxPool, Dropout, repeated 3 times -> conv at 0,3,8,11,16,19.
    convs = (0, 3, 8, 11, 16, 19)
    entries: dict[str, tuple[tuple[str, ...], str]] = {}
    for i, c in enumerate(convs):
        entries[f"features.{c}.weight"] = (("params", f"conv{i}", "kernel"), "conv_kernel")
        entries[f"features.{c}.bias"] = (("params", f"conv{i}", "bias"), "same")
        bn = c + 1
        entries[f"features.{bn}.weight"] = (("params", f"bn{i}", "scale"), "same")
        entries[f"features.{bn}.bias"] = (("params", f"bn{i}", "bias"), "same")
        entries[f"features.{bn}.running_mean"] = (("batch_stats", f"bn{i}", "mean"), "same")
        entries[f"features.{bn}.running_var"] = (("batch_stats", f"bn{i}", "var"), "same")
    # The flax model flattens in NCHW order, so the Linear weight needs only a transpose.
    entries["classifier.weight"] = (("params", "classifier", "kernel"), "dense_kernel")
    entries["classifier.bias"] = (("params", "classifier", "bias"), "same")
    return ModelMapping(entries=entries, classifier_weight="classifier.weight")


MODEL_MAPPINGS: dict[str, ModelMapping] = {"small_vgg": _small_vgg_mapping()}


def _flatten(tree: dict, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    out: dict[tuple[str, ...], Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict) or (hasattr(v, "items") and not hasattr(v, "shape")):
            out.update(_flatten(dict(v.items()), prefix + (str(k),)))
        else:
            out[prefix + (str(k),)] = v
    return out


def _unflatten(flat: dict[tuple[str, ...], Any]) -> dict:
    tree: dict = {}
    for path, v in flat.items():
        node = tree
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    return tree


def _template(model_name: str, num_classes: int) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Expected flax variable shapes, via ``eval_shape`` so nothing is computed."""
    if model_name not in MODELS:
        raise CheckpointError(f"unknown model {model_name!r}; choose one of {sorted(MODELS)}")
    model = get_model(model_name, num_classes)
    shapes = jax.eval_shape(lambda: init_variables(model))
    return {p: tuple(s.shape) for p, s in _flatten(shapes).items()}


def _budget(template: dict[tuple[str, ...], tuple[int, ...]]) -> int:
    """Most bytes of tensor data a checkpoint of this architecture may make us read."""
    weights = sum(int(np.prod(s, dtype=np.int64)) for s in template.values()) * 4
    return _BUDGET_FACTOR * weights + _BUDGET_SLACK


# The data sets the CLI knows (``--dataset``) and their class counts, to suggest the right one.
_DATASET_CLASSES = {"cifar10": len(CIFAR10_CLASSES), "gtsrb": GTSRB_NUM_CLASSES}


def _class_mismatch(path: Path, outputs: int, num_classes: int, detail: str = "") -> CheckpointError:
    """The checkpoint's classifier has ``outputs`` outputs; the data set has ``num_classes``."""
    fits = [name for name, n in _DATASET_CLASSES.items() if n == outputs]
    if fits:
        fix = f"pass --dataset {fits[0]} ({outputs} classes) or a checkpoint trained for this data set"
    else:
        known = ", ".join(f"{name} ({n})" for name, n in _DATASET_CLASSES.items())
        fix = (f"no known data set has {outputs} classes ({known}); pass a checkpoint trained for "
               "this data set")
    return CheckpointError(f"{path}: class count mismatch: the checkpoint has {outputs} outputs{detail} "
                           f"while the data set has {num_classes} classes; {fix}.")


def _check_finite(path: Path, arr: np.ndarray, name: str) -> None:
    """CheckpointError when ``arr`` holds NaN/Inf: such a model would silently score as clean."""
    if not np.isfinite(arr).all():
        bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
        raise CheckpointError(f"{path}: {name} holds {bad} NaN/Inf values; the model is broken: "
                              "retrain it or re-export it from a working copy.")


def _plain_meta(obj: dict) -> dict[str, Any]:
    return {str(k): v for k, v in obj.items()
            if isinstance(k, str) and isinstance(v, (bool, int, float, str))}


def _split_checkpoint(obj: Any, path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Find the state_dict (top level or under 'net') and the plain-valued extra keys."""
    if not isinstance(obj, dict):
        raise _corrupt(path, f"top-level object is a {type(obj).__name__}, not a dict")
    for key in _STATE_DICT_KEYS:
        if isinstance(obj.get(key), dict):
            return obj[key], _plain_meta({k: v for k, v in obj.items() if k != key})
    if obj and all(isinstance(v, _TensorRef) for v in obj.values()):
        return obj, {}
    raise CheckpointError(
        f"{path}: no state_dict found; expected a state_dict or a dict with it under one of "
        f"{list(_STATE_DICT_KEYS)} (found keys {list(obj)[:10]}). Save with "
        "`torch.save({'net': model.state_dict()}, path)`.")


def load_torch_checkpoint(path: str | os.PathLike, model_name: str = "small_vgg",
                          num_classes: int | None = None) -> tuple[Variables, dict[str, Any]]:
    """Import a ``torch.save`` zip checkpoint without torch and without executing its code.

    Conv weights OIHW -> kernels HWIO, Linear (out, in) -> (in, out), BN weight/bias ->
    params scale/bias, running_mean/var -> batch_stats mean/var. ``num_classes=None`` infers
    it from the classifier weight (shape (classes, features)).

    Everything is checked before tensor data is read: the pickle (whitelisted globals only),
    each storage's size against the zip directory, each tensor's shape/stride/offset against its
    storage, the keys, shapes and dtypes against the model, and the total bytes to read against
    ``_BUDGET_FACTOR`` x the model's float32 size (+1 MiB). Weights must be finite.

    Returns ``(variables, meta)``: variables ``{'params', 'batch_stats'}`` of float32 numpy
    arrays shaped like ``init_variables(get_model(model_name, num_classes))``; meta has
    ``model``, ``num_classes``, ``source`` and the checkpoint's plain extra keys (e.g. acc, epoch).
    """
    path = Path(path)
    if model_name not in MODEL_MAPPINGS:
        raise CheckpointError(f"no PyTorch mapping for model {model_name!r}; "
                              f"available: {sorted(MODEL_MAPPINGS)}")
    mapping = MODEL_MAPPINGS[model_name]
    with _open_torch_archive(path) as archive:
        state_dict, extra = _split_checkpoint(archive.load(), path)
        # Checkpoints saved from nn.DataParallel prefix every key with 'module.'.
        if state_dict and all(isinstance(k, str) and k.startswith("module.") for k in state_dict):
            state_dict = {k[len("module."):]: v for k, v in state_dict.items()}

        # Class count first: its message is more useful than a generic classifier shape mismatch.
        cw = state_dict.get(mapping.classifier_weight)
        if isinstance(cw, _TensorRef) and len(cw.shape) == 2 and cw.shape[0] >= 1:
            ckpt_classes = int(cw.shape[0])
            if num_classes is None:
                num_classes = ckpt_classes
            elif ckpt_classes != num_classes:
                raise _class_mismatch(path, ckpt_classes, num_classes,
                                      f" ('{mapping.classifier_weight}' has shape {cw.shape})")
        elif num_classes is None:
            raise CheckpointError(
                f"{path}: cannot infer the class count: missing or malformed "
                f"'{mapping.classifier_weight}' (expected shape (classes, features)). "
                f"Is this a {model_name} checkpoint? Pass the right --model.")

        template = _template(model_name, num_classes)
        wanted: list[tuple[str, tuple[str, ...], str, _TensorRef]] = []
        for key, value in state_dict.items():  # state_dict order -> first mismatch reported
            if not isinstance(key, str):
                raise _corrupt(path, f"state_dict key {key!r:.80} is not a string")
            if key.endswith(mapping.ignored_suffixes):
                continue
            if key not in mapping.entries:
                raise CheckpointError(
                    f"{path}: architecture mismatch: unexpected key '{key}' in the checkpoint, not part "
                    f"of {model_name}. Pass the --model the checkpoint was trained with.")
            flax_path, layout = mapping.entries[key]
            expected = _TORCH_SHAPE[layout](template[flax_path])
            if not isinstance(value, _TensorRef):
                raise CheckpointError(f"{path}: architecture mismatch: '{key}' is a "
                                      f"{type(value).__name__}, expected a tensor of shape {expected}.")
            if value.shape != expected or not _is_real_float(value.dtype):
                raise CheckpointError(
                    f"{path}: architecture mismatch at '{key}': the checkpoint has shape "
                    f"{value.shape} ({value.dtype}) but {model_name} expects {expected} (float). "
                    f"Pass the --model the checkpoint was trained with.")
            wanted.append((key, flax_path, layout, value))
        found = {flax_path for _, flax_path, _, _ in wanted}
        for key, (flax_path, _) in mapping.entries.items():
            if flax_path not in found:
                raise CheckpointError(
                    f"{path}: architecture mismatch: key '{key}' is missing from the checkpoint. "
                    f"Pass the --model the checkpoint was trained with, or a complete state_dict.")

        storages = {ref.storage.key: ref.storage.nbytes for _, _, _, ref in wanted}
        total, budget = sum(storages.values()), _budget(template)
        if total > budget:
            raise CheckpointError(
                f"{path}: refusing to read {total} bytes of tensor storage: a {model_name} with "
                f"{num_classes} classes needs at most {budget} (corrupt or crafted file). Re-save "
                "only the model's state_dict: `torch.save({'net': model.state_dict()}, path)`.")

        flat: dict[tuple[str, ...], np.ndarray] = {}
        for key, flax_path, layout, ref in wanted:
            with np.errstate(over="ignore"):  # float64 beyond float32's range -> Inf, refused next
                arr = np.ascontiguousarray(_TO_FLAX[layout](archive.tensor(ref)), dtype=np.float32)
            widened = "" if ref.dtype.itemsize <= 4 else " (as float32)"
            _check_finite(path, arr, f"tensor '{key}' ({'/'.join(flax_path)}){widened}")
            flat[flax_path] = arr
    _check_tree(flat, template, path)
    meta = {**extra, "model": model_name, "num_classes": int(num_classes), "source": "pytorch"}
    return _unflatten(flat), meta


def _check_tree(flat: dict[tuple[str, ...], np.ndarray],
                template: dict[tuple[str, ...], tuple[int, ...]], path: Path) -> None:
    """Raise unless ``flat`` has exactly the template's variables and shapes."""
    for p, shape in template.items():
        if p not in flat:
            raise CheckpointError(f"{path}: variable '{'/'.join(p)}' {shape} is missing.")
        if tuple(flat[p].shape) != shape:
            raise CheckpointError(f"{path}: variable '{'/'.join(p)}' has shape "
                                  f"{tuple(flat[p].shape)}, the model expects {shape}.")
    extra = [p for p in flat if p not in template]
    if extra:
        raise CheckpointError(f"{path}: unexpected variable '{'/'.join(extra[0])}' for this model.")


# --------------------------------------------------------------------------------------
# ibau-jax's own format: .npz + JSON meta, no pickles
# --------------------------------------------------------------------------------------


def _fsync_dir(directory: Path) -> None:
    # Makes the rename durable; not possible on every platform/filesystem.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(path: str | os.PathLike, variables: Variables, meta: dict[str, Any]) -> None:
    """Atomically write ``variables`` and JSON-serialisable ``meta`` to one ``.npz``.

    Entries are '/'-joined variable paths (e.g. ``params/conv0/kernel``, float16/32/64 arrays
    of any shape; bfloat16, which .npy cannot describe, is stored as the float32 of the same
    values) plus ``__meta__`` (uint8 utf-8 JSON). ``meta`` needs ``model`` and ``num_classes``;
    ``format`` is set here. The file is replaced only once fully written and fsynced.
    """
    path = Path(path)
    for key in ("model", "num_classes"):
        if key not in meta:
            raise CheckpointError(f"meta must contain '{key}' (got keys {sorted(meta)}); "
                                  "pass e.g. meta={'model': 'small_vgg', 'num_classes': 10}.")
    meta = {**meta, "format": FORMAT_VERSION}
    try:
        meta_bytes = json.dumps(meta, sort_keys=True).encode("utf-8")
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"meta is not JSON-serialisable: {e}. Use plain numbers/strings.") from None
    arrays: dict[str, np.ndarray] = {}
    for p, leaf in _flatten(dict(variables)).items():
        name = "/".join(p)
        arr = np.asarray(leaf)
        if arr.dtype == ml_dtypes.bfloat16:
            arr = arr.astype(np.float32)  # exact
        if not _is_real_float(arr.dtype):
            raise CheckpointError(f"variable '{name}' has dtype {arr.dtype}; checkpoints hold real "
                                  "floating weights (float16/bfloat16/float32/float64): cast it first")
        arrays[name] = arr
    if _META_KEY in arrays:
        raise CheckpointError(f"variable name '{_META_KEY}' is reserved")
    arrays[_META_KEY] = np.frombuffer(meta_bytes, np.uint8)

    atomic_write(path, lambda f: np.savez(f, **arrays))  # a file object: numpy does not append '.npz'


def _umask() -> int:
    """The process umask, without a window in which it is 0 (read from /proc where possible)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o077)  # the most restrictive value while we look, should another thread create a file
    os.umask(old)
    return old


def _new_file_mode(path: Path) -> int:
    """The mode ``open(path, "w")`` would leave: the existing file's, else 0o666 & ~umask."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return 0o666 & ~_umask()


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None]) -> None:
    """Write a file so that readers see the old one or the complete new one, never a part.

    ``write(f)`` fills a binary temp file in the same folder; it gets the mode a plain
    ``open(path, "w")`` would give (the replaced file's, else 0o666 & ~umask, where ``mkstemp``
    alone would leave 0600), is fsynced and renamed over ``path`` (``os.replace``), then the
    folder is fsynced; on any error the temp file goes.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = _new_file_mode(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _npy_header(f: Any, name: str, corrupt: Callable[[str], CheckpointError]) -> tuple[tuple[int, ...], bool, np.dtype]:
    """``(shape, fortran_order, dtype)`` of the ``.npy`` member open in ``f``; nothing else is read."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(f)
    raise corrupt(f"entry '{name}' has unsupported .npy version {version}")


def _read_npz(path: Path, corrupt: Callable[[str], CheckpointError],
              check_meta: Callable[[dict[str, Any]], dict[tuple[str, ...], tuple[int, ...]]],
              ) -> tuple[dict[tuple[str, ...], np.ndarray], dict[str, Any], dict[tuple[str, ...], tuple[int, ...]]]:
    """Read a ``save_checkpoint`` file member by member, every header checked before its data.

    ``check_meta(meta)`` validates the meta and returns the expected shapes; each array must
    have one of those paths and shapes, a real floating dtype, and exactly the member size its
    header implies, so no more than the model's own bytes are read (in bounded chunks).
    """
    with zipfile.ZipFile(path) as zf:
        infos = zf.infolist()
        names = [i.filename for i in infos]
        if len(set(names)) != len(names):
            raise corrupt("duplicate entries")
        for n in names:
            if not n.endswith(".npy"):
                raise corrupt(f"entry '{n}' is not a .npy array")
        members = {i.filename[: -len(".npy")]: i for i in infos}
        if _META_KEY not in members:
            raise corrupt(f"no '{_META_KEY}' entry")
        info = members.pop(_META_KEY)
        with zf.open(info) as f:
            shape, fortran, dtype = _npy_header(f, _META_KEY, corrupt)
            if dtype != np.uint8 or len(shape) != 1 or shape[0] > _MAX_META_BYTES:
                raise corrupt(f"'{_META_KEY}' is {dtype} of shape {shape}, not a 1-D uint8 array of "
                              f"at most {_MAX_META_BYTES} bytes of UTF-8 JSON")
            raw = _read_member(zf, info, shape[0], corrupt, f).tobytes()
        try:
            meta = json.loads(raw.decode("utf-8"))
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            raise corrupt(f"meta is not valid JSON: {e}") from None
        template = check_meta(meta)

        flat: dict[tuple[str, ...], np.ndarray] = {}
        for name, info in members.items():
            p = tuple(name.split("/"))
            if p not in template:
                raise CheckpointError(f"{path}: unexpected variable '{name}' for model {meta['model']!r}.")
            with zf.open(info) as f:
                shape, fortran, dtype = _npy_header(f, name, corrupt)
                if not _is_real_float(dtype):
                    raise CheckpointError(
                        f"{path}: variable '{name}' has dtype {dtype}, not a real floating type "
                        "(float16/bfloat16/float32/float64). Re-create the file with save_checkpoint "
                        "from the model's weights.")
                if shape != template[p]:
                    raise CheckpointError(f"{path}: variable '{name}' has shape {shape}, the model "
                                          f"expects {template[p]}.")
                nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
                if info.file_size != f.tell() + nbytes:
                    raise corrupt(f"entry '{name}' holds {info.file_size} bytes, its header implies "
                                  f"{f.tell() + nbytes}")
                data = _read_member(zf, info, nbytes, corrupt, f)
            arr = np.frombuffer(data, dtype).reshape(shape, order="F" if fortran else "C")
            flat[p] = arr.astype(dtype.newbyteorder("="), copy=False)
            _check_finite(path, flat[p], f"variable '{name}'")
    return flat, meta, template


def load_checkpoint(path: str | os.PathLike, model_name: str | None = None,
                    num_classes: int | None = None) -> tuple[Variables, dict[str, Any]]:
    """Load a ``save_checkpoint`` ``.npz`` (never unpickles).

    Returns ``(variables, meta)`` with the arrays' values and dtypes as saved (native byte
    order); checks that meta has ``format``, ``model`` (str) and ``num_classes`` (int >= 1),
    that the tree matches that model, that every array is real floating point and finite.
    ``model_name`` / ``num_classes``, when given, must match the meta; that is checked before
    any weight is read.
    """
    path = Path(path)
    _check_file(path)

    def corrupt(why: str) -> CheckpointError:
        return CheckpointError(f"{path}: corrupt or not an ibau-jax checkpoint ({why}). "
                               "Re-create it with ibau_jax.checkpoints.save_checkpoint.")

    def check_meta(meta: Any) -> dict[tuple[str, ...], tuple[int, ...]]:
        if not isinstance(meta, dict):
            raise corrupt("meta is not a JSON object")
        fmt = meta.get("format")
        if type(fmt) is not int or fmt != FORMAT_VERSION:
            raise CheckpointError(f"{path}: unsupported checkpoint format {fmt!r}; this "
                                  f"version of ibau-jax reads format {FORMAT_VERSION}. Re-save it.")
        for key in ("model", "num_classes"):
            if key not in meta:
                raise corrupt(f"meta lacks '{key}'")
        ncls, model = meta["num_classes"], meta["model"]
        if type(ncls) is not int or ncls < 1 or not isinstance(model, str):
            raise corrupt(f"meta has model={model!r}, num_classes={ncls!r}")
        if model_name is not None and model != model_name:
            raise CheckpointError(f"{path}: checkpoint is for model {model!r}, not {model_name!r}. "
                                  f"Pass --model {model}.")
        if num_classes is not None and ncls != num_classes:
            raise _class_mismatch(path, ncls, num_classes)
        return _template(model, ncls)

    try:
        flat, meta, template = _read_npz(path, corrupt, check_meta)
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError, KeyError,
            NotImplementedError) as e:
        raise corrupt(f"{type(e).__name__}: {e}") from None
    _check_tree(flat, template, path)
    return _unflatten(flat), meta


def load_model(path: str | os.PathLike, model_name: str = "small_vgg",
               num_classes: int | None = None) -> tuple[Variables, dict[str, Any]]:
    """Load weights for ``model_name``: ``.npz`` -> own format, anything else -> torch zip.

    ``num_classes=None`` accepts the checkpoint's class count; otherwise it must match (the
    CLI passes the data set's). Returns ``(variables, meta)`` as ``load_checkpoint`` /
    ``load_torch_checkpoint``.
    """
    path = Path(path)
    if path.suffix.lower() != ".npz":
        return load_torch_checkpoint(path, model_name, num_classes)
    return load_checkpoint(path, model_name, num_classes)
