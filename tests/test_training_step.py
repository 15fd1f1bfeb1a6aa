"""ibau_jax.training.step: the step learns, augmentation is a crop/flip, padding weights change
nothing, and the compiled epoch is the loop of steps it claims to be."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ibau_jax import models, sharding, training

MODEL = models.SmallVGG(4, widths=(4, 8, 8))  # tiny: compile and steps stay cheap on 2 cores


def _data(n=48, seed=0, size=32):
    """A learnable toy problem: the class is which quadrant holds a bright square."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n).astype(np.int32)
    x = rng.uniform(0, 0.2, (n, size, size, 3)).astype(np.float32)
    h = size // 2
    for i, c in enumerate(y):
        r, q = divmod(int(c), 2)
        x[i, h * r + h // 4:h * r + 3 * h // 4, h * q + h // 4:h * q + 3 * h // 4] = 1.0
    return x, y


def _flat(tree):
    return np.concatenate([np.asarray(a, np.float64).ravel() for a in jax.tree.leaves(tree)])


@pytest.mark.slow
def test_train_step_reduces_loss():
    x, y = _data(32)
    config = training.TrainConfig(epochs=1, batch_size=32, lr=0.05)
    state = training.create_state(MODEL, config, steps_per_epoch=30)
    losses = []
    for i in range(12):
        state, m = training.train_step(state, (x, y), jax.random.PRNGKey(i), crop_pad=0, flip=False)
        losses.append(float(m["loss"]))
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3]), losses
    # BatchNorm running statistics moved away from their initial values.
    assert not np.allclose(state.batch_stats["bn0"]["mean"], 0.0)


