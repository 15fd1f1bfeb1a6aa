"""DP-SGD gradients (Abadi et al., 2016), the training-time backdoor defense of Du, Jia & Song
(ICLR 2020): per-example gradients, each clipped to L2 norm ≤ C over the whole parameter
tree, summed, Gaussian noise of standard deviation σ·C added, divided by the batch size B:

    g̃ = ( Σ_i g_i · min(1, C / ‖g_i‖) + σ·C·z ) / B,      z ~ N(0, I) (one draw per parameter)

    grads, aux = dp.private_gradient(per_example_loss, params, (x, y, keys), noise_key, DPConfig(1.0, 1.0))

``per_example_grads`` is ``jax.vmap(jax.grad(...))``; ``clip_per_example`` and
``noisy_mean`` are the aggregation. On an unpadded batch ``noisy_mean`` is exactly
``optax.contrib.differentially_private_aggregate(C, σ, key)`` (same clipping formula, same
key split: ``split(key, L + 1)[1:]`` for the L leaves in tree order; a test checks it). It is
written out here rather than called because optax's transformation (a) keeps its noise key in
the optimizer state, seeded once, where this library draws every step's randomness from the
epoch key (``fold_in(key("epochs"), e)``, so a resumed run draws the same noise), (b) divides
by the padded batch size, where data-parallel batches carry zero-weight padding, and (c) does
not expose the clipped per-example gradients and norms the tests check.

BatchNorm: a per-example gradient through batch statistics is ill-defined (each example's
loss depends on every other example through the mean and variance). Here the statistics are
computed once per step on the whole (augmented) batch in train mode, exactly as the ordinary
step does, and the per-example losses are then taken with BatchNorm normalising by those
batch statistics held fixed (constants: no gradient flows through them), see
``frozen_bn_per_example_loss``. The running averages are updated from the same batch
statistics as in the ordinary step. Consequences: (1) the mean of the per-example gradients is
the gradient of the batch loss with stop-gradient statistics, not the ordinary train-mode
gradient (equal for models without BatchNorm); (2) the batch statistics themselves depend on
every example of the batch, so the (ε, δ) accounting of DP-SGD does not formally hold for
BatchNorm models. That is acceptable for what this module is for, a backdoor defense (noise
and clipping bound every poisoned example's influence on the update); no privacy budget is
reported. A model without BatchNorm (or with GroupNorm) gets exact DP-SGD.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from ..errors import ConfigError
from ..models.layers import BN_MOMENTUM

PyTree = Any


class DPConfig(NamedTuple):
    """DP-SGD's two settings; a pytree of two scalars, so one compiled step serves every value.

    noise: σ ≥ 0, the noise multiplier: the noise added to the clipped sum has std σ·C
        (0 = clipping only).
    clip: C > 0, the L2 bound of every example's gradient over the whole parameter tree.
    Build it with ``check_dp`` (validated); the fields are plain floats or traced scalars.
    """

    noise: Any
    clip: Any


def _finite(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def check_dp(noise: float | None, clip: float | None) -> DPConfig | None:
    """``DPConfig(noise, clip)``, or None when both are None (ordinary training).

    ConfigError (one line) when only one is given, or either is not a finite number, or
    clip ≤ 0, or noise < 0 (σ = 0 is clipping without noise; the CLI asks for σ > 0).
    """
    if noise is None and clip is None:
        return None
    if noise is None or clip is None:
        given, missing = ("dp_noise", "dp_clip") if clip is None else ("dp_clip", "dp_noise")
        raise ConfigError(f"{given} needs {missing} too: DP-SGD takes both the noise multiplier and the "
                          "clipping norm (e.g. dp_noise=1.0, dp_clip=1.0), or neither")
    if not _finite(noise) or noise < 0:
        raise ConfigError(f"dp_noise must be a finite number >= 0, got {noise!r}")
    if not _finite(clip) or clip <= 0:
        raise ConfigError(f"dp_clip must be a finite number > 0, got {clip!r}")
    return DPConfig(float(noise), float(clip))


# ----------------------------------------------------------------------------- aggregation

def per_example_grads(loss_fn: Callable[..., tuple[jax.Array, Any]], params: PyTree,
                      *batched: Any) -> tuple[tuple[jax.Array, Any], PyTree]:
    """``jax.vmap(jax.value_and_grad(loss_fn, has_aux=True))`` over axis 0 of ``batched``.

    ``loss_fn(params, *example) -> (loss (), aux)`` sees ONE example (the leading axis removed).
    Returns ((losses (B,), aux batched on axis 0), grads: the params tree with a leading B axis).
    """
    vg = jax.value_and_grad(loss_fn, has_aux=True)
    return jax.vmap(vg, in_axes=(None,) + (0,) * len(batched))(params, *batched)


def per_example_norms(grads: PyTree) -> jax.Array:
    """‖g_i‖₂ over the whole parameter tree: grads (leaves (B, ...)) -> (B,)."""
    sq = sum(jnp.sum(jnp.square(g).reshape(g.shape[0], -1), axis=1) for g in jax.tree.leaves(grads))
    return jnp.sqrt(sq)


def _clip_factors(norms: jax.Array, clip: float) -> jax.Array:
    # optax's formula: min(1, C / norm); C / 0 = inf -> 1 (a zero gradient stays zero).
    return jnp.nan_to_num(jnp.minimum(clip / norms, 1.0), nan=1.0)


def _scale(grads: PyTree, factors: jax.Array) -> PyTree:
    return jax.tree.map(lambda g: g * factors.reshape((-1,) + (1,) * (g.ndim - 1)), grads)


def clip_per_example(grads: PyTree, clip: float) -> tuple[PyTree, jax.Array]:
    """g_i · min(1, C / ‖g_i‖) for every example i (leaves (B, ...)); a zero gradient stays zero.

    Returns (clipped grads, the norms before clipping (B,)). After clipping every norm is
    min(‖g_i‖, C) (up to float rounding).
    """
    norms = per_example_norms(grads)
    return _scale(grads, _clip_factors(norms, clip)), norms


def noisy_mean(grads: PyTree, key: jax.Array, noise: float, clip: float,
               weights: jax.Array | None = None) -> PyTree:
    """DP-SGD's aggregate of per-example gradients (leaves (B, ...)): clip each to norm C, sum,
    add σ·C·N(0, 1) per parameter, divide by the batch size.

    ``weights`` (B,) of 0/1 marks real examples (0 = padding): the sum runs over the real ones
    and the divisor is their count, so a padded batch equals the unpadded one. ``weights=None``
    is ``optax.contrib.differentially_private_aggregate(clip, noise, key)`` applied to ``grads``.
    """
    # The clip factors are folded into the sum (one pass over the per-example gradients).
    factors = _clip_factors(per_example_norms(grads), clip)
    leaves, treedef = jax.tree.flatten(grads)
    count = leaves[0].shape[0]
    if weights is not None:
        factors, count = factors * weights, jnp.sum(weights)
    # optax's key use: split(key, L + 1), the first for the next step's state, the rest per leaf.
    _, *keys = jax.random.split(key, len(leaves) + 1)
    std = clip * noise
    out = [(jnp.tensordot(factors, g, axes=1) + std * jax.random.normal(k, g.shape[1:], g.dtype)) / count
           for g, k in zip(leaves, keys)]
    return jax.tree.unflatten(treedef, out)


def private_gradient(loss_fn: Callable[..., tuple[jax.Array, Any]], params: PyTree, batched: tuple,
                     key: jax.Array, dp: DPConfig,
                     weights: jax.Array | None = None) -> tuple[PyTree, tuple[jax.Array, Any]]:
    """The DP-SGD gradient of ``loss_fn`` (one example -> (loss, aux)) over ``batched`` (axis 0).

    Returns (g̃: the params tree, (per-example losses (B,), aux batched)). With σ = 0 and C at
    least the largest per-example norm, g̃ is the mean of the per-example gradients.
    """
    (losses, aux), grads = per_example_grads(loss_fn, params, *batched)
    return noisy_mean(grads, key, dp.noise, dp.clip, weights), (losses, aux)


# ----------------------------------------------------------------------------- BatchNorm

def _bn_uses_running_average(next_fun, args, kwargs, context):
    """flax method interceptor: every ``nn.BatchNorm`` normalises by its ``batch_stats`` entries
    (here: the batch's statistics, set by the caller) instead of the statistics of its input.

    The models fix ``use_running_average`` at construction (``not train``), and flax refuses it
    again at call time, so the flag is switched on the instance for this one call (the instance
    is created afresh by its parent on every apply) and then flax's own eval-mode code runs.
    """
    module = context.module
    if not (isinstance(module, nn.BatchNorm) and context.method_name == "__call__"):
        return next_fun(*args, **kwargs)
    saved = module.use_running_average
    object.__setattr__(module, "use_running_average", True)  # flax Modules refuse setattr outside setup
    try:
        return next_fun(*args, **kwargs)
    finally:
        object.__setattr__(module, "use_running_average", saved)


def batch_statistics(apply_fn: Callable[..., Any], params: PyTree, batch_stats: PyTree, x: jax.Array,
                     drop_key: jax.Array, model_kwargs: dict[str, Any]) -> tuple[PyTree, PyTree]:
    """BatchNorm's statistics of the batch x (N, H, W, C) in train mode, and the running averages
    updated from them as the ordinary step updates them.

    flax updates running = m·running + (1 − m)·batch (m = ``BN_MOMENTUM``, the momentum of every
    BatchNorm of this library's models): with the running averages set to 0 the update returns
    (1 − m)·batch, so batch = that / (1 − m) (within float rounding) and the real update is
    m·running + (1 − m)·batch. Returns (batch statistics, new running statistics), both shaped
    like ``batch_stats`` ({} for a model without BatchNorm).
    """
    if not jax.tree.leaves(batch_stats):
        return batch_stats, batch_stats
    zeros = jax.tree.map(jnp.zeros_like, batch_stats)
    _, upd = apply_fn({"params": params, "batch_stats": zeros}, x, train=True, rngs={"dropout": drop_key},
                      mutable=["batch_stats"], **model_kwargs)
    part = jax.lax.stop_gradient(upd["batch_stats"])  # (1 - m) · batch statistics
    stats = jax.tree.map(lambda p: p / (1 - BN_MOMENTUM), part)
    running = jax.tree.map(lambda r, p: BN_MOMENTUM * r + p, batch_stats, part)
    return stats, running


def frozen_bn_per_example_loss(apply_fn: Callable[..., Any], stats: PyTree) -> Callable[..., tuple[jax.Array, jax.Array]]:
    """``loss(params, x (H, W, C), y (), drop_key) -> (cross-entropy (), logits (K,))`` of one
    example in train mode (dropout on, with its own key) with every BatchNorm normalising by the
    fixed ``stats`` (the batch's, from ``batch_statistics``) rather than by its input's."""

    def loss(params: PyTree, x: jax.Array, y: jax.Array, drop_key: jax.Array):
        with nn.intercept_methods(_bn_uses_running_average):
            logits = apply_fn({"params": params, "batch_stats": stats}, x[None], train=True,
                              rngs={"dropout": drop_key})[0]
        return optax.softmax_cross_entropy_with_integer_labels(logits, y), logits

    return loss


def dp_train_gradients(apply_fn: Callable[..., Any], params: PyTree, batch_stats: PyTree, x: jax.Array,
                       y: jax.Array, drop_key: jax.Array, noise_key: jax.Array, dp: DPConfig,
                       w: jax.Array | None = None) -> tuple[PyTree, jax.Array, jax.Array, PyTree]:
    """The DP-SGD step's gradient for a flax classifier ``apply_fn(variables, x, train=...)``.

    x (B, H, W, C) already augmented, y (B,), ``w`` (B,) 0/1 padding weights or None. The batch
    statistics come from one train-mode pass (``batch_statistics``, dropout key ``drop_key``);
    example i's gradient uses dropout key ``split(drop_key, B)[i]``.
    Returns (g̃ the params tree, per-example losses (B,), logits (B, K), new running BN statistics).
    """
    masked = {} if w is None else {"example_mask": w}
    stats, running = batch_statistics(apply_fn, params, batch_stats, x, drop_key, masked)
    keys = jax.random.split(drop_key, x.shape[0])
    grads, (losses, logits) = private_gradient(frozen_bn_per_example_loss(apply_fn, stats), params,
                                               (x, y, keys), noise_key, dp, w)
    return grads, losses, logits, running
