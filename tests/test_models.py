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


# ----------------------------------------------------------------------------- CIFAR ResNets

RESNETS = ["preact_resnet18", "resnet18"]


def _x(n=2, seed=0):
    return jnp.asarray(np.random.default_rng(seed).random((n, 32, 32, 3), np.float32))


def _resnet18_param_count(preact: bool, classes: int) -> int:
    """Trainable parameters of the CIFAR (PreAct-)ResNet-18, counted from the architecture."""
    conv = lambda k, ci, co: k * k * ci * co          # bias-free
    bn = lambda c: 2 * c                              # scale, bias
    total = conv(3, 3, 64) + (0 if preact else bn(64))  # stem (PreAct: no stem BN)
    c_in = 64
    for stage, width in enumerate([64, 128, 256, 512]):
        for b in range(2):
            stride = 2 if stage > 0 and b == 0 else 1
            total += conv(3, c_in, width) + conv(3, width, width)
            total += bn(c_in) + bn(width) if preact else bn(width) + bn(width)
            if stride != 1 or c_in != width:
                total += conv(1, c_in, width) + (0 if preact else bn(width))
            c_in = width
    return total + 512 * classes + classes            # linear


@pytest.mark.parametrize("name", RESNETS)
def test_resnet_shapes(name):
    for classes in (10, 43):
        m = models.get_model(name, classes)
        v = models.init_variables(m)
        assert m.apply(v, _x()).shape == (2, classes)


@pytest.mark.parametrize("name,preact", [("preact_resnet18", True), ("resnet18", False)])
@pytest.mark.parametrize("classes", [10, 43])
def test_resnet_param_count(name, preact, classes):
    m = models.get_model(name, classes)
    shapes = jax.eval_shape(lambda: models.init_variables(m))
    n = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(shapes["params"]))
    assert n == _resnet18_param_count(preact, classes)
    if classes == 10:  # the published pytorch-cifar figures
        assert n == (11_171_146 if preact else 11_173_962)


@pytest.mark.parametrize("name", RESNETS)
def test_resnet_train_mode_and_grad(name):
    m = models.get_model(name, 10)
    v = models.init_variables(m)
    x, y = _x(), jnp.array([1, 7])
    out, upd = m.apply(v, x, train=True, mutable=["batch_stats"])
    assert out.shape == (2, 10)
    old, new = v["batch_stats"], upd["batch_stats"]
    assert jax.tree.structure(old) == jax.tree.structure(new)
    assert not np.allclose(new["layer1_0"]["bn1"]["mean"], old["layer1_0"]["bn1"]["mean"])
    # eval mode (as the I-BAU round calls it) uses the running stats and is deterministic
    np.testing.assert_array_equal(m.apply(v, x, train=False), m.apply(v, x))

    def loss(params):
        logits, _ = m.apply({"params": params, "batch_stats": v["batch_stats"]}, x, train=True,
                            mutable=["batch_stats"])
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(2), y])

    g = jax.grad(loss)(v["params"])
    leaves = jax.tree.leaves(g)
    assert all(bool(jnp.all(jnp.isfinite(a))) for a in leaves)
    assert any(float(jnp.abs(a).max()) > 0 for a in leaves)
    assert float(jnp.abs(g["conv1"]["kernel"]).max()) > 0


def test_resnet_conv_impls_agree():
    x = _x()
    a, b = models.ResNet18(conv_impl="canonical"), models.ResNet18(conv_impl="xla")
    v = models.init_variables(a)
    np.testing.assert_allclose(a.apply(v, x), b.apply(v, x), rtol=1e-4, atol=1e-4)


def test_unknown_model_lists_choices():
    with pytest.raises(ValueError) as e:
        models.get_model("resnet999", 10)
    for name in ("small_vgg", "preact_resnet18", "resnet18"):
        assert name in str(e.value)


def _pool_ref(x):
    import flax.linen as nn
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
    import flax.linen as nn
    x = jnp.linspace(-20.0, 5.0, 10001, dtype=jnp.float32)
    np.testing.assert_allclose(models.elu(x), nn.elu(x), rtol=0, atol=2e-7)
    d, d_ref = jax.vmap(jax.grad(models.elu))(x), jax.vmap(jax.grad(nn.elu))(x)
    np.testing.assert_allclose(d, d_ref, rtol=0, atol=2e-7)
