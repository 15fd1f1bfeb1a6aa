"""Plain fine-tuning on the defender's clean set (``ft``): the floor every defense must beat,
and the worked example of adding a defense (docs/architecture.md).

The poisoned model is trained on the clean set for ``epochs`` epochs in train mode (BatchNorm
batch statistics, dropout, random crop and flip), SGD with momentum and a cosine schedule —
the same pure ``training`` step that trains poisoned models, one ``lax.scan`` per epoch,
run through the defenses' one loop (``base.run_rounds``).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import numpy as np
import optax

from .. import sharding, training
from ..errors import ConfigError, check_finite
from .base import CleanSet, DefenseResult, LoopResult, check_one_batch, run_rounds


@dataclasses.dataclass(frozen=True)
class FTConfig:
    """Fine-tuning settings.

    Sources: epochs 10 = NAD's teacher fine-tuning (Li et al., ICLR 2021, bboylyg/NAD: 10 epochs
    on the clean subset); SGD momentum 0.9, weight decay 5e-4, batch 128 = the usual CIFAR
    recipe of BackdoorBench's ``ft`` defense; lr 0.01 (cosine-decayed to 0) = a tenth of a
    from-scratch learning rate, so the clean set's few images refine rather than retrain the
    model (ibau-jax's choice; override with ``--set lr=...``). ``crop_pad``/``flip`` as in
    training (``flip=False`` for GTSRB).
    """

    epochs: int = 10
    lr: float = 0.01
    batch_size: int = 128
    momentum: float = 0.9
    weight_decay: float = 5e-4
    crop_pad: int = 4
    flip: bool = True

    def __post_init__(self):
        for name in ("epochs", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {v!r}")
        if check_finite("lr", self.lr) <= 0:
            raise ConfigError(f"lr must be a finite number > 0, got {self.lr!r}")
        if not 0 <= check_finite("momentum", self.momentum) < 1:
            raise ConfigError(f"momentum must be in [0, 1), got {self.momentum!r}")
        if check_finite("weight_decay", self.weight_decay) < 0:
            raise ConfigError(f"weight_decay must be a finite number >= 0, got {self.weight_decay!r}")
        if self.crop_pad < 0:
            raise ConfigError(f"crop_pad must be >= 0, got {self.crop_pad}")


class FineTuning:
    """``ft``: fine-tune on the clean set. History per epoch: ``round`` (the epoch), ``seconds``,
    ``loss`` and ``train_acc`` (means over the epoch's steps)."""

    name = "ft"
    Config = FTConfig

    def __init__(self, config: FTConfig | None = None, on_step: Callable[[Any], None] | None = None):
        self.config = config if config is not None else FTConfig()
        self.on_step = on_step

    def num_steps(self, clean_set: CleanSet) -> int:
        return self.config.epochs * (len(clean_set) // self.config.batch_size)

    def check_size(self, n: int) -> None:
        """ConfigError when a clean set of ``n`` images holds less than one batch."""
        check_one_batch(n, self.config.batch_size)

    def run(self, model, variables, clean_set: CleanSet, key: jax.Array, *, mesh: Any = None,
            callback=None) -> DefenseResult:
        cfg = self.config
        self.check_size(len(clean_set))
        steps = len(clean_set) // cfg.batch_size
        loop = fine_tune(model, variables, clean_set.x, clean_set.y, key, cfg, on_step=self.on_step, mesh=mesh,
                         callback=callback)
        return DefenseResult(loop.state, loop.history, {"steps_per_epoch": steps,
                             "devices": sharding.num_devices(mesh)}, loop.seconds, loop.compile_seconds)


def fine_tune(model, variables, x: np.ndarray, y: np.ndarray, key: jax.Array, cfg: FTConfig, *,
              on_step: Callable[[Any], None] | None = None, mesh: Any = None, callback=None,
              extra_tx: optax.GradientTransformation | None = None) -> LoopResult:
    """``cfg.epochs`` training epochs on (x, y) through ``run_rounds``; epoch e uses ``fold_in(key, e)``.

    x (N, H, W, C) float images, y (N,) labels, N >= ``cfg.batch_size``. ``extra_tx`` is chained
    after the optimizer (e.g. Fine-Pruning's freezing of pruned channels). Returns the loop's
    result with ``state`` = the final variables ``{'params', 'batch_stats'}`` (host numpy).
    """
    steps = len(y) // cfg.batch_size
    tcfg = training.TrainConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay, crop_pad=cfg.crop_pad, flip=cfg.flip)
    tx = training.make_optimizer(tcfg, steps)
    if extra_tx is not None:
        tx = optax.chain(tx, extra_tx)
    state = training.TrainState.create(apply_fn=model.apply, params=variables["params"],
                                       batch_stats=variables["batch_stats"], tx=tx)
    epoch = training.make_epoch_fn(cfg.batch_size, cfg.crop_pad, cfg.flip, on_step, mesh)
    xs, ys = np.asarray(x, np.float32), np.asarray(y, np.int32)
    if mesh is not None:
        state, xs, ys = sharding.replicate(mesh, (state, xs, ys))
    keys = [jax.random.fold_in(key, e) for e in range(1, cfg.epochs + 1)]

    @jax.jit
    def step(state, k, xs, ys):
        return epoch(state, xs, ys, k)

    variables_of = lambda s: sharding.to_host({"params": s.params, "batch_stats": s.batch_stats})
    record_of = lambda r, m: {"loss": float(sharding.to_host(m["loss"])),
                              "train_acc": float(sharding.to_host(m["acc"]))}
    loop = run_rounds(step, state, keys, consts=(xs, ys), variables_of=variables_of, record_of=record_of,
                      callback=callback, divergence_hint="lower lr (--set lr=...)")
    loop.state = variables_of(loop.state)
    return loop

