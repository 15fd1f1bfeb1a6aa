"""TABOR (``tabor``): its regularisers against a numpy transcription of TrojanZoo's terms, its
search on the known-patch toy, its errors, and (slow) lowering the digits demo's ASR."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ibau_jax import defenses
from ibau_jax.defenses import tabor
from ibau_jax.defenses import trigger_inversion as ti
from ibau_jax.errors import ConfigError

from test_defenses_nc import VARS, PatchModel, _images, _near_patch_fraction


def _np_ce(logits, labels):
    logits = logits - logits.max(-1, keepdims=True)
    return -(logits[np.arange(len(labels)), labels] - np.log(np.exp(logits).sum(-1)))


def test_regularizer_equals_trojanzoo_terms_by_hand():
    """R = λ1(Σ|m| + Σm²) + λ2(Σ|q| + Σq²) + λ3 S(m) + λ4 S(q) + λ5 CE(f((1−m)x), y) + λ6 CE(f(m·p), t)
    with q = (1−m)p and S the summed squared neighbour differences, every term switched on."""
    rng = np.random.default_rng(0)
    m, p = rng.random((8, 8, 1), dtype=np.float32), rng.random((8, 8, 1), dtype=np.float32)
    x, y = _images(5), np.array([0, 1, 0, 1, 1])
    w = dict(w_mask_size=0.3, w_pattern_size=0.2, w_mask_smooth=0.5, w_pattern_smooth=0.7, w_blocking=1.1,
             w_overlay=1.3)
    cfg = tabor.TaborConfig(**w)
    model = PatchModel()
    logits_fn = lambda z: np.asarray(model.apply(VARS, jnp.asarray(z)))
    got = tabor.tabor_regularizer(cfg)(jnp.asarray(m), jnp.asarray(p), jnp.asarray(x), jnp.asarray(y),
                                       jnp.int32(1), lambda z: model.apply(VARS, z))
    q = (1 - m) * p
    smooth = lambda z: sum(((z[i + 1, j] - z[i, j]) ** 2).sum() for i in range(7) for j in range(8)) + \
        sum(((z[i, j + 1] - z[i, j]) ** 2).sum() for i in range(8) for j in range(7))
    want = (0.3 * (np.abs(m).sum() + (m ** 2).sum()) + 0.2 * (np.abs(q).sum() + (q ** 2).sum())
            + 0.5 * smooth(m) + 0.7 * smooth(q)
            + 1.1 * _np_ce(logits_fn((1 - m) * x), y).mean()
            + 1.3 * _np_ce(logits_fn(np.repeat((m * p)[None], 5, 0)), np.ones(5, int)).mean())
    assert float(got) == pytest.approx(float(want), rel=1e-5)
    # the defaults are TrojanZoo's tabor_hyperparams [1e-6, 1e-5, 1e-7, 1e-8, 0, 1e-2]
    d = tabor.TaborConfig()
    assert [getattr(d, n) for n in tabor.WEIGHTS] == [1e-6, 1e-5, 1e-7, 1e-8, 0.0, 1e-2]


def test_tabor_search_finds_the_known_patch():
    """With TABOR's regularisers (weights ×1000 so they matter at this scale) class 1's mask still
    concentrates on the 2×2 patch (≥ 90 % of its L1 mass on the 4×4 neighbourhood, norm < 8)."""
    cfg = tabor.TaborConfig(epochs=40, batch_size=16, samples_per_epoch=32, class_chunk=2,
                            w_mask_size=1e-3, w_pattern_size=1e-2, w_mask_smooth=1e-4, w_pattern_smooth=1e-5)
    x = _images()
    res, _, _ = ti.reverse_engineer(PatchModel().apply, VARS, x, np.zeros(len(x), int), [0, 1],
                                    jax.random.PRNGKey(0), cfg, tabor.tabor_regularizer(cfg))
    assert res.found.all()
    assert _near_patch_fraction(res.masks[1]) >= 0.9, res.masks[1][..., 0].round(2)
    assert 2.0 < res.norms[1] < 8.0 and res.norms[0] < 1.0, res.norms


def test_tabor_config_errors():
    for bad, msg in (({"w_overlay": -1.0}, "w_overlay must be"), ({"w_mask_size": float("nan")}, "w_mask_size"),
                     ({"epochs": 0}, "epochs must be")):
        with pytest.raises(ConfigError, match=msg):
            defenses.get("tabor", **bad)
    assert defenses.parse_overrides("tabor", ["w_overlay=0.1", "mitigate=false"]) == {"w_overlay": 0.1,
                                                                                        "mitigate": False}


@pytest.mark.slow
def test_tabor_lowers_asr_on_the_digits_backdoor(digits_backdoor):
    """Measured (2-core CPU): class 0 (the target) flagged, mask L1 9.9 against 84..197, anomaly index
    4.19; asr_all 0.953 -> 0.207, clean accuracy 0.977 -> 0.977 (settings as the NC digits test)."""
    d = digits_backdoor
    clean = defenses.CleanSet(d["clean_x"], d["clean_y"], 10)
    res = defenses.get("tabor", epochs=30, samples_per_epoch=128, flip=False, crop_pad=2).run(
        d["model"], d["variables"], clean, jax.random.PRNGKey(0))
    after = d["evaluate"](res.variables)
    assert res.flagged_classes == [0], res.class_scores
    assert d["before"]["asr_all"] >= 0.9
    assert after["asr_all"] <= 0.5, (d["before"], after)
    assert after["clean_acc"] >= d["before"]["clean_acc"] - 0.03, (d["before"], after)
