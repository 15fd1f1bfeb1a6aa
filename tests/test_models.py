"""models/__init__.py (the registry) and the models' shapes, layouts and modes."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ibau_jax import models
from ibau_jax.errors import UserError


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
    with pytest.raises(UserError, match="unknown model 'resnet999'"):
        models.get_model("resnet999", 10)
    with pytest.raises(models.ModelError, match="num_classes must be >= 2"):
        models.get_model("small_vgg", 1)


def test_register(monkeypatch):
    monkeypatch.setattr(models, "MODELS", dict(models.MODELS))
    models.register("tiny_vgg", lambda num_classes, **kw: models.SmallVGG(num_classes, widths=(4, 4, 4), **kw))
    m = models.get_model("tiny_vgg", 5, conv_impl="xla")
    assert (m.num_classes, tuple(m.widths), m.conv_impl) == (5, (4, 4, 4), "xla")
    with pytest.raises(models.ModelError, match="'small_vgg' is already registered"):
        models.register("small_vgg", models.ResNet18)
    assert models.MODELS["small_vgg"] is models.SmallVGG


@pytest.mark.parametrize("name", ["small_vgg", "preact_resnet18", "resnet18"])
def test_init_creates_only_params_and_batch_stats(name):
    shapes = jax.eval_shape(lambda: models.init_variables(models.get_model(name, 10)))
    assert sorted(shapes) == ["batch_stats", "params"]


class _PlainVGG(nn.Module):
    """SmallVGG as it was before features, neuron masks and example masks (frozen copy)."""

    @nn.compact
    def __call__(self, x, train=False):
        i = 0
        for width, rate in zip((32, 64, 128), (0.3, 0.4, 0.4)):
            for _ in range(2):
                x = models.Conv3x3(width, name=f"conv{i}")(x)
                x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=f"bn{i}")(x)
                x = models.elu(x)
                i += 1
            x = models.max_pool_2x2(x)
            x = nn.Dropout(rate, deterministic=not train)(x)
        x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)
        return nn.Dense(10, name="classifier")(x)


def test_small_vgg_is_bitwise_what_it_was():
    """Same variables (layout and initial values) and bitwise the same outputs and running
    statistics, eval and train mode, as the plain flax model it grew out of."""
    m, ref = models.SmallVGG(), _PlainVGG()
    v = models.init_variables(m, seed=2)
    jax.tree.map(np.testing.assert_array_equal, v, ref.init(jax.random.PRNGKey(2), jnp.zeros((1, 32, 32, 3))))
    x = _x(3)
    np.testing.assert_array_equal(m.apply(v, x), ref.apply(v, x))
    f = jax.jit(lambda v, x: m.apply(v, x))
    np.testing.assert_array_equal(f(v, x), jax.jit(lambda v, x: ref.apply(v, x))(v, x))
    kw = dict(train=True, rngs={"dropout": jax.random.PRNGKey(1)}, mutable=["batch_stats"])
    jax.tree.map(np.testing.assert_array_equal, m.apply(v, x, **kw), ref.apply(v, x, **kw))


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


@pytest.mark.slow
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


@pytest.mark.slow
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
    with pytest.raises(models.ModelError) as e:
        models.get_model("resnet999", 10)
    for name in ("small_vgg", "preact_resnet18", "resnet18"):
        assert name in str(e.value)
