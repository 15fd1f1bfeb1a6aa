"""Checkpoint I/O that never executes code from the file.

Two formats:

* PyTorch ``torch.save`` zip checkpoints (read only). ``data.pkl`` is parsed by a
  restricted unpickler whose ``find_class`` resolves only a short whitelist of globals
  to numpy stand-ins defined here; torch itself is never imported. Tensors are read
  straight from the zip's raw storage entries and converted to the flax layout.
* ibau-jax's own format: one ``.npz`` (no pickles; loaded with ``allow_pickle=False``)
  with '/'-joined variable paths such as ``params/conv0/kernel`` plus a JSON ``meta``.

Variables are nested dicts ``{'params': {...}, 'batch_stats': {...}}`` of numpy arrays with
the tree of ``init_variables(get_model(model, num_classes))``.
"""
from __future__ import annotations

import collections
import io
import json
import os
import pickle
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import jax
import ml_dtypes  # ships with jax; gives numpy a bfloat16
import numpy as np

from .models import MODELS, get_model, init_variables

__all__ = [
    "CheckpointError",
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


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, unsafe or does not fit the requested model."""


# --------------------------------------------------------------------------------------
# Restricted unpickler for torch zip checkpoints
# --------------------------------------------------------------------------------------


class _StorageType:
    """Stand-in for ``torch.FloatStorage`` etc.: only carries the element dtype."""

    def __init__(self, name: str, dtype: np.dtype) -> None:
        self.name = name
        self.dtype = np.dtype(dtype)

    def __repr__(self) -> str:
        return f"<storage type torch.{self.name}>"


class _StateDict(collections.OrderedDict):
    """Stand-in for ``collections.OrderedDict``; a subclass so BUILD can set ``_metadata``."""


def _rebuild_tensor_v2(storage: Any, storage_offset: Any, size: Any, stride: Any,
                       requires_grad: Any = False, backward_hooks: Any = None,
                       metadata: Any = None) -> np.ndarray:
    """numpy version of ``torch._utils._rebuild_tensor_v2``: a strided view, copied.

    Bounds are checked first because ``as_strided`` would otherwise read arbitrary memory.
    """
    if not isinstance(storage, np.ndarray) or storage.ndim != 1:
        raise CheckpointError("tensor does not reference a storage from this file")
    try:
        offset = int(storage_offset)
        size = tuple(int(s) for s in size)
        stride = tuple(int(s) for s in stride)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"malformed tensor record: {e}") from None
    if len(size) != len(stride) or offset < 0 or any(s < 0 for s in size) or any(s < 0 for s in stride):
        raise CheckpointError(f"malformed tensor record: size {size}, stride {stride}, offset {offset}")
    if 0 in size:
        return np.zeros(size, storage.dtype)
    last = offset + sum((n - 1) * st for n, st in zip(size, stride))
    if last >= storage.size:
        raise CheckpointError(
            f"tensor of size {size} (offset {offset}, stride {stride}) runs past its storage of "
            f"{storage.size} elements (truncated or corrupt storage)")
    item = storage.itemsize
    view = np.lib.stride_tricks.as_strided(
        storage[offset:], shape=size, strides=tuple(st * item for st in stride), writeable=False)
    return np.array(view, copy=True)


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
    **{("torch", name): _StorageType(name, dt) for name, dt in _STORAGE_DTYPES.items()},
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler for ``data.pkl`` that maps whitelisted globals to stand-ins, refuses the rest."""

    def __init__(self, data: bytes, load_storage: Callable[[_StorageType, str, int], np.ndarray]) -> None:
        super().__init__(io.BytesIO(data))
        self._load_storage = load_storage

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _SAFE_GLOBALS[(module, name)]
        except KeyError:
            raise CheckpointError(
                f"refusing to load checkpoint: it references the forbidden global '{module}.{name}', "
                "which could execute code. Only plain state_dicts of tensors are accepted; re-save "
                "the checkpoint as `torch.save({'net': model.state_dict()}, path)` from a trusted "
                "environment.") from None

    def persistent_load(self, pid: Any) -> np.ndarray:
        # torch writes ('storage', storage_type, key, location, numel).
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise CheckpointError(f"unsupported persistent id in checkpoint: {pid!r:.200}")
        _, storage_type, key, _location, numel = pid
        return self._load_storage(storage_type, str(key), int(numel))


_LEGACY_MAGIC_PREFIX = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"


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


def _read_torch_pickle(path: Path) -> Any:
    """Unpickle ``data.pkl`` of a torch zip checkpoint with tensors as numpy arrays."""
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
        with zipfile.ZipFile(path) as zf:
            pkl_names = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
            if len(pkl_names) != 1:
                raise _corrupt(path, "no unique '<prefix>/data.pkl' entry")
            prefix = pkl_names[0][: -len("data.pkl")]
            big_endian = False
            if prefix + "byteorder" in zf.namelist():
                big_endian = zf.read(prefix + "byteorder").strip() == b"big"
            cache: dict[str, np.ndarray] = {}

            def load_storage(storage_type: _StorageType, key: str, numel: int) -> np.ndarray:
                # Tensors sharing a storage (views) must see the same array.
                if key not in cache:
                    try:
                        raw = zf.read(f"{prefix}data/{key}")
                    except KeyError:
                        raise _corrupt(path, f"storage entry 'data/{key}' is missing") from None
                    dtype = storage_type.dtype.newbyteorder(">" if big_endian else "<")
                    if len(raw) < numel * dtype.itemsize:
                        raise _corrupt(path, f"storage 'data/{key}' is truncated: {len(raw)} bytes "
                                             f"for {numel} x {dtype.itemsize}-byte elements")
                    cache[key] = np.frombuffer(raw, dtype, count=numel).astype(storage_type.dtype)
                return cache[key]

            data = zf.read(pkl_names[0])
            return _RestrictedUnpickler(data, load_storage).load()
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, pickle.UnpicklingError, EOFError,
            OSError, ValueError, TypeError, AttributeError, IndexError, KeyError) as e:
        raise _corrupt(path, f"{type(e).__name__}: {e}") from None


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


