"""ibau_jax.training.dp: per-example gradients are a loop of single-example gradients, clipping
bounds every norm by C, the noise has std σ·C, the aggregate is optax's DP-SGD aggregate, and a
DP step with σ = 0 and C huge is the ordinary step; the CLI refuses bad DP flags in one line."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ibau_jax import cli, models, training
from ibau_jax.errors import ConfigError
from ibau_jax.models.layers import batch_norm
from ibau_jax.training import dp

# Tiny: compile stays cheap on 2 cores. No dropout, so the per-example pass and the batch pass
# see the same network.
TINY = models.SmallVGG(3, widths=(4, 4, 8), dropout=(0.0, 0.0, 0.0))


def _data(n=6, size=8, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.random((n, size, size, 3), dtype=np.float32), rng.integers(0, classes, n).astype(np.int32))


def _tree_norms(tree):
    """‖g_i‖ over the tree, in float64 numpy (leaves (B, ...))."""
    leaves = [np.asarray(g, np.float64).reshape(np.shape(g)[0], -1) for g in jax.tree.leaves(tree)]
    return np.sqrt(sum((g ** 2).sum(1) for g in leaves))


def _close(a, b, **kw):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **kw)


@pytest.fixture(scope="module")
def tiny():
    x, y = _data()
    config = training.TrainConfig(epochs=1, batch_size=6)
    state = training.create_state(TINY, config, steps_per_epoch=1, image_shape=(8, 8, 3))
    return state, jnp.asarray(x), jnp.asarray(y)


def test_per_example_grads_equal_a_loop_and_bn_uses_the_batch_statistics(tiny):
    state, x, y = tiny
    key = jax.random.PRNGKey(0)
    stats, running = dp.batch_statistics(state.apply_fn, state.params, state.batch_stats, x, key, {})
    # 1. The batch statistics are the per-channel mean and (biased) variance of BN's input
    #    (conv0's output for bn0), as numpy computes them; the running average moves by 0.1.
    _, inter = TINY.apply({"params": state.params, "batch_stats": state.batch_stats}, x,
                          capture_intermediates=lambda m, _: m.name == "conv0")
    h = np.asarray(inter["intermediates"]["conv0"]["__call__"][0], np.float64)
    np.testing.assert_allclose(stats["bn0"]["mean"], h.mean((0, 1, 2)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["bn0"]["var"], h.var((0, 1, 2)), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(running["bn0"]["mean"], 0.9 * 0 + 0.1 * h.mean((0, 1, 2)), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(running["bn0"]["var"], 0.9 * 1 + 0.1 * h.var((0, 1, 2)), rtol=1e-5)
    # 2. The frozen-BN loss is the eval-mode model with the batch statistics as running averages.
    loss = dp.frozen_bn_per_example_loss(state.apply_fn, stats)
    keys = jax.random.split(key, x.shape[0])
    eval_logits = TINY.apply({"params": state.params, "batch_stats": stats}, x, train=False)
    np.testing.assert_allclose(loss(state.params, x[2], y[2], keys[2])[1], eval_logits[2], rtol=1e-5, atol=1e-6)
    # 3. vmap(grad) equals a Python loop of single-example gradients.
    (losses, logits), grads = dp.per_example_grads(loss, state.params, x, y, keys)
    for i in range(x.shape[0]):
        (li, _), gi = jax.value_and_grad(loss, has_aux=True)(state.params, x[i], y[i], keys[i])
        np.testing.assert_allclose(losses[i], li, rtol=1e-5)
        _close(jax.tree.map(lambda g: g[i], grads), gi, rtol=1e-4, atol=1e-6)


def test_clipping_bounds_every_norm_by_c():
    rng = np.random.default_rng(1)
    scales = np.array([0.1, 0.5, 2.0, 10.0, 0.0, 3.0], np.float32)
    grads = {"a": jnp.asarray(rng.normal(size=(6, 3, 4)).astype(np.float32) * scales[:, None, None]),
             "b": {"c": jnp.asarray(rng.normal(size=(6, 5)).astype(np.float32) * scales[:, None])}}
    before = _tree_norms(grads)
    clip = 1.5
    assert (before > clip).sum() >= 2 and (before < clip).sum() >= 2  # both cases are exercised
    clipped, norms = dp.clip_per_example(grads, clip)
    np.testing.assert_allclose(norms, before, rtol=1e-6)
    after = _tree_norms(clipped)
    assert np.all(after <= clip * (1 + 1e-6))
    np.testing.assert_allclose(after[before > clip], clip, rtol=1e-6)          # those above land on C
    for g, c in zip(jax.tree.leaves(grads), jax.tree.leaves(clipped)):        # those below are untouched
        np.testing.assert_array_equal(np.asarray(c)[before <= clip], np.asarray(g)[before <= clip])
    # Direction kept: clipped = g · C / ‖g‖.
    big = before > clip
    np.testing.assert_allclose(np.asarray(clipped["a"])[big],
                               np.asarray(grads["a"])[big] * (clip / before[big])[:, None, None], rtol=1e-5)


def test_noise_has_std_sigma_c_and_the_aggregate_is_optaxs():
    sigma, clip, b = 2.0, 0.5, 8
    zeros = {"w": jnp.zeros((b, 100, 100)), "v": jnp.zeros((b, 50))}
    out = dp.noisy_mean(zeros, jax.random.PRNGKey(7), sigma, clip)
    z = np.concatenate([np.asarray(l).ravel() for l in jax.tree.leaves(out)]) * b / (sigma * clip)
    # 10050 draws: the sample std is within ~0.7 % of 1 at one standard error; 3 % is > 4 of them.
    assert abs(z.std() - 1.0) < 0.03, z.std()
    assert abs(z.mean()) < 4 / np.sqrt(z.size), z.mean()
    assert not np.allclose(np.asarray(out["v"]), np.asarray(out["w"])[0, :50])  # one draw per leaf
    # A wrong scale fails: σ·C/2 or 2·σ·C would be off by 50 % / 100 %.

    # Against optax's DP-SGD aggregate on real per-example gradients (clip + noise, same key).
    rng = np.random.default_rng(2)
    grads = {"k": jnp.asarray(rng.normal(size=(b, 3, 3)).astype(np.float32)),
             "bias": jnp.asarray(rng.normal(size=(b, 3)).astype(np.float32))}
    key = jax.random.key(3)  # optax wants a typed key (a raw uint32 pair reads as a seed array)
    tx = optax.contrib.differentially_private_aggregate(1.0, sigma, key)
    ref, _ = tx.update(grads, tx.init(None))
    _close(dp.noisy_mean(grads, key, sigma, 1.0), ref, rtol=1e-5, atol=1e-6)

    # Padding (weight 0 rows, any content) changes nothing: same sum, divided by the real count.
    padded = jax.tree.map(lambda g: jnp.concatenate([g, 100 * jnp.ones((3, *g.shape[1:]))]), grads)
    w = jnp.asarray([1.0] * b + [0.0] * 3)
    _close(dp.noisy_mean(padded, key, sigma, 1.0, w), ref, rtol=1e-5, atol=1e-6)


class _InputBNNet(nn.Module):
    """BatchNorm on the input (its statistics do not depend on the parameters), a conv, a dense
    layer: the ordinary gradient equals the frozen-statistics one, so σ = 0, C = ∞ DP-SGD must
    reproduce the ordinary step exactly (up to float summation order)."""

    @nn.compact
    def __call__(self, x, train=False, example_mask=None):
        x = batch_norm(self, x, "bn0", train, example_mask)
        x = nn.relu(nn.Conv(4, (3, 3))(x))
        return nn.Dense(3)(x.reshape(x.shape[0], -1))


def test_dp_step_with_no_noise_and_huge_clip_is_the_ordinary_step():
    x, y = _data(n=8, size=6)
    model = _InputBNNet()
    config = training.TrainConfig(epochs=1, batch_size=8, lr=0.1, dp_noise=0.0, dp_clip=1e6)
    state = training.create_state(model, config, steps_per_epoch=4, image_shape=(6, 6, 3))
    key = jax.random.PRNGKey(5)
    plain, mp = training.train_step(state, (x, y), key, crop_pad=1, flip=True)
    priv, mq = training.train_step(state, (x, y), key, crop_pad=1, flip=True, dp=config.dp)
    _close(priv.params, plain.params, rtol=1e-5, atol=1e-7)
    _close(priv.batch_stats, plain.batch_stats, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(mq["loss"], mp["loss"], rtol=1e-5)
    assert float(mq["acc"]) == float(mp["acc"])
    # and the step really moved (a no-op on both sides would pass the comparisons above)
    assert not np.allclose(np.asarray(priv.params["Dense_0"]["kernel"]), np.asarray(state.params["Dense_0"]["kernel"]))
    # A small clip changes the step: the clipping is in the path.
    small, _ = training.train_step(state, (x, y), key, crop_pad=1, flip=True, dp=dp.DPConfig(0.0, 1e-3))
    assert not np.allclose(np.asarray(small.params["Dense_0"]["kernel"]), np.asarray(plain.params["Dense_0"]["kernel"]))


def test_config_validation():
    assert training.TrainConfig().dp is None
    assert training.TrainConfig(dp_noise=1.0, dp_clip=2.0).dp == dp.DPConfig(1.0, 2.0)
    for kw, needle in (({"dp_noise": 1.0}, "dp_noise needs dp_clip"), ({"dp_clip": 1.0}, "dp_clip needs dp_noise"),
                       ({"dp_noise": float("nan"), "dp_clip": 1.0}, "dp_noise must be a finite number >= 0"),
                       ({"dp_noise": 1.0, "dp_clip": 0.0}, "dp_clip must be a finite number > 0"),
                       ({"dp_noise": -1.0, "dp_clip": 1.0}, "dp_noise must be")):
        with pytest.raises(ConfigError, match=needle):
            training.TrainConfig(**kw)


@pytest.mark.parametrize("flags, needle", [
    (["--dp-noise", "1.0"], "--dp-noise needs --dp-clip"),
    (["--dp-clip", "1.0"], "--dp-clip needs --dp-noise"),
    (["--dp-noise", "nan", "--dp-clip", "1"], "--dp-noise must be a finite number > 0"),
    (["--dp-noise", "0", "--dp-clip", "1"], "--dp-noise must be a finite number > 0"),
    (["--dp-noise", "1", "--dp-clip", "-2"], "--dp-clip must be a finite number > 0"),
    (["--dp-noise", "1", "--dp-clip", "inf"], "--dp-clip must be a finite number > 0"),
])
def test_cli_refuses_bad_dp_flags_in_one_line(flags, needle, tmp_path, capsys):
    assert cli.main(["attack", "--dataset", "cifar10", "--data-dir", str(tmp_path / "none"), "--no-download",
                     "--out", str(tmp_path / "run"), *flags]) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert out == "" and len(lines) == 1 and lines[0].startswith("ibau-jax: error: ") and needle in lines[0], err
    assert not (tmp_path / "run").exists()  # nothing was started


@pytest.mark.slow
def test_dp_training_lowers_asr_on_the_digits_backdoor(digits_backdoor):
    """DP-SGD as a training-time defense on the demo's poisoned digits (BadNets target 0, 10 % of
    the 1197 training images): the demo's recipe with σ = 0.1, C = 50, 5 epochs
    (``experiments/dp_tradeoff.py``'s first DP row). The same data and recipe without DP (the
    fixture, 12 epochs) carries the backdoor. Measured: asr_all 0.310 (non-target 0.233), clean
    accuracy 0.930, against 0.953 / 0.977 for the fixture (25 s CPU). Thresholds: asr_all <= 0.5 and
    clean accuracy >= 0.85, against asr_all >= 0.8 without DP."""
    from ibau_jax import attacks, rng
    from ibau_jax.data import digits

    d = digits.load_digits_32(0, 300, 300)
    streams = rng.streams(0)
    attack = attacks.make_attack("badnets", num_classes=10, target=0, seed=streams.seed_of("trigger"))
    poisoned = attacks.poison_dataset(d.train_x, d.train_y, attack, 0.1, streams.seed_of("poison"))
    config = training.TrainConfig(epochs=5, batch_size=64, lr=0.02, crop_pad=2, flip=False, seed=0, eval_every=5,
                                  dp_noise=0.1, dp_clip=50.0)
    model = models.SmallVGG(10, widths=(16, 32, 64))
    state, _ = training.train(model, poisoned.x, poisoned.y, config, quiet=True, log=lambda s: None)
    after = digits_backdoor["evaluate"]({"params": state.params, "batch_stats": state.batch_stats})
    before = digits_backdoor["before"]
    assert before["asr_all"] >= 0.8, before                 # without DP the backdoor is there
    assert after["asr_all"] <= 0.5, (before, after)
    assert after["clean_acc"] >= 0.85, (before, after)      # not by failing to learn at all
