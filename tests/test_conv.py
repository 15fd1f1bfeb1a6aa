"""Tests of ibau_jax.conv: conv3x3 / conv3x3_wgrad and their custom VJPs, to third order.

References: ``jax.lax.conv_general_dilated`` (differentiated by JAX itself) and einsums over
the zero-padded input. float64 via a per-test ``jax.enable_x64`` context, except the float32
check at the small-VGG layer shape.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ibau_jax.models.conv import conv3x3, conv3x3_wgrad

F64 = jnp.float64


@pytest.fixture(autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


def lax_conv(x, w):
    return jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def einsum_conv(x, w):
    """y[n,h,w,o] = Σ_{i,j,c} xpad[n,h+i,w+j,c] w[i,j,c,o], in numpy."""
    x, w = np.asarray(x), np.asarray(w)
    N, H, W, _ = x.shape
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    y = np.zeros((N, H, W, w.shape[3]))
    for i in range(3):
        for j in range(3):
            y += np.einsum("nhwc,co->nhwo", xp[:, i:i + H, j:j + W, :], w[i, j])
    return y


def einsum_wgrad(x, dy):
    """g[i,j,c,o] = Σ_{n,h,w} xpad[n,h+i,w+j,c] dy[n,h,w,o], in numpy."""
    x, dy = np.asarray(x), np.asarray(dy)
    _, H, W, _ = x.shape
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return np.stack([np.stack([np.einsum("nhwc,nhwo->co", xp[:, i:i + H, j:j + W, :], dy)
                               for j in range(3)]) for i in range(3)])


def rand(seed, *shape, dtype=F64):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype=dtype)


def rel_err(a, b) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


# (N, H, W, Ci, Co); (1, 4, 6, ...): H≠W; N = 9: two whole weight-gradient chunks and a remainder
SHAPES = [(2, 5, 5, 3, 4), (2, 8, 8, 3, 4), (1, 4, 6, 2, 5), (9, 5, 5, 3, 4)]


@pytest.mark.parametrize("N,H,W,Ci,Co", SHAPES)
def test_forward_matches_lax_and_einsum(N, H, W, Ci, Co):
    x, w = rand(0, N, H, W, Ci), rand(1, 3, 3, Ci, Co)
    y = conv3x3(x, w)
    assert y.shape == (N, H, W, Co) and y.dtype == F64
    np.testing.assert_allclose(np.asarray(y), np.asarray(lax_conv(x, w)), rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(np.asarray(y), einsum_conv(x, w), rtol=1e-12, atol=1e-12)
    # and the einsum reference is not trivially satisfied (kernel is not flipped/transposed)
    assert rel_err(einsum_conv(x, w[::-1, ::-1]), np.asarray(y)) > 0.1


@pytest.mark.parametrize("N,H,W,Ci,Co", SHAPES)
def test_wgrad_matches_einsum(N, H, W, Ci, Co):
    x, dy = rand(2, N, H, W, Ci), rand(3, N, H, W, Co)
    g = conv3x3_wgrad(x, dy)
    assert g.shape == (3, 3, Ci, Co)
    np.testing.assert_allclose(np.asarray(g), einsum_wgrad(x, dy), rtol=1e-12, atol=1e-12)
    # it is the kernel gradient of the lax conv
    _, vjp = jax.vjp(lambda w_: lax_conv(x, w_), jnp.zeros((3, 3, Ci, Co), F64))
    np.testing.assert_allclose(np.asarray(g), np.asarray(vjp(dy)[0]), rtol=1e-12, atol=1e-12)


def _loss(conv):
    return lambda x, w: jnp.sum(jnp.sin(conv(x, w)))


@pytest.mark.parametrize("N,H,W,Ci,Co", SHAPES)
def test_first_order_grads(N, H, W, Ci, Co):
    x, w = rand(4, N, H, W, Ci), rand(5, 3, 3, Ci, Co)
    gx, gw = jax.grad(_loss(conv3x3), (0, 1))(x, w)
    rx, rw = jax.grad(_loss(lax_conv), (0, 1))(x, w)
    assert rel_err(gx, rx) <= 1e-10 and rel_err(gw, rw) <= 1e-10
    np.testing.assert_allclose(np.asarray(gx), np.asarray(rx), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(np.asarray(gw), np.asarray(rw), rtol=1e-10, atol=1e-12)


def _second(conv):
    g1 = jax.grad(_loss(conv), (0, 1))

    def f(x, w):
        gx, gw = g1(x, w)
        return jnp.sum(jnp.cos(gx)) + jnp.sum(gw ** 2)
    return f


@pytest.mark.parametrize("N,H,W,Ci,Co", SHAPES[:2] + SHAPES[2:])
def test_grad_of_grad(N, H, W, Ci, Co):
    x, w = rand(6, N, H, W, Ci), rand(7, 3, 3, Ci, Co)
    hx, hw = jax.grad(_second(conv3x3), (0, 1))(x, w)
    rx, rw = jax.grad(_second(lax_conv), (0, 1))(x, w)
    assert rel_err(hx, rx) <= 1e-10, rel_err(hx, rx)
    assert rel_err(hw, rw) <= 1e-10, rel_err(hw, rw)


def test_hessian_vector_products():
    N, H, W, Ci, Co = 2, 5, 5, 3, 4
    x, w = rand(8, N, H, W, Ci), rand(9, 3, 3, Ci, Co)
    u = rand(10, N, H, W, Ci)

    def hvps(conv):
        gx_fn = lambda x_, w_: jax.grad(_loss(conv), 0)(x_, w_)
        _, vjp = jax.vjp(gx_fn, x, w)         # u ↦ (H_xx u, H_wx u)
        return vjp(u)

    (ax, aw), (bx, bw) = hvps(conv3x3), hvps(lax_conv)
    assert rel_err(ax, bx) <= 1e-10 and rel_err(aw, bw) <= 1e-10
    # the mixed block is nonzero, so the w-part is really checked
    assert float(jnp.linalg.norm(bw)) > 1e-3

    # and against a finite difference of the input gradient along u (sanity of the reference)
    h = 1e-5
    gx = lambda x_: jax.grad(_loss(lax_conv), 0)(x_, w)
    fd = (gx(x + h * u) - gx(x - h * u)) / (2 * h)
    assert rel_err(ax, fd) <= 1e-7          # H_xx symmetric: vjp == jvp


def test_vjp_of_wgrad_directly():
    # the custom VJP of conv3x3_wgrad against JAX's own VJP of the lax kernel-gradient
    N, H, W, Ci, Co = 2, 5, 6, 3, 4
    x, dy, gk = rand(11, N, H, W, Ci), rand(12, N, H, W, Co), rand(13, 3, 3, Ci, Co)

    def lax_wgrad(x_, dy_):
        _, vjp = jax.vjp(lambda w_: lax_conv(x_, w_), jnp.zeros((3, 3, Ci, Co), F64))
        return vjp(dy_)[0]

    _, vjp_a = jax.vjp(conv3x3_wgrad, x, dy)
    _, vjp_b = jax.vjp(lax_wgrad, x, dy)
    for a, b in zip(vjp_a(gk), vjp_b(gk)):
        assert rel_err(a, b) <= 1e-10


def test_third_order():
    N, H, W, Ci, Co = 1, 3, 4, 2, 2
    x, w = rand(14, N, H, W, Ci), rand(15, 3, 3, Ci, Co)
    cw = rand(16, 3, 3, Ci, Co)

    def third(conv):
        g1 = jax.grad(_loss(conv), (0, 1))

        def h2(x_, w_):
            gx, gw = g1(x_, w_)
            return jnp.sum(jnp.sin(gx)) + jnp.sum(gw * cw)
        g2 = jax.grad(h2, (0, 1))

        def h3(x_, w_):
            gx, gw = g2(x_, w_)
            return jnp.sum(jnp.tanh(gx)) + jnp.sum(gw ** 2)
        return jax.grad(h3, (0, 1))(x, w)

    (ax, aw), (bx, bw) = third(conv3x3), third(lax_conv)
    assert rel_err(ax, bx) <= 1e-10, rel_err(ax, bx)
    assert rel_err(aw, bw) <= 1e-10, rel_err(aw, bw)


def test_forward_mode_is_unsupported():
    # documented limitation of custom_vjp
    x, w = rand(17, 1, 3, 3, 1), rand(18, 3, 3, 1, 1)
    with pytest.raises(TypeError):
        jax.jvp(conv3x3, (x, w), (x, w))


def test_float32_small_vgg_shape():
    with jax.enable_x64(False):
        N, H, W, Ci, Co = 4, 32, 32, 32, 32
        x = rand(19, N, H, W, Ci, dtype=jnp.float32)
        w = rand(20, 3, 3, Ci, Co, dtype=jnp.float32) * 0.1
        y = conv3x3(x, w)
        assert y.dtype == jnp.float32
        assert rel_err(y, lax_conv(x, w)) <= 1e-4
        gx, gw = jax.grad(_loss(conv3x3), (0, 1))(x, w)
        rx, rw = jax.grad(_loss(lax_conv), (0, 1))(x, w)
        assert gx.dtype == gw.dtype == jnp.float32
        assert rel_err(gx, rx) <= 1e-4 and rel_err(gw, rw) <= 1e-4
        dy = rand(21, N, H, W, Co, dtype=jnp.float32)
        assert rel_err(conv3x3_wgrad(x, dy), einsum_wgrad(x, dy)) <= 1e-4


def test_inside_scan():
    B, N, H, W, Ci, Co = 3, 2, 5, 5, 3, 4
    xs, w = rand(22, B, N, H, W, Ci), rand(23, 3, 3, Ci, Co)
    us = rand(24, B, N, H, W, Ci)

    def per_batch(conv, x, u, w_):
        gx, gw = jax.grad(_loss(conv), (0, 1))(x, w_)
        # second order inside the scan body as well: VJP of the input gradient
        _, vjp = jax.vjp(lambda x_, ww: jax.grad(_loss(conv), 0)(x_, ww), x, w_)
        hx, hw = vjp(u)
        return gx, gw, hx, hw

    def scanned(w_):
        def body(carry, xu):
            out = per_batch(conv3x3, xu[0], xu[1], w_)
            return carry + out[1], out
        return jax.lax.scan(body, jnp.zeros_like(w_), (xs, us))

    total, (gxs, gws, hxs, hws) = jax.jit(scanned)(w)
    for b in range(B):
        ref = per_batch(lax_conv, xs[b], us[b], w)
        for got, r in zip((gxs[b], gws[b], hxs[b], hws[b]), ref):
            assert rel_err(got, r) <= 1e-10
    assert rel_err(total, sum(per_batch(lax_conv, xs[b], us[b], w)[1] for b in range(B))) <= 1e-10
    # differentiating through the scan (grad of a scan of grads) also matches
    g_scan = jax.grad(lambda w_: jnp.sum(jnp.sin(scanned(w_)[0])))(w)
    g_ref = jax.grad(lambda w_: jnp.sum(jnp.sin(
        sum(jax.grad(_loss(lax_conv), 1)(xs[b], w_) for b in range(B)))))(w)
    assert rel_err(g_scan, g_ref) <= 1e-10


def test_three_input_channels_run_as_four_on_cpu():
    """On CPU an RGB input gets a zero 4th channel (XLA's conv is far faster there); same values."""
    x, w = rand(0, 2, 5, 5, 3, dtype=jnp.float32), rand(1, 3, 3, 3, 4, dtype=jnp.float32)
    jaxpr = str(jax.make_jaxpr(conv3x3)(x, w))
    padded = "f32[2,5,5,4]" in jaxpr and "f32[3,3,4,4]" in jaxpr
    assert padded == (jax.default_backend() == "cpu")
    np.testing.assert_allclose(conv3x3(x, w), einsum_conv(x, w), rtol=1e-5, atol=1e-5)
    # gradients still come from the custom VJP, in the unpadded shapes
    gx, gw = jax.grad(lambda a, b: jnp.sum(conv3x3(a, b) ** 2), argnums=(0, 1))(x, w)
    assert gx.shape == x.shape and gw.shape == w.shape
    rx, rw = jax.grad(lambda a, b: jnp.sum(lax_conv(a, b) ** 2), argnums=(0, 1))(x, w)
    np.testing.assert_allclose(gx, rx, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(gw, rw, rtol=1e-4, atol=1e-4)
