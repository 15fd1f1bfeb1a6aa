"""Data sets under an attack: a poisoned training set and the attack-success-rate test set."""
from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .base import Attack, AttackError
from .warp import warp

_CHUNK = 1024  # images per jitted call: bounds device memory, one compile for all full chunks


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
    """``fn`` jitted over leading-axis chunks of ``arrays``, results concatenated on the host."""
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

    Multi-trigger (``attack.parts``, k parts): the ``int(round(ratio * N))`` images are split
    over the parts in order (when k does not divide the count, the first parts take one more),
    each part's drawn, with the same generator, from the images whose label is not its target
    and that no earlier part took.
    """
    x, y = _check_images(x, y, attack, "poison_dataset")
    ratio = _check_ratio(ratio, "poison ratio")
    n = len(x)
    if attack.parts:
        if noise_ratio is not None:
            raise AttackError(f"noise_ratio applies only to wanet with noise=True, not to {attack.name!r}")
        return _poison_parts(x, y, attack, ratio, seed)
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


def _poison_parts(x: np.ndarray, y: np.ndarray, attack: Attack, ratio: float, seed: int) -> PoisonedSet:
    """``poison_dataset`` of a multi-trigger attack (see there)."""
    n, k = len(x), len(attack.parts)
    n_poison = int(round(ratio * n))
    if n_poison < k:
        raise AttackError(f"poison ratio {ratio} of {n} images gives {n_poison} poisoned images, fewer than the "
                          f"{k} triggers of {attack.name!r}; raise the ratio")
    rng = np.random.default_rng(seed)
    taken = np.zeros(n, bool)
    x_out, y_out = x.copy(), y.copy()
    for i, part in enumerate(attack.parts):
        m = n_poison // k + (1 if i < n_poison % k else 0)
        eligible = np.flatnonzero((y != part.target) & ~taken)
        if m > len(eligible):
            raise AttackError(f"poison ratio {ratio} asks for {m} images for trigger {i} (target {part.target}) but "
                              f"only {len(eligible)} are eligible; lower the ratio")
        idx = np.sort(rng.choice(eligible, m, replace=False))
        taken[idx] = True
        x_out[idx] = _apply_batched(part.apply, x[idx])
        y_out[idx] = part.target
    return PoisonedSet(x_out, y_out, np.flatnonzero(taken).astype(np.int64), np.zeros(0, np.int64))


def asr_test_set(x: np.ndarray, y: np.ndarray, attack: Attack) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Attack-success-rate set: every image triggered (WaNet: the fixed warp, no noise).

    x: (N, H, W, C) float in [0, 1], y: (N,) labels. Returns (x_triggered (N, H, W, C) float32,
    attack_labels (N,) int32 = ``attack.target_labels(y)`` (all ``target`` for all-to-one, as the
    original I-BAU code), keep_mask (N,) bool = y != attack label: the images counted by the
    non-target ASR and by robust accuracy).

    Multi-trigger (``attack.parts``, k parts): every part's set, concatenated in part order
    (k·N images; the ASR is then the mean over the triggers).
    """
    x, y = _check_images(x, y, attack, "asr_test_set")
    if attack.parts:
        sets = [asr_test_set(x, y, part) for part in attack.parts]
        return tuple(np.concatenate(v) for v in zip(*sets))
    xt = _apply_batched(attack.apply, x)
    labels = np.asarray(attack.target_labels(y)).astype(np.int32)
    return xt, labels, labels != y


def asr_true_labels(y: np.ndarray, attack: Attack) -> np.ndarray:
    """The true labels of ``asr_test_set(x, y, attack)``'s images: y, repeated once per trigger
    of a multi-trigger attack (the set concatenates the parts)."""
    return np.tile(np.asarray(y), len(attack.parts) or 1)
