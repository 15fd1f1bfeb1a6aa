import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ibau_jax import models


@pytest.mark.parametrize("classes", [10, 43])
def test_small_vgg_shapes_and_modes(classes):
    m = models.get_model("small_vgg", classes)
    v = models.init_variables(m)
    x = jnp.asarray(np.random.default_rng(0).random((2, 32, 32, 3), np.float32))
    assert m.apply(v, x).shape == (2, classes)
    # train mode: batch statistics and dropout change the output and update running stats
    out, upd = m.apply(v, x, train=True, rngs={"dropout": jax.random.PRNGKey(0)}, mutable=["batch_stats"])
    assert out.shape == (2, classes)
    assert not np.allclose(upd["batch_stats"]["bn0"]["mean"], v["batch_stats"]["bn0"]["mean"])


def test_conv_impls_agree():
    x = jnp.asarray(np.random.default_rng(0).random((2, 32, 32, 3), np.float32))
    a, b = models.SmallVGG(conv_impl="canonical"), models.SmallVGG(conv_impl="xla")
    v = models.init_variables(a)
    np.testing.assert_allclose(a.apply(v, x), b.apply(v, x), rtol=1e-5, atol=1e-5)


def test_unknown_model():
    with pytest.raises(ValueError, match="unknown model 'resnet999'"):
        models.get_model("resnet999", 10)
