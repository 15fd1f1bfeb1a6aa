"""The training step: a pure jitted SGD/Adam step, an epoch as one ``lax.scan``, and both on a mesh.

    state = create_state(model, config, steps_per_epoch)
    state, metrics = train_step(state, (x, y), rng)          # x (n, H, W, C) float in [0, 1]
    state, metrics = train_epoch(state, xs, ys, rng, batch_size=128)
    step = make_sharded_train_step(mesh)                     # any device count, any n

Augmentation runs inside the step in JAX: random crop with ``crop_pad`` zero padding and a
random horizontal flip (off for GTSRB, whose signs are not mirror-symmetric).

Padding (data parallelism over d devices when d does not divide n): the batch is padded to
``sharding.padded_size(n, mesh)`` examples with per-example weights w (1 real, 0 padding).
The loss and the accuracy are ``sharding.weighted_mean`` over w and BatchNorm's batch
statistics ignore the padding (``example_mask=w``), so the padded step equals the unpadded
one up to float summation order. The random draws (crop offsets, flips, dropout masks) are
prefix-stable along the example axis under JAX's partitionable threefry (the default since
JAX 0.5): the first n padded examples get exactly the draws of the unpadded batch.
"""
from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state
from jax.sharding import Mesh

from .. import rng as rng_lib
from .. import sharding
from ..errors import ConfigError
from .dp import DPConfig, check_dp, dp_train_gradients

PyTree = Any
OPTIMIZERS = ("sgd", "adam")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation and augmentation settings. Defaults: SGD momentum 0.9, cosine schedule."""

    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "sgd"            # 'sgd' (momentum 0.9, Nesterov off) or 'adam'
    lr: float = 0.05                  # peak learning rate; cosine-decayed to 0 over all steps
    momentum: float = 0.9
    weight_decay: float = 5e-4        # decoupled L2 via optax.add_decayed_weights; 0 = off
    crop_pad: int = 4                 # random crop after zero padding by this many pixels; 0 = off
    flip: bool = True                 # random horizontal flip (False for GTSRB)
    seed: int = 0                     # rng.streams(seed): "init" for the weights, "epochs" for the epochs
    eval_every: int = 1               # epochs between evaluations (the last epoch is always evaluated)
    dp_noise: float | None = None     # DP-SGD noise multiplier σ >= 0 (``dp.py``); None = ordinary SGD
    dp_clip: float | None = None      # DP-SGD per-example L2 clipping norm C > 0; set with dp_noise

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError(f"epochs and batch_size must be >= 1, got {self.epochs}, {self.batch_size}")
        if self.eval_every < 1:
            raise ConfigError(f"eval_every must be >= 1, got {self.eval_every}")
        check_dp(self.dp_noise, self.dp_clip)  # both or neither, finite, clip > 0, noise >= 0

    @property
    def dp(self) -> DPConfig | None:
        """The DP-SGD settings, or None for ordinary training (bitwise the step without DP)."""
        return check_dp(self.dp_noise, self.dp_clip)


class TrainState(train_state.TrainState):
    """flax's TrainState plus BatchNorm running statistics."""

    batch_stats: PyTree = None


def make_optimizer(config: TrainConfig, steps_per_epoch: int) -> optax.GradientTransformation:
    """SGD+momentum or Adam with a cosine schedule over ``epochs * steps_per_epoch`` steps."""
    schedule = optax.cosine_decay_schedule(config.lr, config.epochs * steps_per_epoch)
    opt = (optax.sgd(schedule, momentum=config.momentum) if config.optimizer == "sgd"
           else optax.adam(schedule))
    if config.weight_decay:
        # Decay only kernels: BatchNorm scales and biases are not regularised (common practice).
        mask = lambda params: jax.tree_util.tree_map_with_path(
            lambda path, _: getattr(path[-1], "key", None) == "kernel", params)
        opt = optax.chain(optax.add_decayed_weights(config.weight_decay, mask), opt)
    return opt


# One compiled init per model (modules hash by their fields) instead of one small compilation
# per layer op, which takes seconds on CPU.
_init = jax.jit(lambda model, key, x: model.init(key, x, train=False), static_argnums=0)


