import numpy as np
import jax.numpy as jnp

from ibau_jax import metrics


def test_asr_conventions():
    preds = np.array([8, 8, 1, 8, 2])
    true = np.array([8, 0, 1, 3, 8])
    targets = np.full(5, 8)
    out = metrics.attack_success(preds, targets, true)
    assert out["asr_all"] == 3 / 5
    # non-target: images 1, 2, 3 (true != 8): hits at 1 and 3
    assert out["asr_nontarget"] == 2 / 3


def test_predict_handles_tail_and_matches_direct():
    w = np.random.default_rng(0).normal(size=(12, 5)).astype(np.float32)
    apply_fn = _linear_apply
    x = np.random.default_rng(1).normal(size=(23, 2, 2, 3)).astype(np.float32)
    direct = np.argmax(x.reshape(23, -1) @ w, -1)
    np.testing.assert_array_equal(metrics.predict(apply_fn, w, x, batch_size=10), direct)
    assert metrics.accuracy(direct, direct) == 1.0


def _linear_apply(w, x):
    return x.reshape(x.shape[0], -1) @ jnp.asarray(w)
