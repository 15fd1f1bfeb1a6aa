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


def test_robust_accuracy_counts_non_target_images_against_true_labels():
    preds = np.array([8, 0, 1, 8, 2, 3])
    true = np.array([8, 0, 1, 3, 8, 3])
    out = metrics.attack_success(preds, np.full(6, 8), true)
    # non-target images: 1, 2, 3, 5 (true != 8); correct there: 1, 2, 5
    assert out["robust_acc"] == 3 / 4
    assert metrics.attack_success(np.array([8]), np.array([8]), np.array([8]))["robust_acc"] is None


def test_der_closed_form():
    before = {"clean_acc": 0.85, "asr_all": 0.97}
    assert metrics.der(before, {"clean_acc": 0.83, "asr_all": 0.07}) == (0.90 - 0.02 + 1) / 2
    assert metrics.der(before, before) == 0.5
    # an accuracy gain and an ASR rise count as zero
    assert metrics.der(before, {"clean_acc": 0.90, "asr_all": 0.99}) == 0.5


def test_evaluate_returns_all_four_metrics():
    w = np.eye(12, 5, dtype=np.float32)
    x = np.random.default_rng(2).random((7, 2, 2, 3)).astype(np.float32)
    y = np.argmax(x.reshape(7, -1) @ w, -1)
    m = metrics.evaluate(_linear_apply, w, x, y, x, np.zeros(7, int), y, batch_size=4)
    assert set(m) == set(metrics.METRICS) and m["clean_acc"] == 1.0
    assert m["robust_acc"] == 1.0  # every non-target image keeps its true label


def test_class_accuracy_by_hand_and_in_evaluate():
    preds = np.array([0, 1, 1, 2, 0, 2])
    labels = np.array([0, 1, 0, 2, 0, 1])
    # class 0: images 0, 2, 4 -> right at 0 and 4; class 1: 1, 5 -> right at 1; class 2: 3 -> right; class 3: none
    assert metrics.class_accuracy(preds, labels, 4) == [2 / 3, 1 / 2, 1.0, None]
    w = np.eye(12, 5, dtype=np.float32)
    x = np.random.default_rng(2).random((9, 2, 2, 3)).astype(np.float32)
    pred = np.argmax(x.reshape(9, -1) @ w, -1)
    y = np.where(np.arange(9) % 3 == 0, (pred + 1) % 5, pred)       # images 0, 3, 6 wrong
    m = metrics.evaluate(_linear_apply, w, x, y, x, np.zeros(9, int), y, batch_size=4, num_classes=5)
    assert m["class_acc"] == metrics.class_accuracy(pred, y, 5) and m["clean_acc"] == 6 / 9
    assert "class_acc" not in metrics.evaluate(_linear_apply, w, x, y, x, np.zeros(9, int), y)