def create_state(model: nn.Module, config: TrainConfig, steps_per_epoch: int,
                 image_shape: tuple[int, int, int] = (32, 32, 3)) -> TrainState:
    """Fresh parameters (from ``rng.streams(config.seed).key("init")``) and optimizer state."""
    key = rng_lib.streams(config.seed).key("init")
    variables = _init(model, key, jnp.zeros((1, *image_shape), jnp.float32))
    return TrainState.create(apply_fn=model.apply, params=variables["params"],
                             batch_stats=variables["batch_stats"],
                             tx=make_optimizer(config, steps_per_epoch))


def augment(x: jax.Array, key: jax.Array, crop_pad: int = 4, flip: bool = True) -> jax.Array:
    """Random crop (zero padding ``crop_pad``) and random horizontal flip, per image.

    x (N, H, W, C) -> (N, H, W, C). Crop offsets are uniform in [0, 2*crop_pad] per axis.
    """
    n, h, w, _ = x.shape
    kc, kf = jax.random.split(key)
    if crop_pad:
        padded = jnp.pad(x, ((0, 0), (crop_pad, crop_pad), (crop_pad, crop_pad), (0, 0)))
        offs = jax.random.randint(kc, (n, 2), 0, 2 * crop_pad + 1)
        crop = lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1], 0), (h, w, img.shape[-1]))
        x = jax.vmap(crop)(padded, offs)
    if flip:
        do = jax.random.bernoulli(kf, 0.5, (n,))
        x = jnp.where(do[:, None, None, None], x[:, :, ::-1, :], x)
    return x


@partial(jax.jit, static_argnames=("crop_pad", "flip"))
def train_step(state: TrainState, batch: tuple[jax.Array, jax.Array], rng: jax.Array,
               crop_pad: int = 4, flip: bool = True, w: jax.Array | None = None,
               dp: DPConfig | None = None) -> tuple[TrainState, dict[str, jax.Array]]:
    """One step in train mode (batch statistics, dropout); batch = (x (n,H,W,C) in [0,1], y (n,)).

    ``w`` (n,) per-example weights, 1 for real examples and 0 for padding: the loss is
    ``sum(w * ce) / sum(w)`` and BatchNorm's batch statistics use only w == 1 (``example_mask``).
    ``w=None`` is the plain mean over all n (bitwise the unweighted step).
    ``dp``: DP-SGD (``dp.dp_train_gradients``: per-example gradients with the batch's BatchNorm
    statistics held fixed, clipped to norm ``dp.clip``, noise σ·C from the third key of
    ``split(rng, 3)``; the first two, augmentation and dropout, are those of the ordinary step).
    The reported loss is then the mean of the per-example losses.
    Returns the new state (params, opt state and BatchNorm running stats updated) and
    ``{'loss', 'acc'}`` of the batch (before the update; padding excluded).
    """
    x, y = batch
    if dp is None:
        aug_key, drop_key = jax.random.split(rng)
    else:  # split is prefix-stable: the same augmentation and dropout keys plus a noise key
        aug_key, drop_key, noise_key = jax.random.split(rng, 3)
    x = augment(x.astype(jnp.float32), aug_key, crop_pad, flip)
    if dp is not None:
        grads, losses, logits, batch_stats = dp_train_gradients(state.apply_fn, state.params, state.batch_stats,
                                                                x, y, drop_key, noise_key, dp, w)
        state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
        hits = (jnp.argmax(logits, -1) == y).astype(jnp.float32)
        return state, {"loss": sharding.weighted_mean(losses, w), "acc": sharding.weighted_mean(hits, w)}
    # Only pass the mask when there is padding: unpadded calls stay the unmasked model call.
    masked = {} if w is None else {"example_mask": w}

    def loss_fn(params):
        logits, updates = state.apply_fn({"params": params, "batch_stats": state.batch_stats}, x, train=True,
                                         rngs={"dropout": drop_key}, mutable=["batch_stats"], **masked)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        return sharding.weighted_mean(ce, w), (logits, updates["batch_stats"])

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    hits = (jnp.argmax(logits, -1) == y).astype(jnp.float32)
    return state, {"loss": loss, "acc": sharding.weighted_mean(hits, w)}


