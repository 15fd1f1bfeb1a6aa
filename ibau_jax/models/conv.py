"""A 3x3, stride-1, 'SAME' convolution whose derivatives of every order are canonical NHWC convs.

Why: XLA's CPU backend runs a convolution fast only in its canonical layout
(input NHWC, kernel HWIO). Outside loops its layout pass rewrites the weight- and
input-gradient convolutions of ``jax.grad`` into that layout, but inside ``lax.scan`` /
``while`` bodies it does not, and they fall back to a naive loop: a small-VGG
forward+backward took 13.9 s per batch in a scan against 0.34 s outside one (2-core CPU).
I-BAU runs all of its second-order work inside scans, so here the backward passes are
written out as canonical convolutions (with explicit transposes) through ``custom_vjp``,
closed under differentiation: the VJP of ``conv3x3`` uses ``conv3x3`` and ``conv3x3_wgrad``,
and the VJP of ``conv3x3_wgrad`` uses ``conv3x3``. Reverse mode to any order works
(grad, grad-of-grad, VJPs of gradients); forward mode (``jvp``) does not (custom_vjp).

Shapes: x (N, H, W, Ci), w (3, 3, Ci, Co) -> (N, H, W, Co).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

_DN = ("NHWC", "HWIO", "NHWC")
_PAD = ((1, 1), (1, 1))
WGRAD_CHUNK = 4          # images per weight-gradient conv on CPU (see conv3x3_wgrad)
_MAX_WGRAD_CHUNKS = 32   # larger batches get larger chunks, to bound the program size


def _conv(x: jax.Array, w: jax.Array) -> jax.Array:
    if x.shape[-1] == 3 and jax.default_backend() == "cpu":
        # XLA's CPU conv (YNNPACK) runs 3 input channels (RGB, the first layer) far slower
        # than 4: in a round's profile the 3->32 layer ran at 19 GFLOP/s, padded at 74.
        # A zero 4th channel in x and w adds only exact zeros to each sum (performance.md).
        x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, 1)))
        w = jnp.pad(w, ((0, 0), (0, 0), (0, 1), (0, 0)))
    return _canonical_conv(x, w)


def _canonical_conv(x: jax.Array, w: jax.Array) -> jax.Array:
    return lax.conv_general_dilated(x, w, (1, 1), _PAD, dimension_numbers=_DN)


def _flip(w: jax.Array) -> jax.Array:
    """(3, 3, Ci, Co) -> (3, 3, Co, Ci), spatially reversed: the kernel of the input gradient."""
    return jnp.transpose(w[::-1, ::-1], (0, 1, 3, 2))


@jax.custom_vjp
def conv3x3(x: jax.Array, w: jax.Array) -> jax.Array:
    """y[n,h,w,o] = Σ_{i,j,c} xpad[n,h+i,w+j,c]·w[i,j,c,o] (zero padding 1)."""
    return _conv(x, w)


@jax.custom_vjp
def conv3x3_wgrad(x: jax.Array, dy: jax.Array) -> jax.Array:
    """Kernel gradient of ``conv3x3``: g[i,j,c,o] = Σ_{n,h,w} xpad[n,h+i,w+j,c]·dy[n,h,w,o].

    Computed as a canonical conv with the batch as the contracted feature axis:
    input x as (Ci, H, W, N), kernel dy as (H, W, N, Co), output (Ci, 3, 3, Co).
    """
    # One conv per chunk of WGRAD_CHUNK images, summed: with the whole batch as the contracted
    # feature axis Eigen's CPU conv is several times slower (32x32x32->32, batch 100: 206 ms
    # as one conv, 25 ms as 50 convs of 2; docs/performance.md).
    # The chunking works around Eigen (XLA's CPU convs); other backends get one conv.
    n = x.shape[0]
    chunk = max(WGRAD_CHUNK, -(-n // _MAX_WGRAD_CHUNKS)) if jax.default_backend() == "cpu" else n
    return sum(wgrad_conv(x[i:i + chunk], dy[i:i + chunk]) for i in range(0, n, chunk))


def wgrad_conv(x: jax.Array, dy: jax.Array) -> jax.Array:
    """The kernel gradient as ONE canonical conv over the whole of x, dy (no chunking)."""
    out = lax.conv_general_dilated(jnp.transpose(x, (3, 1, 2, 0)), jnp.transpose(dy, (1, 2, 0, 3)),
                                   (1, 1), _PAD, dimension_numbers=_DN)
    return jnp.transpose(out, (1, 2, 0, 3))


def _conv_fwd(x, w):
    return conv3x3(x, w), (x, w)


def _conv_bwd(res, g):
    x, w = res
    return conv3x3(g, _flip(w)), conv3x3_wgrad(x, g)


def _wgrad_fwd(x, dy):
    return conv3x3_wgrad(x, dy), (x, dy)


def _wgrad_bwd(res, gk):
    # conv3x3_wgrad is bilinear: its cotangents are the two convs that pair gk with dy and x.
    x, dy = res
    return conv3x3(dy, _flip(gk)), conv3x3(x, gk)


conv3x3.defvjp(_conv_fwd, _conv_bwd)
conv3x3_wgrad.defvjp(_wgrad_fwd, _wgrad_bwd)
