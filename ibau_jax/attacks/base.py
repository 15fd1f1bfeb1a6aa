"""The ``Attack`` type: how an attack triggers an image and which label its backdoor produces.

Every attack is one of two trigger kinds, applied to NHWC batches in [0, 1]:

- keep/pattern: ``x' = clip(x * keep + pattern, 0, 1)`` with ``keep``/``pattern`` (H, W, C);
- warp (WaNet): ``x' = grid_sample(x, grid)`` with ``grid`` (H, W, 2), see ``attacks.warp``;

or several all-to-one attacks at once (``parts``: each trigger with its own target class, the
multi-target setting); ``poison_dataset`` and ``asr_test_set`` handle each part.

Builders (``attacks.triggers``) make ``Attack`` values from an ``AttackSpec``; the registry
(``attacks.get``) validates the spec and the options first.
"""
from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np

from ..errors import UserError
from .warp import warp


class AttackError(UserError):
    """Unknown attack or option, bad target, bad data, or a missing/corrupt trigger file."""


def apply_trigger(x: jax.Array, keep: jax.Array, pattern: jax.Array) -> jax.Array:
    """Poison a batch: x (N, H, W, C) or (H, W, C) in [0, 1] -> clip(x * keep + pattern, 0, 1)."""
    return jnp.clip(x * keep + pattern, 0.0, 1.0)


def check_target(target: int, num_classes: int) -> int:
    """Validate an all-to-one target class: ``int(target)`` in 0..num_classes-1, else AttackError."""
    if not 0 <= int(target) < num_classes:
        raise AttackError(f"target class {target} is outside 0..{num_classes - 1}; pass --target in that range")
    return int(target)


@dataclasses.dataclass(frozen=True, eq=False)
class Attack:
    """A backdoor attack: how to trigger an image and which label the backdoor maps it to.

    Keep/pattern attacks use ``clip(x * keep + pattern, 0, 1)`` (``keep``/``pattern`` (H, W, C)
    float32); WaNet resamples the image through ``grid`` ((H, W, 2), (x, y) in [-1, 1],
    align_corners=True). ``params`` records the attack's options (defaults filled in) for logs.
    ``all_to_all``: the backdoor maps label y to (y + 1) % num_classes instead of ``target``;
    ``clean_label``: poisoned training images keep their (target-class) labels.
    ``parts``: a multi-trigger attack, made of all-to-one attacks with their own triggers and
    targets (``target`` is the first part's); it has no single trigger, so ``apply`` and
    ``target_labels`` refuse it: ``poison_dataset`` / ``asr_test_set`` go part by part.
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
    parts: tuple["Attack", ...] = ()

    @property
    def targets(self) -> tuple[int, ...]:
        """Every target class: the parts' (multi-trigger) or ``(target,)``."""
        return tuple(p.target for p in self.parts) if self.parts else (self.target,)

    def _single(self, what: str) -> None:
        if self.parts:
            raise AttackError(f"attack {self.name!r} has {len(self.parts)} triggers with their own targets "
                              f"{list(self.targets)}: {what} applies to one of its parts (attack.parts[i])")

    def apply(self, x: jax.Array) -> jax.Array:
        """Apply the trigger to a batch (N, H, W, C) (or one image (H, W, C)) in [0, 1]; pure, jittable."""
        self._single("apply")
        if self.grid is not None:
            return warp(x, jnp.asarray(self.grid))
        return apply_trigger(x, jnp.asarray(self.keep), jnp.asarray(self.pattern))

    __call__ = apply

    def target_labels(self, y):
        """The label the backdoor should produce: ``target`` (all-to-one) or ``(y + 1) % num_classes``."""
        self._single("target_labels")
        if self.all_to_all:
            return (y + 1) % self.num_classes
        if isinstance(y, jax.Array):
            return jnp.full_like(y, self.target)
        y = np.asarray(y)
        return np.full_like(y, self.target)

    def noise_grids(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """WaNet's ``grid_temps2``: n randomly perturbed copies of ``grid``, (n, H, W, 2) float32.

        grid2 = clip(grid + uniform(-1, 1) / (W, H), -1, 1), a fresh perturbation per image and pixel.
        """
        if self.grid is None:
            raise AttackError(f"attack {self.name!r} has no warping grid (only wanet has a noise mode)")
        h, w, _ = self.image_shape
        ins = rng.uniform(-1.0, 1.0, (n, h, w, 2)).astype(np.float32)
        ins /= np.array([w, h], np.float32)
        return np.clip(self.grid[None] + ins, -1.0, 1.0).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class AttackSpec:
    """The validated arguments every attack builder receives (``attacks.get`` checks them).

    ``seed`` fixes a trigger's random parts; ``trigger_dir`` is the folder of trigger files
    (None when not given).
    """

    name: str
    num_classes: int
    target: int
    image_shape: tuple[int, int, int]
    trigger_dir: str | os.PathLike | None = None
    seed: int = 0

    def attack(self, *, all_to_all: bool = False, clean_label: bool = False, **fields) -> Attack:
        """An ``Attack`` carrying this spec's name, target, class count and image shape."""
        return Attack(name=self.name, target=self.target, num_classes=self.num_classes,
                      all_to_all=all_to_all, clean_label=clean_label, image_shape=self.image_shape, **fields)
