"""DeepInspect (`deepinspect`): the generator, its loss, detection on a hand-set backdoor, the
digits demo's backdoor, and bad inputs."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ibau_jax import defenses
from ibau_jax.defenses.base import DivergenceError
from ibau_jax.defenses.deepinspect import DeepInspect, DeepInspectConfig, generator_loss
from ibau_jax.defenses.trigger_generator import ConvTranspose2x, TriggerGenerator
from ibau_jax.errors import ConfigError, UserError


class _Linear(nn.Module):
    """logits = W · flatten(x) + b, with the ``train`` flag of the library's models."""

    num_classes: int

    @nn.compact
    def __call__(self, x, train: bool = False):
        return nn.Dense(self.num_classes)(x.reshape(x.shape[0], -1))


def _backdoored_linear(num_classes=6, side=8, seed=0):
    """A hand-set linear model on (side, side, 1) images with a one-pixel backdoor to class 0.

    Class k ≥ 1 reads its own block of pixels (weight 1 on side²/K pixels, the blocks disjoint);
    class 0 reads only pixel (0, 0), with weight 20. Clean images have pixel (0, 0) = 0, so class
    0's logit is 0 on them and a bump of ~0.3 at that one pixel (L1 ≈ 0.3) sends any image to
    class 0, while reaching class k takes raising its block by the logit margin (L1 of units).
    """
    rng = np.random.default_rng(seed)
    n_pix, block = side * side, side * side // num_classes
    w = np.zeros((n_pix, num_classes), np.float32)
    for k in range(1, num_classes):
        w[k * block:(k + 1) * block, k] = 1.0
    w[0, 0] = 20.0
    variables = {"params": {"Dense_0": {"kernel": w, "bias": np.zeros(num_classes, np.float32)}}, "batch_stats": {}}
    x = rng.random((128, side, side, 1), dtype=np.float32)
    x[:, 0, 0, 0] = 0.0
    y = np.argmax(x.reshape(128, -1) @ w, -1)
    return _Linear(num_classes), variables, defenses.CleanSet(x, y, num_classes)


def test_generator_shape_bound_and_zero_start():
    gen = TriggerGenerator((7, 9, 3), num_classes=4, width=8, bound=0.5)
    z = jax.random.normal(jax.random.PRNGKey(1), (5, 16))
    c = jnp.array([0, 1, 2, 3, 1])
    params = gen.init(jax.random.PRNGKey(0), z, c)["params"]
    out = gen.apply({"params": params}, z, c)
    assert out.shape == (5, 7, 9, 3)
    assert float(jnp.max(jnp.abs(out))) == 0.0           # the last layer starts at zero: δ = 0
    big = jax.tree.map(lambda p: p + 3.0 * jax.random.normal(jax.random.PRNGKey(2), p.shape), params)
    out = np.asarray(gen.apply({"params": big}, z, c))
    assert np.abs(out).max() <= 0.5 and np.abs(out).max() > 0.45   # saturates at the tanh bound
    # the class condition matters: same z, different class -> different trigger
    same_z = jnp.repeat(z[:1], 2, axis=0)
    a, b = np.asarray(gen.apply({"params": big}, same_z, jnp.array([0, 1])))
    assert not np.allclose(a, b)


@pytest.mark.parametrize("shape", [(2, 4, 4, 3), (3, 5, 7, 2)])
def test_convtranspose2x_is_flax_convtranspose(shape):
    """The generator's upsampling equals nn.ConvTranspose(5x5, stride 2, SAME) with the same
    parameters and initialisation, in value and in the gradients of x and the kernel."""
    x = jax.random.normal(jax.random.PRNGKey(0), shape)
    ref, ours = nn.ConvTranspose(6, (5, 5), strides=(2, 2)), ConvTranspose2x(6)
    params = ref.init(jax.random.PRNGKey(1), x)
    jax.tree.map(np.testing.assert_array_equal, params, ours.init(jax.random.PRNGKey(1), x))  # same init
    params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.PRNGKey(2), p.shape), params)
    w = jax.random.normal(jax.random.PRNGKey(3), (shape[0], 2 * shape[1], 2 * shape[2], 6))
    y_ref, y = ref.apply(params, x), ours.apply(params, x)
    assert y.shape == y_ref.shape == w.shape
    np.testing.assert_allclose(y, y_ref, atol=1e-5)
    loss = lambda m: lambda p, x: jnp.sum(jnp.sin(m.apply(p, x)) * w)
    for g, g_ref in zip(jax.grad(loss(ours), (0, 1))(params, x), jax.grad(loss(ref), (0, 1))(params, x)):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4), g, g_ref)


def test_generator_loss_equals_numpy_reference():
    """CE of the clipped stamped images (one per class and image) + γ·mean L1, by hand in numpy."""
    model, variables, clean = _backdoored_linear(num_classes=3, side=4)
    gen = TriggerGenerator((4, 4, 1), num_classes=3, width=8)
    z = jax.random.normal(jax.random.PRNGKey(1), (3, 5, 6))
    params = gen.init(jax.random.PRNGKey(0), z[0], jnp.zeros(5, jnp.int32))["params"]
    params = jax.tree.map(lambda p: p + 0.3 * jax.random.normal(jax.random.PRNGKey(3), p.shape), params)
    x = clean.x[:5]
    loss, terms = generator_loss(gen, params, lambda v: model.apply(variables, v), jnp.asarray(x), z, 0.1)
    w, ces, l1s = variables["params"]["Dense_0"]["kernel"], [], []
    for k in range(3):
        d = np.asarray(gen.apply({"params": params}, z[k], jnp.full((5,), k)))
        logits = np.clip(x + d, 0, 1).reshape(5, -1).astype(np.float64) @ w
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        ces.extend(-logp[:, k])
        l1s.extend(np.abs(d).sum(axis=(1, 2, 3)))
    assert float(terms["ce"]) == pytest.approx(np.mean(ces), rel=1e-4)
    assert float(terms["l1"]) == pytest.approx(np.mean(l1s), rel=1e-5)
    assert float(loss) == pytest.approx(np.mean(ces) + 0.1 * np.mean(l1s), rel=1e-4)


