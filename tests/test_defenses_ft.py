"""Plain fine-tuning (`ft`): the worked example of a defense (docs/architecture.md)."""
from __future__ import annotations

import jax
import numpy as np
import pytest

from ibau_jax import defenses, models, training
from ibau_jax.defenses.ft import FineTuning, FTConfig
from ibau_jax.errors import ConfigError


@pytest.mark.slow
def test_ft_equals_hand_written_epochs():
    """FineTuning.run = the training epoch applied `epochs` times with keys fold_in(key, e)."""
    model = models.SmallVGG(10, widths=(4, 4, 8))
    variables = jax.device_get(models.init_variables(model, seed=1, image_shape=(8, 8, 3)))
    rng = np.random.default_rng(0)
    x, y = rng.random((40, 8, 8, 3), dtype=np.float32), rng.integers(0, 10, 40)
    cfg = FTConfig(epochs=3, lr=0.05, batch_size=16, crop_pad=1)
    seen = []
    res = FineTuning(cfg).run(model, variables, defenses.CleanSet(x, y, 10), jax.random.PRNGKey(4),
                              callback=lambda r, v, rec: seen.append(r))
    assert seen == [1, 2, 3] and [h["round"] for h in res.history] == [1, 2, 3]
    assert res.compile_seconds > 0 and res.diagnostics["steps_per_epoch"] == 2
    tcfg = training.TrainConfig(epochs=3, batch_size=16, lr=0.05, crop_pad=1)
    state = training.TrainState.create(apply_fn=model.apply, params=variables["params"],
                                       batch_stats=variables["batch_stats"], tx=training.make_optimizer(tcfg, 2))
    for e in range(1, 4):
        state, m = training.train_epoch(state, x.astype(np.float32), y.astype(np.int32),
                                        jax.random.fold_in(jax.random.PRNGKey(4), e), 16, 1, True)
    for a, b in zip(jax.tree.leaves(res.variables["params"]), jax.tree.leaves(state.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    assert res.history[-1]["loss"] == pytest.approx(float(m["loss"]), rel=1e-6)
    assert not np.allclose(res.variables["params"]["classifier"]["kernel"],
                           variables["params"]["classifier"]["kernel"])


@pytest.mark.slow
def test_ft_lowers_asr_on_the_digits_backdoor(digits_backdoor):
    """Measured on the 2-core CPU: 0.953 -> 0.883 asr_all (clean accuracy 0.977 -> 0.983) with the
    digits' augmentation (no flip, crop 2): a weak defense, the floor the others must beat."""
    d = digits_backdoor
    clean = defenses.CleanSet(d["clean_x"], d["clean_y"], 10)
    res = defenses.get("ft", flip=False, crop_pad=2).run(d["model"], d["variables"], clean, jax.random.PRNGKey(0))
    after = d["evaluate"](res.variables)
    assert d["before"]["asr_all"] >= 0.9
    assert after["asr_all"] <= d["before"]["asr_all"] - 0.03, (d["before"], after)
    assert after["clean_acc"] >= d["before"]["clean_acc"] - 0.05, (d["before"], after)


def test_ft_config_and_clean_set_errors():
    for bad, msg in (({"epochs": 0}, "epochs must be an integer >= 1"), ({"lr": float("inf")}, "lr must be"),
                     ({"momentum": 1.0}, r"momentum must be in \[0, 1\)"), ({"crop_pad": -1}, "crop_pad")):
        with pytest.raises(ConfigError, match=msg):
            FTConfig(**bad)
    model = models.SmallVGG(10, widths=(4, 4, 8))
    variables = models.init_variables(model, image_shape=(8, 8, 3))
    small = defenses.CleanSet(np.zeros((5, 8, 8, 3), np.float32), np.zeros(5, int), 10)
    with pytest.raises(ConfigError, match="fewer than one batch of 128"):
        FineTuning().run(model, variables, small, jax.random.PRNGKey(0))