def test_augment_flip_and_crop():
    x = jnp.asarray(np.random.default_rng(0).uniform(size=(32, 8, 8, 2)).astype(np.float32))
    out = np.asarray(training.augment(x, jax.random.PRNGKey(0), crop_pad=0, flip=True))
    assert out.shape == x.shape
    xn = np.asarray(x)
    flipped = [np.array_equal(o, xi[:, ::-1]) for o, xi in zip(out, xn)]
    same = [np.array_equal(o, xi) for o, xi in zip(out, xn)]
    assert all(f or s for f, s in zip(flipped, same)) and any(flipped) and any(same)

    pad = 2
    out = np.asarray(training.augment(x, jax.random.PRNGKey(1), crop_pad=pad, flip=False))
    padded = np.pad(xn, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    offsets = []
    for o, p in zip(out, padded):
        hits = [(i, j) for i in range(2 * pad + 1) for j in range(2 * pad + 1)
                if np.array_equal(o, p[i:i + 8, j:j + 8])]
        assert hits, "every output is a window of the zero-padded image"
        offsets.append(hits[0])
    assert len(set(offsets)) > 3  # offsets really vary


@pytest.mark.slow
def test_step_loss_and_acc_are_the_plain_batch_means():
    """Without weights: loss = mean cross-entropy and acc = mean hit rate of the train-mode
    logits, recomputed here with the step's own keys (split as documented)."""
    x, y = _data(16, size=16)
    config = training.TrainConfig(epochs=1, batch_size=16)
    state = training.create_state(MODEL, config, steps_per_epoch=1, image_shape=(16, 16, 3))
    key = jax.random.PRNGKey(3)
    _, m = training.train_step(state, (x, y), key, crop_pad=2, flip=True)
    aug_key, drop_key = jax.random.split(key)
    xa = training.augment(jnp.asarray(x), aug_key, 2, True)
    logits, _ = MODEL.apply({"params": state.params, "batch_stats": state.batch_stats}, xa, train=True,
                            rngs={"dropout": drop_key}, mutable=["batch_stats"])
    logits = np.asarray(logits, np.float64)
    logp = logits - logits.max(1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(1, keepdims=True))
    np.testing.assert_allclose(float(m["loss"]), -logp[np.arange(16), y].mean(), rtol=1e-5)
    assert float(m["acc"]) == np.mean(logits.argmax(1) == y)


@pytest.mark.slow
def test_padded_step_with_weights_equals_the_unpadded_step():
    """Padding with zero-weight examples (garbage images, wrong labels) changes neither the loss,
    the accuracy, the gradients nor the BatchNorm statistics."""
    x, y = _data(12, size=16)
    config = training.TrainConfig(epochs=1, batch_size=12)
    state = training.create_state(MODEL, config, steps_per_epoch=4, image_shape=(16, 16, 3))
    key = jax.random.PRNGKey(5)
    ref, m_ref = training.train_step(state, (x, y), key, crop_pad=2, flip=True)
    junk = np.random.default_rng(9).uniform(0, 50, (4, 16, 16, 3)).astype(np.float32)
    xp, yp = np.concatenate([x, junk]), np.concatenate([y, (y[:4] + 1) % 4])
    w = sharding.example_weights(12, 16)
    out, m = training.train_step(state, (xp, yp), key, crop_pad=2, flip=True, w=jnp.asarray(w))
    np.testing.assert_allclose(float(m["loss"]), float(m_ref["loss"]), rtol=1e-5)
    assert float(m["acc"]) == float(m_ref["acc"])
    a, b = _flat((out.params, out.batch_stats)), _flat((ref.params, ref.batch_stats))
    assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(b)
    # ... and the step really moved (so the comparison above is not vacuous).
    assert np.linalg.norm(b - _flat((state.params, state.batch_stats))) > 1e-3 * np.linalg.norm(b)


@pytest.mark.slow
def test_train_epoch_is_the_loop_of_steps():
    """The compiled epoch = a Python loop of train_step over the documented permutation and keys."""
    x, y = _data(40, size=16)
    config = training.TrainConfig(epochs=1, batch_size=16)
    state = training.create_state(MODEL, config, steps_per_epoch=2, image_shape=(16, 16, 3))
    rng = jax.random.PRNGKey(11)
    out, m = training.train_epoch(state, jnp.asarray(x), jnp.asarray(y), rng, batch_size=16, crop_pad=2)
    perm_key, step_key = jax.random.split(rng)
    order = np.asarray(jax.random.permutation(perm_key, 40))
    keys = jax.random.split(step_key, 2)  # 40 // 16 = 2 batches, the last 8 images skipped
    ref, losses = state, []
    for b in range(2):
        i = order[16 * b:16 * (b + 1)]
        ref, mb = training.train_step(ref, (x[i], y[i]), keys[b], crop_pad=2, flip=True)
        losses.append(float(mb["loss"]))
    np.testing.assert_allclose(float(m["loss"]), np.mean(losses), rtol=1e-5)
    np.testing.assert_allclose(_flat((out.params, out.batch_stats)), _flat((ref.params, ref.batch_stats)),
                               rtol=1e-5, atol=1e-6)
    assert int(out.step) == 2


def test_optimizer_schedule_and_decay_mask():
    """Cosine decay from lr to 0 over epochs*steps; weight decay touches kernels only."""
    config = training.TrainConfig(epochs=2, batch_size=8, lr=0.1, momentum=0.0, weight_decay=0.5)
    tx = training.make_optimizer(config, steps_per_epoch=2)
    params = {"conv": {"kernel": jnp.ones(3), "bias": jnp.ones(3)}}
    zero = jax.tree.map(jnp.zeros_like, params)
    st = tx.init(params)
    upd, st = tx.update(zero, st, params)  # step 0: lr 0.1, grad = 0.5 * kernel
    np.testing.assert_allclose(upd["conv"]["kernel"], -0.1 * 0.5 * np.ones(3), rtol=1e-6)
    np.testing.assert_allclose(upd["conv"]["bias"], 0.0)
    upd, st = tx.update(zero, st, params)  # step 1 of 4: lr 0.1 * (1 + cos(pi/4)) / 2
    np.testing.assert_allclose(upd["conv"]["kernel"], -0.05 * (1 + np.cos(np.pi / 4)) * 0.5, rtol=1e-5)
