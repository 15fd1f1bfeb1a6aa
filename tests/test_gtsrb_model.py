"""A small VGG trained on GTSRB (read from ../shared through the library) beats chance by far.

Only GTSRB's test set is shared (12,630 images, 43 classes), so the model trains on its first
2,000 images and is scored on the next 1,000 (disjoint). The majority class is about 6% of
them and chance is 1/43; measured on 2 shared CPU cores (seeds 0 and 1): 0.505 and 0.470.
experiments/gtsrb_model.py is the full-size version (docs/attacks.md).
"""
import numpy as np
import pytest

from conftest import shared_path
from ibau_jax import data, metrics, models, training

N_TRAIN, N_TEST = 2000, 1000


@pytest.mark.slow
def test_small_vgg_learns_gtsrb():
    gtsrb = data.load_gtsrb(shared_path("datasets/gtsrb"))
    assert gtsrb.num_classes == 43 and len(gtsrb) == 12630 and gtsrb.x.shape[1:] == (32, 32, 3)
    x_tr, y_tr = data.to_float(gtsrb.x[:N_TRAIN]), gtsrb.y[:N_TRAIN]
    x_te, y_te = data.to_float(gtsrb.x[N_TRAIN:N_TRAIN + N_TEST]), gtsrb.y[N_TRAIN:N_TRAIN + N_TEST]

    # A narrow small VGG keeps the test short; no flip (signs are not mirror-symmetric).
    model = models.SmallVGG(43, widths=(8, 16, 32))
    config = training.TrainConfig(epochs=6, batch_size=64, lr=0.05, flip=False, seed=0, eval_every=6)
    state, history = training.train(model, x_tr, y_tr, config, quiet=True, log=lambda s: None)
    assert all(np.isfinite(r["loss"]) for r in history)
    assert history[-1]["loss"] < 0.7 * history[0]["loss"], history

    preds = metrics.predict(model.apply, {"params": state.params, "batch_stats": state.batch_stats}, x_te)
    acc = metrics.accuracy(preds, y_te)
    majority = np.bincount(y_te, minlength=43).max() / len(y_te)
    assert majority < 0.1
    assert acc >= 0.3, f"held-out accuracy {acc:.3f} (majority class {majority:.3f}, chance {1 / 43:.3f})"
