"""The builders of the registered attacks: each turns an ``AttackSpec`` plus options into an ``Attack``.

A builder is ``build(spec, *, option=default, ...) -> Attack``; its keyword-only parameters are
the attack's options and their defaults (``attacks.get`` checks unknown options against them).

Keep/pattern triggers, ``clip(x * keep + pattern, 0, 1)`` with (H, W, C) arrays:

- ``badnets`` / ``badnets_all2all``: keep = 0, pattern = 1 on a size x size patch at rows/cols
  [H-1-size, H-1) x [W-1-size, W-1) (27..30 for 32x32, size 4), all channels;
- ``blend``: keep = 1 - alpha, pattern = alpha * P (P: uniform noise from ``seed``, or an image file);
- ``sig`` (clean label): keep = 1, pattern = delta * sin(2 pi j freq / W) on column j;
- the original I-BAU file triggers ``trojan_sq``, ``trojan_wm``, ``l2_inv``: keep = 1,
  pattern = ``<trigger_dir>/<name>.png`` / 255; ``l0_inv``: the same with keep = 1 - mask,
  ``mask.npy`` (C, H, W) transposed to (H, W, C).

Warp trigger: ``wanet``, a fixed smooth warping field (``attacks.warp.wanet_grid``).

Multi-trigger: ``multi_trigger``, three all-to-one triggers with their own targets (the
paper's multi-target setting "three triggers, each sending its images to its own class"):
the BadNets patch -> target, a 4x4 black-and-white checkerboard at rows/cols 1..4 -> target + 1,
Blend noise (alpha 0.2) -> target + 2 (mod num_classes).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from .base import Attack, AttackError, AttackSpec
from .warp import wanet_grid

FILE_TRIGGERS = ("trojan_sq", "trojan_wm", "l2_inv", "l0_inv")


def badnets_patch(image_shape: tuple[int, int, int] = (32, 32, 3), size: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """(keep, pattern) (H, W, C) float32 of the original BadNets patch: ones on rows/cols [H-1-size, H-1)."""
    h, w, _ = image_shape
    keep = np.ones(image_shape, np.float32)
    pattern = np.zeros(image_shape, np.float32)
    rows, cols = slice(h - 1 - size, h - 1), slice(w - 1 - size, w - 1)
    keep[rows, cols, :] = 0.0
    pattern[rows, cols, :] = 1.0
    return keep, pattern


def _read_png(path: Path, image_shape: tuple[int, int, int]) -> np.ndarray:
    """A trigger PNG as (H, W, 3) float32 in [0, 1] (pixels / 255); AttackError when missing/corrupt."""
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


def read_file_trigger(name: str, trigger_dir, image_shape: tuple[int, int, int] = (32, 32, 3)
                      ) -> tuple[np.ndarray, np.ndarray]:
    """(keep, pattern) (H, W, C) float32 of an original I-BAU file trigger (one of ``FILE_TRIGGERS``).

    pattern = ``trigger_dir/<name>.png`` / 255; keep = 1, or for ``l0_inv`` 1 - mask with
    ``trigger_dir/mask.npy`` (C, H, W) transposed to (H, W, C).
    """
    if trigger_dir is None:
        raise AttackError(f"attack {name!r} needs its trigger file: pass --trigger-dir "
                          f"(the folder holding {name}.png, e.g. ../shared/ibau-original/triggers)")
    trigger_dir = Path(trigger_dir)
    pattern = _read_png(trigger_dir / f"{name}.png", image_shape).astype(np.float32)
    keep = np.ones(image_shape, np.float32)
    if name == "l0_inv":
        mask_path = trigger_dir / "mask.npy"
        if not mask_path.is_file():
            raise AttackError(f"l0_inv needs {mask_path} (the 3x32x32 pixel mask); "
                              f"pass the --trigger-dir that holds it")
        try:
            mask = np.load(mask_path, allow_pickle=False)
        except (ValueError, OSError) as e:
            raise AttackError(f"{mask_path} is corrupt ({e}); restore the original mask.npy") from e
        c, h, w = image_shape[2], image_shape[0], image_shape[1]
        if mask.shape != (c, h, w):
            raise AttackError(f"{mask_path} has shape {mask.shape}, expected {(c, h, w)} (CHW)")
        keep = (1.0 - np.transpose(mask, (1, 2, 0))).astype(np.float32)
    return keep, pattern


def _read_resized(path: Path, image_shape: tuple[int, int, int]) -> np.ndarray:
    """An image file as (H, W, C) float32 in [0, 1], bilinearly resized to the images' size."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise AttackError(f"blend pattern file {path} not found; pass pattern_path= an existing image")
    h, w, c = image_shape
    try:
        with Image.open(path) as im:
            im = im.convert("RGB" if c == 3 else "L")
            if im.size != (w, h):
                im = im.resize((w, h), Image.BILINEAR)
            arr = np.asarray(im, dtype=np.float32)
    except (UnidentifiedImageError, OSError) as e:
        raise AttackError(f"blend pattern file {path} is not a readable image ({e})") from e
    return (arr.reshape(h, w, c) / 255.0).astype(np.float32)


# --------------------------------------------------------------------------- builders