def test_flags_the_hand_set_backdoor_class():
    """The one-pixel backdoor class gets by far the smallest generated trigger and is flagged;
    its triggers send (almost) every other image to it; without mitigation nothing changes.
    Measured: sizes [0.89, 7.31, 7.37, 7.60, 7.78, 7.75], anomaly index of class 0 20.5 (the
    others <= 0.92), generated-trigger attack success 1.0."""
    model, variables, clean = _backdoored_linear()
    res = DeepInspect(DeepInspectConfig(epochs=30, batch_size=32, lr=0.05, noise_dim=8, width=16,
                                        mitigate=False)).run(model, variables, clean, jax.random.PRNGKey(0))
    sizes = np.array(res.class_scores)
    assert int(np.argmin(sizes)) == 0 and res.flagged_classes == [0], (sizes, res.diagnostics["anomaly_index"])
    assert sizes[0] < 0.5 * np.sort(sizes)[1], sizes
    assert res.diagnostics["trigger_asr"][0] >= 0.95, res.diagnostics["trigger_asr"]
    assert res.diagnostics["mitigated"] is False and res.diagnostics["reason"] == "mitigate is off"
    assert res.history == [] and res.artifacts["triggers"].shape == (6, 8, 8, 1)
    assert len(res.diagnostics["generator_history"]) == 30 and res.compile_seconds > 0
    np.testing.assert_array_equal(res.variables["params"]["Dense_0"]["kernel"],
                                  variables["params"]["Dense_0"]["kernel"])


@pytest.mark.slow
def test_deepinspect_lowers_asr_on_the_digits_backdoor(digits_backdoor):
    """One generator epoch (37 steps of 8 images × 10 classes, Adam lr 0.1), 10 fine-tuning epochs.

    Measured on the 2-core CPU (heavily shared): class 0 flagged alone (anomaly index 3.07, its
    trigger size 111 against 204..317 for the others; its generated triggers send 97% of the other
    images to it); asr_all 0.953 -> 0.200, clean accuracy 0.977 -> 0.980 (``ft`` alone: asr_all
    0.883). 55 s. Thresholds: flagged == [0], asr_all <= 0.4, clean accuracy at most 0.05 lower.
    """
    d = digits_backdoor
    clean = defenses.CleanSet(d["clean_x"], d["clean_y"], 10)
    res = defenses.get("deepinspect", epochs=1, batch_size=8, lr=0.1, flip=False, crop_pad=2).run(
        d["model"], d["variables"], clean, jax.random.PRNGKey(0))
    after = d["evaluate"](res.variables)
    assert res.flagged_classes == [0], (res.class_scores, res.diagnostics["anomaly_index"])
    assert len(res.history) == 10 and res.diagnostics["mitigated"] is True
    assert res.diagnostics["patched_images"] == 60
    assert d["before"]["asr_all"] >= 0.9
    assert after["asr_all"] <= 0.4, (d["before"], after)
    assert after["clean_acc"] >= d["before"]["clean_acc"] - 0.05, (d["before"], after)


def test_deepinspect_errors():
    for bad, msg in (({"epochs": 0}, "epochs must be an integer >= 1"), ({"lr": 0.0}, "lr must be"),
                     ({"gamma": -1.0}, "gamma must be"), ({"patch_fraction": 1.5}, r"patch_fraction must be in \[0, 1\]"),
                     ({"bound": float("nan")}, "bound"), ({"crop_pad": -1}, "crop_pad")):
        with pytest.raises(ConfigError, match=msg):
            DeepInspectConfig(**bad)
    with pytest.raises(ConfigError, match="no field"):
        defenses.get("deepinspect", gamma_1=1.0)
    model, variables, clean = _backdoored_linear(num_classes=3, side=4)
    small = defenses.CleanSet(clean.x[:10], clean.y[:10], 3)
    with pytest.raises(ConfigError, match="fewer than one generator batch of 32"):
        DeepInspect().run(model, variables, small, jax.random.PRNGKey(0))
    with pytest.raises(ConfigError, match="fewer than one fine-tuning batch of 128"):
        DeepInspect(DeepInspectConfig(batch_size=8)).run(model, variables, small, jax.random.PRNGKey(0))
    # a model that outputs NaN makes the generator non-finite: a one-line UserError naming the fix
    nan_vars = jax.tree.map(lambda a: a, variables)
    nan_vars["params"]["Dense_0"]["bias"] = np.full(3, np.nan, np.float32)
    with pytest.raises(DivergenceError, match=r"trigger generator diverged; lower lr") as err:
        DeepInspect(DeepInspectConfig(epochs=1, batch_size=8, mitigate=False)).run(
            model, nan_vars, small, jax.random.PRNGKey(0))
    assert isinstance(err.value, UserError) and "\n" not in str(err.value)
