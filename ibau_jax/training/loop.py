"""``train``: the training loop around the compiled epoch, with evaluation, progress and a run directory.

Random streams (``rng.streams(config.seed)``): the weights come from the ``"init"`` stream and
epoch e's shuffling, augmentation and dropout from ``fold_in(key("epochs"), e)``, so epoch e
draws the same numbers whether the run was interrupted before it or not.

Data parallelism: with ``mesh`` every epoch is still one compiled ``lax.scan``
(``step.make_sharded_train_epoch``): the data and the state are replicated, each batch is
padded to a multiple of the device count (weight 0) and split over the devices, so any
device count trains the one-device model (up to float summation order).
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from tqdm import tqdm

from .. import interrupt, metrics
from .. import rng as rng_lib
from .. import sharding
from ..errors import ConfigError
from .rundir import DATA_KEY, RunWriter, data_fingerprint, json_ready
from .step import TrainConfig, TrainState, create_state, make_sharded_train_epoch, train_epoch

PyTree = Any


@dataclasses.dataclass(frozen=True)
class EvalSets:
    """What ``metrics.evaluate`` needs: clean images/labels and triggered images with their targets."""

    acc_x: np.ndarray        # (N, H, W, C) float32 in [0, 1]
    acc_y: np.ndarray        # (N,)
    asr_x: np.ndarray        # (M, H, W, C) triggered
    asr_t: np.ndarray        # (M,) attack labels
    asr_true: np.ndarray     # (M,) true labels (for asr_nontarget)

    def evaluate(self, model: nn.Module, variables: PyTree, mesh: Mesh | None = None) -> dict[str, float]:
        return metrics.evaluate(model.apply, variables, self.acc_x, self.acc_y, self.asr_x, self.asr_t,
                                self.asr_true, mesh=mesh)


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, config: TrainConfig, *,
          eval_sets: EvalSets | None = None, run_dir: str | os.PathLike | None = None,
          run_config: dict[str, Any] | None = None, meta: dict[str, Any] | None = None,
          resume: bool = False, quiet: bool = False, stop_after: int | None = None,
          log: Callable[[str], None] = print, mesh: Mesh | None = None) -> tuple[TrainState, list[dict[str, Any]]]:
    """Train ``model`` on x (N, H, W, C) float32 in [0, 1], y (N,) for ``config.epochs`` epochs.

    With ``run_dir``: every finished epoch is one atomic checkpoint step (``rundir``) holding
    the training state and the record ``{'config': run_config + TrainConfig + data fingerprint,
    'epochs_done', 'history', 'meta'}``, then exported as ``model.npz`` and ``run.json``;
    ``meta`` must hold ``model`` and ``num_classes``. ``resume=True`` continues from the last
    finished epoch (the same result as an uninterrupted run); other data or a ``run_config``
    different from the saved one raise RunError naming the difference. ``stop_after=e``
    returns after epoch e (training in slices). ``mesh``: train data-parallel over its
    devices (any count). Returns (state, history).
    """
    n = x.shape[0]
    steps = n // config.batch_size
    if steps < 1:
        raise ConfigError(f"{n} training images are fewer than one batch of {config.batch_size}; "
                          "lower --batch-size")
    writer = None
    if run_dir is not None:
        run_config = json_ready({**dataclasses.asdict(config), **(run_config or {}),
                                 DATA_KEY: data_fingerprint(x, y)})
        writer = RunWriter(run_dir, run_config, meta or {})
    state = create_state(model, config, steps, tuple(x.shape[1:]))
    history: list[dict[str, Any]] = []
    start = 0
    if writer is not None:
        if resume:
            state, record = writer.resume(state)
            if record is None:
                log(f"{run_dir} holds no finished epoch yet; training it from the start")
            else:
                history, start = list(record["history"]), int(record["epochs_done"])
                log(f"resuming {run_dir} after epoch {start}/{config.epochs}")
        else:
            writer.start()

    if mesh is None:
        xs, ys = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.int32)
    else:
        xs, ys = sharding.replicate(mesh, (np.asarray(x, np.float32), np.asarray(y, np.int32)))
    epochs_key = rng_lib.streams(config.seed).key("epochs")
    bar = tqdm(total=(config.epochs - start) * steps * config.batch_size, unit="img", unit_scale=True,
               desc="training", dynamic_ncols=True, disable=quiet)
    on_step = None if quiet else (lambda loss: bar.update(config.batch_size))
    if mesh is None:
        run_epoch = lambda s, k: train_epoch(s, xs, ys, k, config.batch_size, config.crop_pad, config.flip, on_step,
                                             dp=config.dp)
    else:
        # Under a mesh the debug callback may run once per device: the bar counts epochs instead.
        sharded = make_sharded_train_epoch(mesh, config.batch_size, config.crop_pad, config.flip, dp=config.dp)
        run_epoch = lambda s, k: sharded(s, xs, ys, k)
    try:
        for epoch in range(start + 1, config.epochs + 1):
            interrupt.check()  # a Ctrl-C (inside interrupt.graceful) stops between epochs
            t0 = time.perf_counter()
            state, m = run_epoch(state, jax.random.fold_in(epochs_key, epoch))
            if mesh is not None and not quiet:
                bar.update(steps * config.batch_size)
            rec: dict[str, Any] = {"epoch": epoch, "loss": float(m["loss"]), "train_acc": float(m["acc"]),
                                   "seconds": round(time.perf_counter() - t0, 3)}
            if not np.isfinite(rec["loss"]):
                raise ConfigError(f"epoch {epoch}: the loss is not finite; lower --lr")
            if eval_sets is not None and (epoch % config.eval_every == 0 or epoch == config.epochs):
                rec.update(eval_sets.evaluate(model, {"params": state.params, "batch_stats": state.batch_stats},
                                              mesh))
            history.append(rec)
            bar.set_postfix_str(f"epoch {epoch}/{config.epochs} loss {rec['loss']:.3f}"
                                + (f" acc {rec['clean_acc']:.3f} asr {rec['asr_all']:.3f}" if "clean_acc" in rec else ""))
            if not quiet:
                bar.write(" ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in rec.items()))
            if writer is not None:
                writer.save_epoch(epoch, state, history)
            if stop_after is not None and epoch >= stop_after:
                break
    finally:
        bar.close()
        if writer is not None:
            writer.close()
    return state, history
