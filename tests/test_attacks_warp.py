"""attacks.warp: grid_sample and bicubic upsampling against PyTorch, WaNet's field and its builder."""
import numpy as np
import pytest

from ibau_jax import attacks
from ibau_jax.attacks import warp as W


def _rand(n=4, seed=0):
    return np.random.default_rng(seed).random((n, 32, 32, 3), dtype=np.float32)


def test_identity_grid_is_the_pixel_centres_and_warps_to_the_image():
    g = W.identity_grid(4, 5)
    assert g.shape == (4, 5, 2) and g.dtype == np.float32
    np.testing.assert_allclose(g[2, :, 0], np.linspace(-1, 1, 5))  # x varies along columns
    np.testing.assert_allclose(g[:, 3, 1], np.linspace(-1, 1, 4))  # y along rows
    x = _rand(2)
    # float32 grid coordinates land within ~1e-6 pixels of the centres
    np.testing.assert_allclose(np.asarray(W.warp(x, W.identity_grid(32, 32))), x, atol=1e-5)


def test_warp_matches_torch_grid_sample():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    x = rng.random((3, 8, 9, 2), dtype=np.float32)
    grid = rng.uniform(-1.2, 1.2, (3, 8, 9, 2)).astype(np.float32)  # some taps fall outside: zero padding
    ref = torch.nn.functional.grid_sample(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(grid),
                                          mode="bilinear", padding_mode="zeros", align_corners=True)
    ref = ref.permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(np.asarray(W.warp(x, grid)), ref, atol=1e-5)  # per-image grids
    shared = np.asarray(W.warp(x, grid[0]))  # one grid for the batch
    np.testing.assert_allclose(shared[0], ref[0], atol=1e-5)
    np.testing.assert_allclose(np.asarray(W.warp(x[2], grid[2])), ref[2], atol=1e-5)  # one image


@pytest.mark.parametrize("n_in,n_out", [(4, 32), (4, 43), (5, 7)])
def test_bicubic_matrix_matches_torch_interpolate(n_in, n_out):
    torch = pytest.importorskip("torch")
    v = np.random.default_rng(2).uniform(-1, 1, (n_in, n_in))
    ref = torch.nn.functional.interpolate(torch.from_numpy(v)[None, None], size=(n_out, n_out),
                                          mode="bicubic", align_corners=True)[0, 0].numpy()
    m = W.bicubic_matrix(n_in, n_out)
    assert m.shape == (n_out, n_in)
    np.testing.assert_allclose(m @ v @ m.T, ref, atol=1e-10)


def test_wanet_grid_formula():
    # the docstring's recipe, written out with torch-free numpy: ins / mean|ins|, bicubic, scale, clip
    k, s, seed = 4, 0.5, 3
    ins = np.random.default_rng(seed).uniform(-1, 1, (2, k, k))
    ins = ins / np.abs(ins).mean()
    m = W.bicubic_matrix(k, 32)
    up = np.stack([m @ ins[c] @ m.T for c in range(2)], -1)
    expect = np.clip(W.identity_grid(32, 32) + s * up / 32, -1, 1)
    np.testing.assert_allclose(W.wanet_grid((32, 32, 3), k, s, 1.0, seed), expect, atol=1e-6)


def test_wanet_identity_at_zero_strength_and_smooth():
    x = _rand(4)
    a0 = attacks.get("wanet", num_classes=10, s=0.0)
    np.testing.assert_allclose(np.asarray(a0.apply(x)), x, atol=1e-5)
    a = attacks.get("wanet", num_classes=10, target=2)
    assert a.params == {"k": 4, "s": 0.5, "grid_rescale": 1.0, "noise": True, "cross_ratio": 2.0, "seed": 0}
    assert a.noise and a.cross_ratio == 2.0 and a.keep is None
    out = np.asarray(a.apply(x))
    assert np.abs(out - x).max() > 0.1 and out.min() >= 0 and out.max() <= 1
    # bilinear sampling is exact on a linear ramp: the output is the sampling position itself
    ramp = np.broadcast_to((np.arange(32) / 31.0)[None, None, :, None], (1, 32, 32, 3)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(a.apply(ramp))[0, :, :, 0], (a.grid[..., 0] + 1) / 2, atol=1e-5)
    const = np.full((1, 32, 32, 3), 0.4, np.float32)
    np.testing.assert_allclose(np.asarray(a.apply(const)), const, atol=1e-6)
    # smooth: a sub-pixel displacement field whose neighbouring values differ far less than its size
    disp = (a.grid - attacks.identity_grid(32, 32)) * 15.5  # in pixels
    assert 0.05 < np.abs(disp).max() < 1.5
    inner = disp[1:-1, 1:-1]  # the outermost rows/cols are where the clip to [-1, 1] bites
    step = max(np.abs(np.diff(inner, axis=0)).max(), np.abs(np.diff(inner, axis=1)).max())
    assert step < 0.25 * np.abs(disp).max()
    # noise mode grids: random, different from the fixed grid, within [-1, 1]
    g = a.noise_grids(3, np.random.default_rng(0))
    assert g.shape == (3, 32, 32, 2) and np.abs(g).max() <= 1
    assert 0 < np.abs(g - a.grid).max() <= 1 / 32 + 1e-6


def test_wanet_option_checks():
    with pytest.raises(attacks.AttackError, match="k .* must be at least 2, got 1"):
        attacks.get("wanet", num_classes=10, k=1)
    with pytest.raises(attacks.AttackError, match="cross_ratio must be >= 0"):
        attacks.get("wanet", num_classes=10, cross_ratio=-1)
    with pytest.raises(attacks.AttackError, match="only wanet has a noise mode"):
        attacks.get("badnets", num_classes=10).noise_grids(1, np.random.default_rng(0))
