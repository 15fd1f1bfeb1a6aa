"""models/masks.py: per-channel neuron masks on BatchNorm outputs ("neuron_masks")."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ibau_jax import models

NAMES = ["small_vgg", "preact_resnet18", "resnet18"]


def _x(n=2, seed=0):
    return jnp.asarray(np.random.default_rng(seed).random((n, 32, 32, 3), np.float32))


def _paths(tree, prefix=""):
    """{"layer1_0/bn1": shape, ...} for the leaves of a nested dict."""
    out = {}
    for k, v in tree.items():
        out.update(_paths(v, f"{prefix}{k}/") if isinstance(v, dict) else {prefix + k: v.shape})
    return out


def _expected_bns(name):
    """{path: (C,)} of every BatchNorm, written out from the architectures' definitions."""
    if name == "small_vgg":
        return {f"bn{i}": (w,) for i, w in enumerate([32, 32, 64, 64, 128, 128])}
    preact = name == "preact_resnet18"
    out = {} if preact else {"bn1": (64,)}
    c_in = 64
    for s, width in enumerate([64, 128, 256, 512], start=1):
        for b in range(2):
            block = f"layer{s}_{b}/"
            out[block + "bn1"] = (c_in if preact else width,)   # PreAct: BN before the first conv
            out[block + "bn2"] = (width,)
            if not preact and (s > 1 and b == 0):
                out[block + "shortcut_bn"] = (width,)
            c_in = width
    return out


@pytest.mark.parametrize("name", NAMES)
def test_template_has_one_vector_of_ones_per_batch_norm(name):
    m = models.get_model(name, 10)
    v = models.init_variables(m)
    t = models.mask_template(m, v)
    assert _paths(t) == _expected_bns(name)
    assert all(bool(jnp.all(a == 1)) and a.dtype == jnp.float32 for a in jax.tree.leaves(t))
    # same names as the BN layers in batch_stats (whose leaves are {"mean", "var"} per BN)
    stats = {p.rsplit("/", 1)[0] for p, s in _paths(v["batch_stats"]).items()}
    assert set(_paths(t)) == stats


@pytest.mark.parametrize("name", NAMES)
def test_mask_of_ones_is_bitwise_the_unmasked_model(name):
    m = models.get_model(name, 10)
    v = models.init_variables(m, seed=1)
    x = _x()
    np.testing.assert_array_equal(m.apply({**v, "neuron_masks": models.mask_template(m, v)}, x), m.apply(v, x))


def _zero_channel_in_params(v, path, c):
    """The same pruning written in the parameters: BN scale and bias 0 at channel c make that
    output channel (x - mean)·0 + 0 = 0 exactly, whatever the input."""
    params = jax.tree.map(lambda a: a, v["params"])          # a copy to edit
    node = params
    for k in path.split("/"):
        node = node[k]
    node["scale"] = node["scale"].at[c].set(0.0)
    node["bias"] = node["bias"].at[c].set(0.0)
    return {**v, "params": params}


def _zero_channel_in_mask(t, path, c):
    t = jax.tree.map(lambda a: a, t)
    node = t
    *parents, last = path.split("/")
    for k in parents:
        node = node[k]
    node[last] = node[last].at[c].set(0.0)
    return t


@pytest.mark.parametrize("name", NAMES)
def test_zeroed_mask_channels_equal_zeroed_batch_norm_channels(name):
    """Channel c = 3 zeroed in the mask of every BN at once (each BN's mask must be read: an
    ignored one leaves a channel the reference zeroes), then in one BN alone."""
    m = models.get_model(name, 10)
    v = models.init_variables(m, seed=1)
    x = _x()
    apply = jax.jit(m.apply)
    t, ref_v = models.mask_template(m, v), v
    for path in _expected_bns(name):
        t, ref_v = _zero_channel_in_mask(t, path, 3), _zero_channel_in_params(ref_v, path, 3)
    out = apply({**v, "neuron_masks": t}, x)
    np.testing.assert_allclose(out, apply(ref_v, x), rtol=1e-6, atol=1e-6)
    assert float(jnp.max(jnp.abs(out - apply(v, x)))) > 1e-4      # the pruning did something
    one = "layer2_0/bn2" if name != "small_vgg" else "bn3"
    t = _zero_channel_in_mask(models.mask_template(m, v), one, 5)
    np.testing.assert_allclose(apply({**v, "neuron_masks": t}, x), apply(_zero_channel_in_params(v, one, 5), x),
                               rtol=1e-6, atol=1e-6)


def test_pruned_channel_is_zero_in_the_features():
    """SmallVGG: BN "bn1" feeds ELU then the pool of block 1; ELU(0) = 0, so a pruned channel
    of bn1 is exactly 0 in "block1" and the other channels are unchanged."""
    m = models.SmallVGG()
    v = models.init_variables(m, seed=1)
    x = _x()
    t = _zero_channel_in_mask(models.mask_template(m, v), "bn1", 7)
    pruned, full = models.features(m, {**v, "neuron_masks": t}, x)["block1"], models.features(m, v, x)["block1"]
    np.testing.assert_array_equal(pruned[..., 7], 0.0)
    assert float(jnp.max(jnp.abs(full[..., 7]))) > 0
    np.testing.assert_array_equal(np.delete(pruned, 7, -1), np.delete(full, 7, -1))


def test_masks_are_differentiable_and_partial_trees_allowed():
    """ANP optimizes soft masks: the logits' gradient w.r.t. a mask is finite and nonzero, and a
    tree with a single BN's mask is fine (the other BNs are unmasked)."""
    m = models.get_model("resnet18", 10)
    v = models.init_variables(m, seed=1)
    x = _x()
    masks = {"layer3_1": {"bn1": jnp.full((256,), 0.5, jnp.float32)}}
    g = jax.grad(lambda k: jnp.sum(m.apply({**v, "neuron_masks": k}, x) ** 2))(masks)
    leaf = g["layer3_1"]["bn1"]
    assert leaf.shape == (256,) and bool(jnp.all(jnp.isfinite(leaf))) and float(jnp.max(jnp.abs(leaf))) > 0


def test_wrong_mask_names_and_shapes_are_user_errors():
    m = models.get_model("resnet18", 10)
    v = models.init_variables(m)
    x = _x(1)
    with pytest.raises(models.ModelError, match=r"'layer1_0/bn9' names no BatchNorm of ResNet18.*'layer1_0/bn1'"):
        m.apply({**v, "neuron_masks": {"layer1_0": {"bn9": jnp.ones(64)}}}, x)
    with pytest.raises(models.ModelError, match=r"'bn1' has shape \(32,\), its BatchNorm has 64 channels"):
        m.apply({**v, "neuron_masks": {"bn1": jnp.ones(32)}}, x)
    with pytest.raises(models.ModelError, match="no 'batch_stats'"):
        models.mask_template(m, {"params": v["params"]})
