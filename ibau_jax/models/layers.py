"""Layers shared by the models: PyTorch's BatchNorm constants, the BN helper (with the optional
neuron masks and padded-example masks), ``Conv3x3``, 2x2 max pooling and ELU.

Inputs are NHWC float32.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from .conv import conv3x3
from .errors import ModelError
from .masks import NEURON_MASKS

# PyTorch BatchNorm2d defaults: eps 1e-5, running-stat momentum 0.1 (flax: 0.9).
BN_EPS = 1e-5
BN_MOMENTUM = 0.9


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2, stride-2 max pooling as element-wise selects; the first maximum in the window wins.

    Shapes: x (N, H, W, C) with H, W even -> (N, H/2, W/2, C). Same values as
    ``nn.max_pool(x, (2, 2), strides=(2, 2))`` and the same derivatives of every order, ties
    included: the gradient goes to the first maximal element in row-major window order, as
    in XLA's ``select_and_scatter`` and PyTorch's ``max_pool2d``. (``jnp.max`` would split a
    tie evenly; ties are common where saturated image regions make neighbouring activations
    equal.) Why: the derivatives of ``reduce_window`` are ``select_and_scatter`` ops that
    XLA's CPU backend runs slowly inside the I-BAU round (docs/performance.md); selects
    are element-wise and fuse.
    """
    n, h, w, c = x.shape
    if h % 2 or w % 2:
        return nn.max_pool(x, (2, 2), strides=(2, 2))
    v = x.reshape(n, h // 2, 2, w // 2, 2, c)
    is_max = v == jnp.max(v, axis=(2, 4), keepdims=True)
    # First maximum in row-major window order: weight the tied positions 8, 4, 2, 1, keep the largest.
    order = jnp.asarray([[8, 4], [2, 1]], jnp.int8).reshape(1, 1, 2, 1, 2, 1)
    score = jnp.where(is_max, order, jnp.int8(0))
    first = score == jnp.max(score, axis=(2, 4), keepdims=True)
    # The mask is piecewise constant in x, so every derivative flows to the selected element
    # through a broadcast and a select (no pads or scatters).
    return jnp.sum(jnp.where(first, v, jnp.zeros((), v.dtype)), axis=(2, 4))


def elu(x: jax.Array) -> jax.Array:
    """ELU with α = 1: x for x > 0, eˣ − 1 otherwise.

    ``nn.elu`` (and PyTorch) use ``expm1``, which XLA's CPU backend runs slowly; ``exp`` it
    vectorizes, and a faithful I-BAU round evaluates ELU and its derivatives many times per
    step (docs/performance.md). The two differ by about one float32 ulp of 1 (1e-7) in
    absolute value at most.
    """
    return jnp.where(x > 0, x, jnp.exp(jnp.minimum(x, 0.0)) - 1.0)


class Conv3x3(nn.Module):
    """3x3 'SAME' conv with bias, parameters named and shaped like ``nn.Conv`` (kernel HWIO).

    ``impl='canonical'`` uses ``conv.conv3x3`` (fast second-order work inside scans on CPU,
    reverse mode only); ``impl='xla'`` uses ``lax.conv_general_dilated`` and its autodiff.
    """

    features: int
    impl: str = "canonical"
    use_bias: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (3, 3, x.shape[-1], self.features))
        if self.impl == "canonical":
            y = conv3x3(x, kernel)
        elif self.impl == "xla":
            y = jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)),
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
        else:
            raise ModelError(f"unknown conv impl {self.impl!r}; use conv_impl='canonical' or 'xla'")
        if not self.use_bias:
            return y
        return y + self.param("bias", nn.initializers.zeros_init(), (self.features,))


def batch_norm(parent: nn.Module, x: jax.Array, name: str, train: bool,
               example_mask: jax.Array | None = None) -> jax.Array:
    """``nn.BatchNorm`` with PyTorch's constants as the child ``name`` of ``parent``, then the
    optional neuron mask: y = BN(x) · m, m = ``neuron_masks[name]`` of ``parent``'s scope.

    Call it from inside ``parent``'s compact method. Shapes: x (N, ..., C); example_mask (N,)
    of 0/1 or None; the neuron mask, where present, (C,). ``example_mask`` becomes flax's
    ``mask=`` broadcast to (N, 1, ..., 1): in train mode the batch mean and variance (and so
    the running statistics) are taken over the rows where it is 1 only; the running averages
    (eval mode) ignore it. Without a neuron mask the output is BN's, untouched (bitwise). The
    models check the masks' names and shapes once, at the top (``masks.check_neuron_masks``).
    """
    mask = None if example_mask is None else example_mask.reshape((-1,) + (1,) * (x.ndim - 1))
    y = nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPS,
                     name=name)(x, mask=mask)
    if parent.has_variable(NEURON_MASKS, name):
        y = y * parent.get_variable(NEURON_MASKS, name)
    return y
