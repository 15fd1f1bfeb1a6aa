"""Image warping for WaNet: the identity grid, WaNet's fixed warping field, and ``grid_sample``.

Grids are (H, W, 2) (or (N, H, W, 2)) with grid[..., 0] the column (x) and grid[..., 1] the
row (y) coordinate in [-1, 1], corners at -1 and 1 (PyTorch's ``align_corners=True``).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


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


def bicubic_matrix(n_in: int, n_out: int, a: float = -0.75) -> np.ndarray:
    """(n_out, n_in) float64 matrix of PyTorch's bicubic upsampling, align_corners=True (A = -0.75).

    Output sample i sits at real = i * (n_in - 1) / (n_out - 1); its four taps i0-1..i0+2
    (i0 = floor(real), clamped to the border) get Keys' cubic weights of t = real - i0.
    """
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
    up = np.einsum("hk,ckl,wl->hwc", bicubic_matrix(k, h), ins, bicubic_matrix(k, w))
    disp = s * up / np.array([w, h], np.float64)
    grid = (identity_grid(h, w).astype(np.float64) + disp) * grid_rescale
    return np.clip(grid, -1.0, 1.0).astype(np.float32)
