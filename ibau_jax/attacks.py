"""Backdoor triggers as pure ``jnp`` functions on NHWC batches in [0, 1].

Every all-to-one trigger of the original I-BAU code is one rule,

    poisoned = clip(x * keep + pattern, 0, 1)

with a per-pixel ``keep`` mask and an additive ``pattern`` (both (H, W, C)):

- ``badnets``: keep = 0 and pattern = 1 on a 4x4 patch at rows/cols 27..30, all channels;
- ``trojan_sq``, ``trojan_wm``, ``l2_inv``: keep = 1, pattern = PNG / 255;
- ``l0_inv``: keep = 1 - mask (mask.npy, 3x32x32, transposed to HWC), pattern = PNG / 255.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

FILE_TRIGGERS = ("trojan_sq", "trojan_wm", "l2_inv", "l0_inv")
ATTACKS = ("badnets",) + FILE_TRIGGERS


class AttackError(ValueError):
    """Unknown attack, bad target, or a missing/corrupt trigger file."""


@dataclasses.dataclass(frozen=True)
class Trigger:
    """A trigger ``x -> clip(x * keep + pattern, 0, 1)``; ``keep``/``pattern`` are (H, W, C) float32."""

    name: str
    keep: np.ndarray
    pattern: np.ndarray

    def __call__(self, x: jax.Array) -> jax.Array:
        return apply_trigger(x, self.keep, self.pattern)


def apply_trigger(x: jax.Array, keep: jax.Array, pattern: jax.Array) -> jax.Array:
    """Poison a batch: x (N, H, W, C) or (H, W, C) in [0, 1] -> same shape, clipped to [0, 1]."""
    return jnp.clip(x * keep + pattern, 0.0, 1.0)


def badnets(image_shape: tuple[int, int, int] = (32, 32, 3), size: int = 4) -> Trigger:
    """The original BadNets patch: ones on rows/cols [H-1-size, H-1) x [W-1-size, W-1)."""
    h, w, c = image_shape
    keep = np.ones(image_shape, np.float32)
    pattern = np.zeros(image_shape, np.float32)
    rows, cols = slice(h - 1 - size, h - 1), slice(w - 1 - size, w - 1)
    keep[rows, cols, :] = 0.0
    pattern[rows, cols, :] = 1.0
    return Trigger("badnets", keep, pattern)


def _read_png(path: Path, image_shape: tuple[int, int, int]) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise AttackError(
            f"trigger file {path} not found; pass --trigger-dir pointing at the folder that holds "
            f"the original I-BAU triggers (e.g. ../shared/ibau-original/triggers)")
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.float32)
    except (UnidentifiedImageError, OSError) as e:
        raise AttackError(f"trigger file {path} is not a readable image ({e}); restore the original PNG") from e
    if arr.shape != tuple(image_shape):
        raise AttackError(f"trigger {path} has shape {arr.shape}, expected {tuple(image_shape)} "
                          f"(the images being poisoned); use a trigger made for this data set")
    return arr / 255.0


def load_trigger(name: str, trigger_dir: str | os.PathLike | None = None,
                 image_shape: tuple[int, int, int] = (32, 32, 3)) -> Trigger:
    """Build the trigger ``name``; file-based triggers read ``trigger_dir/<name>.png`` (and ``mask.npy``)."""
    if name not in ATTACKS:
        raise AttackError(f"unknown attack {name!r}; choose one of {', '.join(ATTACKS)}")
    if name == "badnets":
        return badnets(image_shape)
    if trigger_dir is None:
        raise AttackError(f"attack {name!r} needs its trigger file: pass --trigger-dir "
                          f"(the folder holding {name}.png, e.g. ../shared/ibau-original/triggers)")
    trigger_dir = Path(trigger_dir)
    pattern = _read_png(trigger_dir / f"{name}.png", image_shape).astype(np.float32)
    keep = np.ones(image_shape, np.float32)
    if name == "l0_inv":
        mask_path = trigger_dir / "mask.npy"
        if not mask_path.is_file():
            raise AttackError(f"l0_inv needs {mask_path} (the 3x32x32 pixel mask); pass the --trigger-dir that holds it")
        try:
            mask = np.load(mask_path, allow_pickle=False)
        except (ValueError, OSError) as e:
            raise AttackError(f"{mask_path} is corrupt ({e}); restore the original mask.npy") from e
        c, h, w = image_shape[2], image_shape[0], image_shape[1]
        if mask.shape != (c, h, w):
            raise AttackError(f"{mask_path} has shape {mask.shape}, expected {(c, h, w)} (CHW)")
        keep = (1.0 - np.transpose(mask, (1, 2, 0))).astype(np.float32)
    return Trigger(name, keep, pattern)


def check_target(target: int, num_classes: int) -> int:
    """Validate an all-to-one target class."""
    if not 0 <= int(target) < num_classes:
        raise AttackError(f"target class {target} is outside 0..{num_classes - 1}; pass --target in that range")
    return int(target)


def poisoned_test_set(x: np.ndarray, y: np.ndarray, trigger: Trigger, target: int) -> tuple[np.ndarray, np.ndarray]:
    """The ASR set of the original code: every image triggered, every label set to ``target``.

    x: (N, H, W, C) float32 in [0, 1]; returns (triggered x, targets (N,) int32). Keep ``y`` to
    compute the non-target ASR convention (``metrics.attack_success``).
    """
    xt = np.asarray(jax.jit(trigger.__call__)(jnp.asarray(x)))
    return xt, np.full(len(y), target, np.int32)
