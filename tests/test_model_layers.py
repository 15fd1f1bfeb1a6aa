"""models/layers.py: pooling, ELU, and the BN helper's padded-example mask in every model."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ibau_jax import models
from ibau_jax.errors import UserError


def _pool_ref(x):
    return nn.max_pool(x, (2, 2), strides=(2, 2))


def test_max_pool_2x2_matches_reduce_window_with_ties():
    """Values, gradient and Hessian-vector product equal nn.max_pool's, on data full of ties
    (the first maximum of a window gets the whole gradient, not a share)."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.integers(0, 3, (2, 8, 6, 3)).astype(np.float64))   # 3 values: many ties
        w = jnp.asarray(rng.normal(size=(2, 4, 3, 3)))
        v = jnp.asarray(rng.normal(size=x.shape))
        f = lambda pool: (lambda x: jnp.sum(jnp.sin(pool(x)) * w))
        np.testing.assert_array_equal(models.max_pool_2x2(x), _pool_ref(x))
        g, g_ref = jax.grad(f(models.max_pool_2x2))(x), jax.grad(f(_pool_ref))(x)
        assert int(jnp.sum(g_ref != 0)) == 2 * 4 * 3 * 3   # one nonzero per window: first-wins
        np.testing.assert_array_equal(g, g_ref)
        hvp = lambda pool: jax.grad(lambda x: jnp.vdot(jax.grad(f(pool))(x), v))(x)
        np.testing.assert_allclose(hvp(models.max_pool_2x2), hvp(_pool_ref), rtol=1e-12, atol=1e-12)


def test_max_pool_2x2_odd_shape_falls_back():
    x = jnp.arange(2 * 5 * 4 * 1, dtype=jnp.float32).reshape(2, 5, 4, 1)
    np.testing.assert_array_equal(models.max_pool_2x2(x), _pool_ref(x))


def test_elu_matches_expm1_elu():
    x = jnp.linspace(-20.0, 5.0, 10001, dtype=jnp.float32)
    np.testing.assert_allclose(models.elu(x), nn.elu(x), rtol=0, atol=2e-7)
    d, d_ref = jax.vmap(jax.grad(models.elu))(x), jax.vmap(jax.grad(nn.elu))(x)
    np.testing.assert_allclose(d, d_ref, rtol=0, atol=2e-7)


def test_unknown_conv_impl_is_a_user_error():
    with pytest.raises(models.ModelError, match="'canonical' or 'xla'"):
        models.init_variables(models.SmallVGG(conv_impl="cudnn"))


# ----------------------------------------------------------------------------- padded batches

def _model(name):
    if name == "small_vgg":   # no dropout: its masks depend on the batch size, BN's statistics do not
        return models.SmallVGG(dropout=(0.0, 0.0, 0.0))
    return models.get_model(name, 10)


def _padded_vs_real(m, v, dtype):
    """(outputs, batch_stats) of train mode on 3 real rows, and on them + 2 zero rows with
    example_mask [1, 1, 1, 0, 0] (outputs cut to the real rows), and batch_stats unmasked."""
    v = jax.tree.map(lambda a: a.astype(dtype), v)
    x = jnp.asarray(np.random.default_rng(1).random((3, 32, 32, 3)), dtype)
    padded = jnp.concatenate([x, jnp.zeros((2, 32, 32, 3), dtype)])
    keep = jnp.asarray([1, 1, 1, 0, 0], dtype)
    out, upd = m.apply(v, x, train=True, mutable=["batch_stats"])
    out_p, upd_p = m.apply(v, padded, train=True, example_mask=keep, mutable=["batch_stats"])
    _, upd_u = m.apply(v, padded, train=True, mutable=["batch_stats"])
    return (out, upd["batch_stats"]), (out_p[:3], upd_p["batch_stats"]), upd_u["batch_stats"]


def _close(a, b, tol):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=tol, atol=tol), a, b)


@pytest.mark.parametrize("name", ["small_vgg", "preact_resnet18", "resnet18"])
def test_example_mask_makes_padding_invisible_to_batch_norm(name):
    """Train mode on 3 real rows + 2 zero rows with the example mask gives the running
    statistics and real-row outputs of train mode on the 3 rows alone."""
    m = _model(name)
    (out, stats), (out_p, stats_p), stats_unmasked = _padded_vs_real(m, models.init_variables(m, seed=3),
                                                                     jnp.float32)
    _close(stats_p, stats, 1e-6)
    # Outputs: train-mode BN over 3 rows is ill-conditioned; float32 rounding alone moves the
    # logits by ~4e-6 (against float64), so 1e-5 here, and the float64 run below checks tightly.
    _close(out_p, out, 1e-5)
    # without the mask the zero rows shift the statistics: the test can tell
    diff = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), stats_unmasked, stats)
    assert max(jax.tree.leaves(diff)) > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("name", ["small_vgg", "resnet18"])
def test_example_mask_padding_float64(name):
    m = _model(name)
    v = models.init_variables(m, seed=3)     # outside x64: init under x64 mixes dtypes
    with jax.enable_x64(True):
        (out, stats), (out_p, stats_p), _ = _padded_vs_real(m, v, jnp.float64)
        assert out.dtype == jnp.float64
        _close(stats_p, stats, 1e-10)
        _close(out_p, out, 1e-10)


def test_example_mask_is_ignored_in_eval_mode():
    m = models.get_model("resnet18", 10)
    v = models.init_variables(m)
    x = jnp.asarray(np.random.default_rng(1).random((2, 32, 32, 3), np.float32))
    np.testing.assert_array_equal(m.apply(v, x, example_mask=jnp.asarray([1.0, 0.0])), m.apply(v, x))


def test_example_mask_of_wrong_shape():
    m = models.get_model("small_vgg", 10)
    v = models.init_variables(m)
    x = jnp.zeros((4, 32, 32, 3), jnp.float32)
    with pytest.raises(UserError, match=r"example_mask has shape \(3,\), the batch has 4 examples"):
        m.apply(v, x, train=True, example_mask=jnp.ones(3), mutable=["batch_stats"],
                rngs={"dropout": jax.random.PRNGKey(0)})