def _plain_meta(obj: dict) -> dict[str, Any]:
    return {str(k): v for k, v in obj.items()
            if isinstance(k, str) and isinstance(v, (bool, int, float, str))}


def _split_checkpoint(obj: Any, path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Find the state_dict (top level or under 'net') and the plain-valued extra keys."""
    if not isinstance(obj, dict):
        raise _corrupt(path, f"top-level object is a {type(obj).__name__}, not a dict")
    for key in _STATE_DICT_KEYS:
        if isinstance(obj.get(key), dict):
            return obj[key], _plain_meta({k: v for k, v in obj.items() if k != key})
    if obj and all(isinstance(v, np.ndarray) for v in obj.values()):
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

    Returns ``(variables, meta)``: variables ``{'params', 'batch_stats'}`` of float32 numpy
    arrays shaped like ``init_variables(get_model(model_name, num_classes))``; meta has
    ``model``, ``num_classes``, ``source`` and the checkpoint's plain extra keys (e.g. acc, epoch).
    """
    path = Path(path)
    if model_name not in MODEL_MAPPINGS:
        raise CheckpointError(f"no PyTorch mapping for model {model_name!r}; "
                              f"available: {sorted(MODEL_MAPPINGS)}")
    mapping = MODEL_MAPPINGS[model_name]
    state_dict, extra = _split_checkpoint(_read_torch_pickle(path), path)
    # Checkpoints saved from nn.DataParallel prefix every key with 'module.'.
    if state_dict and all(k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module."):]: v for k, v in state_dict.items()}

    # Class count first: its message is more useful than a generic classifier shape mismatch.
    cw = state_dict.get(mapping.classifier_weight)
    if isinstance(cw, np.ndarray) and cw.ndim == 2:
        ckpt_classes = int(cw.shape[0])
        if num_classes is None:
            num_classes = ckpt_classes
        elif ckpt_classes != num_classes:
            raise CheckpointError(
                f"{path}: class count mismatch: the checkpoint has {ckpt_classes} classes "
                f"('{mapping.classifier_weight}' has shape {tuple(cw.shape)}) but the model expects "
                f"{num_classes}. Pass num_classes={ckpt_classes} (--num-classes {ckpt_classes}) or "
                "use a checkpoint trained for this dataset.")
    elif num_classes is None:
        raise CheckpointError(
            f"{path}: cannot infer the class count: missing or malformed "
            f"'{mapping.classifier_weight}' (expected shape (classes, features)). "
            f"Is this a {model_name} checkpoint? Pass the right --model.")

    template = _template(model_name, num_classes)
    flat: dict[tuple[str, ...], np.ndarray] = {}
    for key, value in state_dict.items():  # state_dict order -> first mismatch reported
        if key.endswith(mapping.ignored_suffixes):
            continue
        if key not in mapping.entries:
            raise CheckpointError(
                f"{path}: architecture mismatch: unexpected key '{key}' in the checkpoint, not part "
                f"of {model_name}. Pass the --model the checkpoint was trained with.")
        flax_path, layout = mapping.entries[key]
        expected = _TORCH_SHAPE[layout](template[flax_path])
        if not isinstance(value, np.ndarray):
            raise CheckpointError(f"{path}: architecture mismatch: '{key}' is a "
                                  f"{type(value).__name__}, expected a tensor of shape {expected}.")
        is_float = np.issubdtype(value.dtype, np.floating) or value.dtype == ml_dtypes.bfloat16
        if tuple(value.shape) != expected or not is_float:
            raise CheckpointError(
                f"{path}: architecture mismatch at '{key}': the checkpoint has shape "
                f"{tuple(value.shape)} ({value.dtype}) but {model_name} expects {expected} (float). "
                f"Pass the --model the checkpoint was trained with.")
        flat[flax_path] = np.ascontiguousarray(_TO_FLAX[layout](value), dtype=np.float32)
    for key, (flax_path, _) in mapping.entries.items():
        if flax_path not in flat:
            raise CheckpointError(
                f"{path}: architecture mismatch: key '{key}' is missing from the checkpoint. "
                f"Pass the --model the checkpoint was trained with, or a complete state_dict.")
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

    Entries are '/'-joined variable paths (e.g. ``params/conv0/kernel``, arrays of any shape)
    plus ``__meta__`` (uint8 utf-8 JSON). ``meta`` needs ``model`` and ``num_classes``;
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
        if arr.dtype == object:
            raise CheckpointError(f"variable '{name}' is not a numeric array")
        arrays[name] = arr
    if _META_KEY in arrays:
        raise CheckpointError(f"variable name '{_META_KEY}' is reserved")
    arrays[_META_KEY] = np.frombuffer(meta_bytes, np.uint8)

    atomic_write(path, lambda f: np.savez(f, **arrays))  # a file object: numpy does not append '.npz'


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None]) -> None:
    """Write a file so that readers see the old one or the complete new one, never a part.

    ``write(f)`` fills a binary temp file in the same folder; it is fsynced and renamed over
    ``path`` (``os.replace``), then the folder is fsynced; on any error the temp file goes.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def load_checkpoint(path: str | os.PathLike) -> tuple[Variables, dict[str, Any]]:
    """Load a ``save_checkpoint`` ``.npz`` (never unpickles).

    Returns ``(variables, meta)`` with arrays exactly as saved; checks that meta has
    ``format``, ``model`` and ``num_classes`` and that the tree matches that model.
    """
    path = Path(path)
    _check_file(path)

    def corrupt(why: str) -> CheckpointError:
        return CheckpointError(f"{path}: corrupt or not an ibau-jax checkpoint ({why}). "
                               "Re-create it with ibau_jax.checkpoints.save_checkpoint.")

    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, KeyError) as e:
        raise corrupt(f"{type(e).__name__}: {e}") from None
    if _META_KEY not in arrays:
        raise corrupt(f"no '{_META_KEY}' entry")
    try:
        meta = json.loads(arrays.pop(_META_KEY).astype(np.uint8).tobytes().decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise corrupt(f"meta is not valid JSON: {e}") from None
    if not isinstance(meta, dict):
        raise corrupt("meta is not a JSON object")
    if meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: unsupported checkpoint format {meta.get('format')!r}; this "
                              f"version of ibau-jax reads format {FORMAT_VERSION}. Re-save it.")
    for key in ("model", "num_classes"):
        if key not in meta:
            raise corrupt(f"meta lacks '{key}'")
    if not isinstance(meta["num_classes"], int) or not isinstance(meta["model"], str):
        raise corrupt(f"meta has model={meta['model']!r}, num_classes={meta['num_classes']!r}")
    flat = {tuple(name.split("/")): arr for name, arr in arrays.items()}
    _check_tree(flat, _template(meta["model"], meta["num_classes"]), path)
    return _unflatten(flat), meta


def load_model(path: str | os.PathLike, model_name: str = "small_vgg",
               num_classes: int | None = None) -> tuple[Variables, dict[str, Any]]:
    """Load weights for ``model_name``: ``.npz`` -> own format, anything else -> torch zip.

    ``num_classes=None`` accepts the checkpoint's class count; otherwise it must match.
    Returns ``(variables, meta)`` as ``load_checkpoint`` / ``load_torch_checkpoint``.
    """
    path = Path(path)
    if path.suffix.lower() != ".npz":
        return load_torch_checkpoint(path, model_name, num_classes)
    variables, meta = load_checkpoint(path)
    if meta["model"] != model_name:
        raise CheckpointError(f"{path}: checkpoint is for model {meta['model']!r}, not {model_name!r}. "
                              f"Pass --model {meta['model']}.")
    if num_classes is not None and meta["num_classes"] != num_classes:
        raise CheckpointError(
            f"{path}: class count mismatch: the checkpoint has {meta['num_classes']} classes but the "
            f"model expects {num_classes}. Pass num_classes={meta['num_classes']} "
            f"(--num-classes {meta['num_classes']}).")
    return variables, meta
