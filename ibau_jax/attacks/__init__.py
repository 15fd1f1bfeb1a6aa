"""Backdoor triggers as pure ``jnp`` functions on NHWC batches in [0, 1].

Every all-to-one trigger of the original I-BAU code is one rule,

    poisoned = clip(x * keep + pattern, 0, 1)

with a per-pixel ``keep`` mask and an additive ``pattern`` (both (H, W, C)):

- ``badnets``: keep = 0 and pattern = 1 on a 4x4 patch at rows/cols 27..30, all channels;
- ``trojan_sq``, ``trojan_wm``, ``l2_inv``: keep = 1, pattern = PNG / 255;
- ``l0_inv``: keep = 1 - mask (mask.npy, 3x32x32, transposed to HWC), pattern = PNG / 255.

The poisoning API (``make_attack`` -> ``Attack``, ``poison_dataset``, ``asr_test_set``) adds
all-to-all BadNets, Blend, SIG (clean label) and WaNet; see ``docs/attacks.md`` for every rule.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import os
from pathlib import Path
from typing import Any, NamedTuple

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


# =========================================================================== poisoning API
#
# ``make_attack`` builds an ``Attack`` (trigger + labelling rule); ``poison_dataset`` poisons a
# training set with it, ``asr_test_set`` builds the attack-success-rate evaluation set.

ATTACK_NAMES = ("badnets", "badnets_all2all", "blend", "trojan_sq", "trojan_wm", "l0_inv", "l2_inv",
                "sig", "wanet")

_DEFAULTS: dict[str, dict[str, Any]] = {
    "badnets": {"size": 4},
    "badnets_all2all": {"size": 4},
    "blend": {"alpha": 0.2, "pattern_path": None},
    "trojan_sq": {}, "trojan_wm": {}, "l0_inv": {}, "l2_inv": {},
    "sig": {"delta": 20.0 / 255.0, "freq": 6.0},
    "wanet": {"k": 4, "s": 0.5, "grid_rescale": 1.0, "noise": True, "cross_ratio": 2.0},
}

_CHUNK = 1024  # images per jitted call in the dataset-level helpers


@dataclasses.dataclass(frozen=True, eq=False)
class Attack:
    """A backdoor attack: how to trigger an image and which label the backdoor maps it to.

    Non-warping attacks use ``clip(x * keep + pattern, 0, 1)`` (``keep``/``pattern`` (H, W, C));
    WaNet resamples the image through ``grid`` ((H, W, 2), (x, y) in [-1, 1], align_corners=True).
    ``params`` records the attack's settings (defaults filled in) for logs and docs.
    """

    name: str
    target: int
    num_classes: int
    all_to_all: bool
    clean_label: bool
    image_shape: tuple[int, int, int]
    keep: np.ndarray | None = None
    pattern: np.ndarray | None = None
    grid: np.ndarray | None = None
    noise: bool = False          # WaNet noise mode (random-warp images that keep their labels)
    cross_ratio: float = 0.0     # WaNet: noise images per poisoned image
    params: dict = dataclasses.field(default_factory=dict)

    def apply(self, x: jax.Array) -> jax.Array:
        """Trigger a batch (N, H, W, C) (or one image (H, W, C)) in [0, 1]; pure and jittable."""
        if self.grid is not None:
            return warp(x, jnp.asarray(self.grid))
        return apply_trigger(x, jnp.asarray(self.keep), jnp.asarray(self.pattern))

    __call__ = apply

    def target_labels(self, y):
        """The label the backdoor should produce: ``target`` (all-to-one) or ``(y + 1) % num_classes``."""
        if self.all_to_all:
            return (y + 1) % self.num_classes
        if isinstance(y, jax.Array):
            return jnp.full_like(y, self.target)
        y = np.asarray(y)
        return np.full_like(y, self.target)

    @property
    def trigger(self) -> Trigger:
        """The ``Trigger`` view of a keep/pattern attack (for ``poisoned_test_set``)."""
        if self.keep is None:
            raise AttackError(f"attack {self.name!r} is a warp, not a keep/pattern trigger")
        return Trigger(self.name, self.keep, self.pattern)

    def noise_grids(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """WaNet's ``grid_temps2``: n randomly perturbed copies of ``grid``, (n, H, W, 2) float32.

        grid2 = clip(grid + uniform(-1, 1) / H, -1, 1), a fresh perturbation per image and pixel.
        """
        if self.grid is None:
            raise AttackError(f"attack {self.name!r} has no warping grid (only wanet has a noise mode)")
        h, w, _ = self.image_shape
        ins = rng.uniform(-1.0, 1.0, (n, h, w, 2)).astype(np.float32)
        ins /= np.array([w, h], np.float32)
        return np.clip(self.grid[None] + ins, -1.0, 1.0).astype(np.float32)


class PoisonedSet(NamedTuple):
    """A poisoned training set.

    x: (N, H, W, C) float32 in [0, 1]; y: (N,) labels (dtype of the input labels);
    poisoned_idx: sorted indices of triggered (and, unless clean-label, relabelled) images;
    noise_idx: sorted indices of WaNet noise-mode images (random warp, label kept); empty otherwise.
    """

    x: np.ndarray
    y: np.ndarray
    poisoned_idx: np.ndarray
    noise_idx: np.ndarray


# --------------------------------------------------------------------------- warping (WaNet)


def identity_grid(h: int, w: int) -> np.ndarray:
    """(H, W, 2) float32: grid[i, j] = (x_j, y_i), x/y = linspace(-1, 1) over columns/rows."""
    xs = np.linspace(-1.0, 1.0, w)
    ys = np.linspace(-1.0, 1.0, h)
    gx, gy = np.meshgrid(xs, ys)  # (h, w) each: gx varies along columns
    return np.stack([gx, gy], axis=-1).astype(np.float32)


def _warp_one(img: jax.Array, grid: jax.Array) -> jax.Array:
    """Bilinear ``grid_sample`` (align_corners=True, zero padding) of one image (H, W, C)."""
    h, w = img.shape[0], img.shape[1]
    px = (grid[..., 0] + 1.0) * 0.5 * (w - 1)
    py = (grid[..., 1] + 1.0) * 0.5 * (h - 1)
    x0 = jnp.floor(px)
    y0 = jnp.floor(py)
    wx = (px - x0)[..., None]
    wy = (py - y0)[..., None]

    def tap(yy, xx):
        valid = (xx >= 0) & (xx <= w - 1) & (yy >= 0) & (yy <= h - 1)
        xi = jnp.clip(xx, 0, w - 1).astype(jnp.int32)
        yi = jnp.clip(yy, 0, h - 1).astype(jnp.int32)
        return img[yi, xi] * valid[..., None].astype(img.dtype)

    return ((1 - wy) * ((1 - wx) * tap(y0, x0) + wx * tap(y0, x0 + 1))
            + wy * ((1 - wx) * tap(y0 + 1, x0) + wx * tap(y0 + 1, x0 + 1)))


def warp(x: jax.Array, grid: jax.Array) -> jax.Array:
    """Resample x (N, H, W, C) or (H, W, C) at ``grid`` ((H, W, 2) shared or (N, H, W, 2) per image).

    Equivalent to ``torch.nn.functional.grid_sample(x, grid, mode="bilinear",
    padding_mode="zeros", align_corners=True)``; grid[..., 0] is the column (x) coordinate.
    """
    x = jnp.asarray(x)
    grid = jnp.asarray(grid, x.dtype)
    if x.ndim == 3:
        return _warp_one(x, grid)
    if grid.ndim == 3:
        return jax.vmap(_warp_one, in_axes=(0, None))(x, grid)
    return jax.vmap(_warp_one)(x, grid)


def _bicubic_matrix(n_in: int, n_out: int, a: float = -0.75) -> np.ndarray:
    """(n_out, n_in) matrix of PyTorch's bicubic upsampling with align_corners=True (A = -0.75)."""
    m = np.zeros((n_out, n_in), np.float64)
    scale = (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
    for i in range(n_out):
        real = scale * i
        i0 = math.floor(real)
        t = real - i0
        c1 = lambda z: ((a + 2) * z - (a + 3)) * z * z + 1          # noqa: E731  |z| <= 1
        c2 = lambda z: ((a * z - 5 * a) * z + 8 * a) * z - 4 * a    # noqa: E731  1 < |z| < 2
        for off, wt in zip((-1, 0, 1, 2), (c2(t + 1), c1(t), c1(1 - t), c2(2 - t))):
            m[i, min(max(i0 + off, 0), n_in - 1)] += wt
    return m


def wanet_grid(image_shape: tuple[int, int, int], k: int = 4, s: float = 0.5,
               grid_rescale: float = 1.0, seed: int = 0) -> np.ndarray:
    """WaNet's fixed warping field ``grid_temps`` (H, W, 2) float32.

    ins = uniform(-1, 1) of shape (2, k, k) (numpy default_rng(seed)), ins /= mean|ins|;
    noise = bicubic upsampling of ins to H x W (align_corners=True, as PyTorch);
    grid = clip((identity + s * noise / (W, H)) * grid_rescale, -1, 1).
    """
    h, w, _ = image_shape
    rng = np.random.default_rng(seed)
    ins = rng.uniform(-1.0, 1.0, (2, k, k))
    ins = ins / np.mean(np.abs(ins))
    up = np.einsum("hk,ckl,wl->hwc", _bicubic_matrix(k, h), ins, _bicubic_matrix(k, w))
    disp = s * up / np.array([w, h], np.float64)
    grid = (identity_grid(h, w).astype(np.float64) + disp) * grid_rescale
    return np.clip(grid, -1.0, 1.0).astype(np.float32)


# --------------------------------------------------------------------------- building attacks


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


def make_attack(name: str, *, num_classes: int, target: int = 0,
                image_shape: tuple[int, int, int] = (32, 32, 3),
                trigger_dir: str | os.PathLike | None = None, seed: int = 0, **kw) -> Attack:
    """Build attack ``name`` (one of ``ATTACK_NAMES``); ``kw`` overrides its defaults (``_DEFAULTS``).

    ``seed`` fixes the random parts of the trigger (Blend's noise image, WaNet's warping field);
    ``trigger_dir`` is needed by the file triggers (trojan_sq, trojan_wm, l0_inv, l2_inv).
    """
    if name not in ATTACK_NAMES:
        raise AttackError(f"unknown attack {name!r}; choose one of {', '.join(ATTACK_NAMES)}")
    if int(num_classes) < 2:
        raise AttackError(f"num_classes must be at least 2, got {num_classes}")
    num_classes = int(num_classes)
    target = check_target(target, num_classes)
    image_shape = tuple(int(v) for v in image_shape)
    if len(image_shape) != 3:
        raise AttackError(f"image_shape must be (H, W, C), got {image_shape}")
    unknown = sorted(set(kw) - set(_DEFAULTS[name]))
    if unknown:
        allowed = ", ".join(_DEFAULTS[name]) or "none"
        raise AttackError(f"attack {name!r} has no option(s) {', '.join(unknown)}; its options: {allowed}")
    p = {**_DEFAULTS[name], **kw}
    common = dict(name=name, target=target, num_classes=num_classes, image_shape=image_shape)
    h, w, c = image_shape

    if name in ("badnets", "badnets_all2all"):
        trig = badnets(image_shape, int(p["size"]))
        return Attack(**common, all_to_all=name == "badnets_all2all", clean_label=False,
                      keep=trig.keep, pattern=trig.pattern, params=p)
    if name in FILE_TRIGGERS:
        trig = load_trigger(name, trigger_dir, image_shape)
        return Attack(**common, all_to_all=False, clean_label=False, keep=trig.keep,
                      pattern=trig.pattern, params=p)
    if name == "blend":
        alpha = float(p["alpha"])
        if not 0.0 < alpha <= 1.0:
            raise AttackError(f"blend alpha {alpha} is outside the valid range (0, 1]")
        if p["pattern_path"] is None:
            pat = np.random.default_rng(seed).random(image_shape, dtype=np.float32)
        else:
            pat = _read_resized(Path(p["pattern_path"]), image_shape)
        keep = np.full(image_shape, 1.0 - alpha, np.float32)
        return Attack(**common, all_to_all=False, clean_label=False, keep=keep,
                      pattern=(np.float32(alpha) * pat).astype(np.float32), params={**p, "seed": seed})
    if name == "sig":
        j = np.arange(w, dtype=np.float64)
        row = float(p["delta"]) * np.sin(2.0 * np.pi * j * float(p["freq"]) / w)
        pattern = np.broadcast_to(row[None, :, None], image_shape).astype(np.float32)
        return Attack(**common, all_to_all=False, clean_label=True,
                      keep=np.ones(image_shape, np.float32), pattern=pattern, params=p)
    # wanet
    k, s = int(p["k"]), float(p["s"])
    if k < 2:
        raise AttackError(f"wanet k (control grid size) must be at least 2, got {k}")
    cross = float(p["cross_ratio"])
    if cross < 0:
        raise AttackError(f"wanet cross_ratio must be >= 0, got {cross}")
    grid = wanet_grid(image_shape, k, s, float(p["grid_rescale"]), seed)
    return Attack(**common, all_to_all=False, clean_label=False, grid=grid, noise=bool(p["noise"]),
                  cross_ratio=cross, params={**p, "seed": seed})


# --------------------------------------------------------------------------- data sets


def _check_images(x: np.ndarray, y: np.ndarray, attack: Attack, where: str) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x)
    y = np.asarray(y)
    if x.ndim != 4 or tuple(x.shape[1:]) != attack.image_shape:
        raise AttackError(f"{where}: x must be (N, {', '.join(map(str, attack.image_shape))}) for attack "
                          f"{attack.name!r}, got {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise AttackError(f"{where}: x must be float images in [0, 1], got dtype {x.dtype} "
                          f"(convert uint8 with ibau_jax.data.to_float)")
    if y.shape != (x.shape[0],):
        raise AttackError(f"{where}: y must be ({x.shape[0]},) labels, got {y.shape}")
    if len(y) and (y.min() < 0 or y.max() >= attack.num_classes):
        raise AttackError(f"{where}: labels must lie in 0..{attack.num_classes - 1}, "
                          f"got {y.min()}..{y.max()}")
    return x.astype(np.float32, copy=False), y