# step(state, (x (n, H, W, C), y (n,)), rng, w (n,) | None) -> (state, metrics with 'loss')
Step = Callable[[TrainState, tuple[jax.Array, jax.Array], jax.Array, "jax.Array | None"],
                tuple[TrainState, dict[str, jax.Array]]]


def scan_epoch(step: Step, state: TrainState, xs: jax.Array, ys: jax.Array, rng: jax.Array, batch_size: int, *,
               padded_batch: int | None = None, mesh: Mesh | None = None,
               on_step: Callable[[jax.Array], None] | None = None) -> tuple[TrainState, dict[str, jax.Array]]:
    """One epoch of any per-batch ``step`` (traceable): shuffle xs (N, H, W, C), ys (N,), drop the
    last N mod batch_size, then ``lax.scan`` the step over the batches; the epoch's mean metrics.

    ``padded_batch`` > batch_size pads every batch's index row with index 0 at weight 0 (the
    step gets ``w``); with ``mesh`` the batches are split over its devices along the example
    axis. ``on_step(loss)`` is called from the compiled loop after each step. The training
    epoch and NAD's distillation epoch are this loop with their own step.
    """
    padded_batch = batch_size if padded_batch is None else padded_batch
    nb = xs.shape[0] // batch_size
    perm_key, step_key = jax.random.split(rng)
    idx = jax.random.permutation(perm_key, xs.shape[0])[: nb * batch_size].reshape(nb, batch_size)
    w = None
    if padded_batch != batch_size:
        idx = jnp.pad(idx, ((0, 0), (0, padded_batch - batch_size)))
        w = jnp.broadcast_to(jnp.arange(padded_batch) < batch_size, idx.shape).astype(jnp.float32)
    if mesh is not None:
        # Each device gathers and trains on its slice of every batch; the means inside the
        # step span the whole batch, so XLA inserts the all-reduces.
        idx = jax.lax.with_sharding_constraint(idx, sharding.split_along(mesh, 1))
        if w is not None:
            w = jax.lax.with_sharding_constraint(w, sharding.split_along(mesh, 1))

    def body(state, inp):
        i, k, wi = inp
        xb, yb = xs[i], ys[i]
        if mesh is not None:
            xb = jax.lax.with_sharding_constraint(xb, sharding.split_along(mesh, 0))
        state, m = step(state, (xb, yb), k, wi)
        if on_step is not None:
            jax.debug.callback(on_step, m["loss"])
        return state, m

    state, ms = jax.lax.scan(body, state, (idx, jax.random.split(step_key, nb), w))
    return state, jax.tree.map(jnp.mean, ms)


def _epoch(state: TrainState, xs: jax.Array, ys: jax.Array, rng: jax.Array, batch_size: int,
           crop_pad: int, flip: bool, on_step: Callable[[jax.Array], None] | None,
           padded_batch: int, mesh: Mesh | None,
           dp: DPConfig | None = None) -> tuple[TrainState, dict[str, jax.Array]]:
    """The epoch both ``train_epoch`` and the mesh epoch compile: ``scan_epoch`` of ``train_step``."""
    step = lambda st, batch, k, w: train_step(st, batch, k, crop_pad=crop_pad, flip=flip, w=w, dp=dp)
    return scan_epoch(step, state, xs, ys, rng, batch_size, padded_batch=padded_batch, mesh=mesh, on_step=on_step)


@partial(jax.jit, static_argnames=("batch_size", "crop_pad", "flip", "on_step"))
def train_epoch(state: TrainState, xs: jax.Array, ys: jax.Array, rng: jax.Array, batch_size: int,
                crop_pad: int = 4, flip: bool = True, on_step: Callable[[jax.Array], None] | None = None,
                dp: DPConfig | None = None) -> tuple[TrainState, dict[str, jax.Array]]:
    """One epoch: shuffle xs (N, H, W, C), ys (N,), then ``lax.scan`` ``train_step`` over the batches.

    The last N mod batch_size shuffled images are skipped (BatchNorm wants full batches).
    ``on_step(loss)`` is called from the compiled loop after each step (progress bars).
    ``dp``: DP-SGD steps (``train_step``). Returns the state and the epoch's mean ``{'loss', 'acc'}``.
    """
    return _epoch(state, xs, ys, rng, batch_size, crop_pad, flip, on_step, batch_size, None, dp)


