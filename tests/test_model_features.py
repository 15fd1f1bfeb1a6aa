"""models/features.py: the named intermediates the models sow."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ibau_jax import models


def _x(n=2, seed=0):
    return jnp.asarray(np.random.default_rng(seed).random((n, 32, 32, 3), np.float32))


def test_small_vgg_features():
    m = models.SmallVGG()
    v = models.init_variables(m, seed=1)
    x = _x()
    f = models.features(m, v, x)
    assert {k: a.shape for k, a in f.items()} == {"block1": (2, 16, 16, 32), "block2": (2, 8, 8, 64),
                                                  "block3": (2, 4, 4, 128), "features": (2, 2048)}
    # "features" is the classifier's input: block 3 flattened in NCHW order
    np.testing.assert_array_equal(f["features"], np.transpose(f["block3"], (0, 3, 1, 2)).reshape(2, -1))
    dense = v["params"]["classifier"]
    np.testing.assert_allclose(f["features"] @ dense["kernel"] + dense["bias"], m.apply(v, x), rtol=1e-5, atol=1e-5)


def test_small_vgg_blocks_are_sown_before_dropout():
    """Train mode: the classifier's input is dropout(block3) = block3 / 0.6 where kept, 0 elsewhere."""
    m = models.SmallVGG()
    v = models.init_variables(m, seed=1)
    _, state = m.apply(v, _x(), train=True, rngs={"dropout": jax.random.PRNGKey(0)},
                       mutable=["batch_stats", "intermediates"])
    f = models.sown(state["intermediates"])
    block3 = np.transpose(f["block3"], (0, 3, 1, 2)).reshape(2, -1)
    kept = np.asarray(f["features"]) != 0
    assert 0.5 < kept.mean() < 0.7 and np.all(block3 != 0)           # ELU+pool outputs are nonzero
    np.testing.assert_allclose(np.asarray(f["features"])[kept], block3[kept] / 0.6, rtol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["preact_resnet18", "resnet18"])
def test_resnet_features(name):
    m = models.get_model(name, 10)
    v = models.init_variables(m, seed=1)
    x = _x()
    f = models.features(m, v, x)
    assert {k: a.shape for k, a in f.items()} == {"layer1": (2, 32, 32, 64), "layer2": (2, 16, 16, 128),
                                                  "layer3": (2, 8, 8, 256), "layer4": (2, 4, 4, 512),
                                                  "features": (2, 512)}
    np.testing.assert_allclose(f["features"], np.mean(np.asarray(f["layer4"], np.float64), axis=(1, 2)),
                               rtol=1e-5, atol=1e-6)
    dense = v["params"]["linear"]
    np.testing.assert_allclose(f["features"] @ dense["kernel"] + dense["bias"], m.apply(v, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["small_vgg", pytest.param("resnet18", marks=pytest.mark.slow)])
def test_sowing_leaves_the_default_apply_bitwise_unchanged(name):
    m = models.get_model(name, 10)
    v = models.init_variables(m, seed=1)
    x = _x()
    plain = m.apply(v, x)
    assert isinstance(plain, jax.Array)                 # no state returned: nothing was sown
    logits, state = m.apply(v, x, mutable=["intermediates"])
    np.testing.assert_array_equal(logits, plain)
    assert set(state["intermediates"]) == set(models.features(m, v, x))


def test_feature_selection_jit_and_unknown_name():
    m = models.get_model("resnet18", 10)
    v = models.init_variables(m)
    x = _x()
    f = jax.jit(lambda v, x: models.features(m, v, x, names=["layer2", "features"]))(v, x)
    assert set(f) == {"layer2", "features"}          # jit returns dicts with sorted keys
    assert list(models.features(m, v, x, names=["layer2", "features"])) == ["layer2", "features"]
    np.testing.assert_allclose(f["layer2"], models.features(m, v, x)["layer2"], rtol=1e-5, atol=1e-5)
    with pytest.raises(models.ModelError, match=r"unknown feature name\(s\) \['block1'\]; this model sows \['layer1'"):
        models.features(m, v, x, names=["block1"])