def _apply_batched(fn, *arrays: np.ndarray) -> np.ndarray:
    jf = jax.jit(fn)
    n = len(arrays[0])
    out = [np.asarray(jf(*(jnp.asarray(a[i:i + _CHUNK]) for a in arrays))) for i in range(0, n, _CHUNK)]
    return np.concatenate(out) if out else np.asarray(arrays[0], np.float32)


def _check_ratio(ratio, what: str) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not math.isfinite(ratio) \
            or not 0.0 < float(ratio) <= 1.0:
        raise AttackError(f"{what} {ratio!r} is outside the valid range (0, 1]")
    return float(ratio)


def poison_dataset(x: np.ndarray, y: np.ndarray, attack: Attack, ratio: float, seed: int,
                   noise_ratio: float | None = None) -> PoisonedSet:
    """Poison a training set; returns a new ``PoisonedSet`` (inputs are not modified).

    Exactly ``int(round(ratio * N))`` images are poisoned (N = len(x), all images; Python's
    round-half-to-even), drawn without replacement by ``numpy.random.default_rng(seed)`` from the
    eligible images: label != target (all-to-one dirty label), every image (all-to-all), or only
    images OF the target class (clean-label ``sig``, labels kept). Poisoned images are triggered
    and, unless clean-label, relabelled with ``attack.target_labels``.

    WaNet noise mode (``attack.noise``): ``int(round(noise_ratio * N))`` further images, by
    default ``round(attack.cross_ratio * n_poisoned)`` (WaNet's cross ratio 2), drawn from the
    images not poisoned, get a randomly perturbed warp (``Attack.noise_grids``) and keep their labels.
    """
    x, y = _check_images(x, y, attack, "poison_dataset")
    ratio = _check_ratio(ratio, "poison ratio")
    n = len(x)
    if attack.all_to_all:
        eligible, kind = np.arange(n), "images"
    elif attack.clean_label:
        eligible, kind = np.flatnonzero(y == attack.target), f"images of the target class {attack.target}"
    else:
        eligible, kind = np.flatnonzero(y != attack.target), f"images whose label is not the target {attack.target}"
    n_poison = int(round(ratio * n))
    if n_poison < 1:
        raise AttackError(f"poison ratio {ratio} of {n} images rounds to 0 poisoned images; raise the ratio")
    if n_poison > len(eligible):
        raise AttackError(f"poison ratio {ratio} asks for {n_poison} poisoned images but only "
                          f"{len(eligible)} are eligible ({kind}); lower the ratio")
    rng = np.random.default_rng(seed)
    poisoned = np.sort(rng.choice(eligible, n_poison, replace=False))

    x_out = x.copy()
    y_out = y.copy()
    x_out[poisoned] = _apply_batched(attack.apply, x[poisoned])
    if not attack.clean_label:
        y_out[poisoned] = attack.target_labels(y[poisoned])

    noise = np.zeros(0, np.int64)
    if attack.noise:
        if noise_ratio is None:
            n_noise = int(round(attack.cross_ratio * n_poison))
        else:
            n_noise = int(round(_check_ratio(noise_ratio, "noise ratio") * n))
        rest = np.setdiff1d(np.arange(n), poisoned)
        if n_noise > len(rest):
            raise AttackError(f"wanet noise mode asks for {n_noise} noise images but only {len(rest)} "
                              f"images are not poisoned; lower noise_ratio, cross_ratio or the poison ratio")
        if n_noise:
            noise = np.sort(rng.choice(rest, n_noise, replace=False))
            grids = attack.noise_grids(n_noise, rng)
            x_out[noise] = _apply_batched(warp, x[noise], grids)
    elif noise_ratio is not None:
        raise AttackError(f"noise_ratio applies only to wanet with noise=True, not to {attack.name!r}")
    return PoisonedSet(x_out, y_out, poisoned.astype(np.int64), noise.astype(np.int64))


def asr_test_set(x: np.ndarray, y: np.ndarray, attack: Attack) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Attack-success-rate set: every image triggered (WaNet: the fixed warp, no noise).

    Returns (x_triggered float32, attack_labels (N,) int32 = ``attack.target_labels(y)``,
    keep_mask (N,) bool = y != attack label, the images counted by the non-target ASR).
    """
    x, y = _check_images(x, y, attack, "asr_test_set")
    xt = _apply_batched(attack.apply, x)
    labels = np.asarray(attack.target_labels(y)).astype(np.int32)
    return xt, labels, labels != y