def make_epoch_fn(batch_size: int, crop_pad: int = 4, flip: bool = True,
                  on_step: Callable[[jax.Array], None] | None = None,
                  mesh: Mesh | None = None,
                  dp: DPConfig | None = None) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
    """``epoch(state, xs, ys, rng) -> (state, metrics)``, traceable, for use inside another jitted
    function (a defense's round step): ``train_epoch``'s math, and with ``mesh`` the padded,
    split batches of ``make_sharded_train_epoch`` (xs, ys and the state replicated on the mesh)."""
    padded = batch_size if mesh is None else sharding.padded_size(batch_size, mesh)
    return partial(_epoch, batch_size=batch_size, crop_pad=crop_pad, flip=flip, on_step=on_step,
                   padded_batch=padded, mesh=mesh, dp=dp)


def make_sharded_train_epoch(mesh: Mesh, batch_size: int, crop_pad: int = 4, flip: bool = True,
                             on_step: Callable[[jax.Array], None] | None = None,
                             dp: DPConfig | None = None) -> Callable[..., Any]:
    """``epoch(state, xs, ys, rng) -> (state, metrics)``: ``train_epoch`` as one SPMD program on ``mesh``.

    The state and the data xs (N, H, W, C), ys (N,) are replicated; every batch of
    ``batch_size`` is padded to ``sharding.padded_size(batch_size, mesh)`` (weight 0) and split
    over the devices. Same permutation, keys and math as ``train_epoch`` on one device.
    ``on_step`` may run once per device and step under a mesh (``jax.debug.callback``).
    """
    repl = sharding.replicated(mesh)
    padded = sharding.padded_size(batch_size, mesh)
    fn = jax.jit(partial(_epoch, batch_size=batch_size, crop_pad=crop_pad, flip=flip, on_step=on_step,
                         padded_batch=padded, mesh=mesh, dp=dp),
                 in_shardings=(repl, repl, repl, repl), out_shardings=(repl, repl))

    def run(state: TrainState, xs: Any, ys: Any, rng: jax.Array) -> tuple[TrainState, dict[str, jax.Array]]:
        return fn(*sharding.replicate(mesh, (state, xs, ys, rng)))

    return run


def make_sharded_train_step(mesh: Mesh, crop_pad: int = 4, flip: bool = True,
                            dp: DPConfig | None = None) -> Callable[..., Any]:
    """``step(state, (x, y), rng) -> (state, metrics)``: ``train_step`` as one SPMD program, any n.

    The state (params, BatchNorm statistics, optimizer state) is replicated and the batch
    x (n, H, W, C), y (n,) padded to ``sharding.padded_size(n, mesh)`` examples (weights 0)
    and split over ``mesh``; the loss and BatchNorm's batch statistics span the n real
    examples of the global batch, so any device count reproduces the one-device step.
    Outputs are replicated (``sharding.to_host`` reads them).
    """
    repl, data = sharding.replicated(mesh), sharding.split_along(mesh, 0)
    plain = jax.jit(partial(train_step, crop_pad=crop_pad, flip=flip, dp=dp),
                    in_shardings=(repl, (data, data), repl), out_shardings=(repl, repl))
    padded = jax.jit(lambda state, batch, rng, w: train_step(state, batch, rng, crop_pad=crop_pad, flip=flip, w=w, dp=dp),
                     in_shardings=(repl, (data, data), repl, data), out_shardings=(repl, repl))

    def run(state: TrainState, batch: tuple[Any, Any], rng: jax.Array) -> tuple[TrainState, dict[str, jax.Array]]:
        x, y = batch
        n = int(np.shape(x)[0])
        size = sharding.padded_size(n, mesh)
        state, rng = sharding.replicate(mesh, (state, rng))
        if size == n:
            return plain(state, sharding.shard(mesh, (x, y), 0), rng)
        x, y = sharding.pad_examples(x, 0, size), sharding.pad_examples(y, 0, size)
        w = sharding.example_weights(n, size)
        return padded(state, sharding.shard(mesh, (x, y), 0), rng, sharding.put(w, data))

    return run