def build_badnets(spec: AttackSpec, *, size: int = 4) -> Attack:
    """BadNets, all-to-one (label -> target)."""
    keep, pattern = badnets_patch(spec.image_shape, int(size))
    return spec.attack(keep=keep, pattern=pattern)


def build_badnets_all2all(spec: AttackSpec, *, size: int = 4) -> Attack:
    """BadNets, all-to-all (label y -> (y + 1) % num_classes)."""
    keep, pattern = badnets_patch(spec.image_shape, int(size))
    return spec.attack(all_to_all=True, keep=keep, pattern=pattern)


def build_file_trigger(spec: AttackSpec) -> Attack:
    """An original I-BAU file trigger (``spec.name`` in ``FILE_TRIGGERS``), all-to-one."""
    keep, pattern = read_file_trigger(spec.name, spec.trigger_dir, spec.image_shape)
    return spec.attack(keep=keep, pattern=pattern)


def build_blend(spec: AttackSpec, *, alpha: float = 0.2, pattern_path=None) -> Attack:
    """Blend: x' = (1 - alpha) x + alpha P; P = uniform noise from ``spec.seed`` or the image at pattern_path."""
    alpha = float(alpha)
    if not 0.0 < alpha <= 1.0:
        raise AttackError(f"blend alpha {alpha} is outside the valid range (0, 1]")
    if pattern_path is None:
        pat = np.random.default_rng(spec.seed).random(spec.image_shape, dtype=np.float32)
    else:
        pat = _read_resized(Path(pattern_path), spec.image_shape)
    keep = np.full(spec.image_shape, 1.0 - alpha, np.float32)
    return spec.attack(keep=keep, pattern=(np.float32(alpha) * pat).astype(np.float32),
                       params={"seed": spec.seed})


def build_sig(spec: AttackSpec, *, delta: float = 20.0 / 255.0, freq: float = 6.0) -> Attack:
    """SIG (clean label): add delta * sin(2 pi j freq / W) to column j of every row and channel."""
    w = spec.image_shape[1]
    j = np.arange(w, dtype=np.float64)
    row = float(delta) * np.sin(2.0 * np.pi * j * float(freq) / w)
    pattern = np.broadcast_to(row[None, :, None], spec.image_shape).astype(np.float32)
    return spec.attack(clean_label=True, keep=np.ones(spec.image_shape, np.float32), pattern=pattern)


def build_wanet(spec: AttackSpec, *, k: int = 4, s: float = 0.5, grid_rescale: float = 1.0,
                noise: bool = True, cross_ratio: float = 2.0) -> Attack:
    """WaNet: warp through ``wanet_grid(k, s, grid_rescale, spec.seed)``; noise mode adds
    ``cross_ratio`` randomly warped, correctly labelled images per poisoned image."""
    k, s = int(k), float(s)
    if k < 2:
        raise AttackError(f"wanet k (control grid size) must be at least 2, got {k}")
    cross = float(cross_ratio)
    if cross < 0:
        raise AttackError(f"wanet cross_ratio must be >= 0, got {cross}")
    grid = wanet_grid(spec.image_shape, k, s, float(grid_rescale), spec.seed)
    return spec.attack(grid=grid, noise=bool(noise), cross_ratio=cross, params={"seed": spec.seed})


def checkerboard_patch(image_shape: tuple[int, int, int] = (32, 32, 3), size: int = 4,
                       corner: tuple[int, int] = (1, 1)) -> tuple[np.ndarray, np.ndarray]:
    """(keep, pattern) (H, W, C) float32 of a size x size black-and-white checkerboard at ``corner``
    (top-left pixel; white where row + column is even), all channels."""
    keep = np.ones(image_shape, np.float32)
    pattern = np.zeros(image_shape, np.float32)
    r, c = corner
    keep[r:r + size, c:c + size, :] = 0.0
    board = (np.add.outer(np.arange(size), np.arange(size)) % 2 == 0).astype(np.float32)
    pattern[r:r + size, c:c + size, :] = board[:, :, None]
    return keep, pattern


def build_multi_trigger(spec: AttackSpec, *, size: int = 4, alpha: float = 0.2) -> Attack:
    """Three triggers, three targets: BadNets patch -> t, checkerboard (top-left) -> t+1, Blend -> t+2."""
    if spec.num_classes < 3:
        raise AttackError(f"multi_trigger needs at least 3 classes (one target per trigger), got {spec.num_classes}")
    size = int(size)
    h, w, _ = spec.image_shape
    if not 1 <= size <= min(h, w) // 2 - 1:
        raise AttackError(f"multi_trigger size {size} does not fit two corner patches in {h}x{w} images")
    sub = lambda i, name: dataclasses.replace(spec, name=name, target=(spec.target + i) % spec.num_classes)
    keep, pattern = checkerboard_patch(spec.image_shape, size)
    parts = (build_badnets(sub(0, "badnets"), size=size),
             sub(1, "checkerboard").attack(keep=keep, pattern=pattern),
             build_blend(sub(2, "blend"), alpha=alpha))
    return spec.attack(parts=parts, params={"seed": spec.seed, "targets": [p.target for p in parts]})
