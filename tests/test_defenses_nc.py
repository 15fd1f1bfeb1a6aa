"""Neural Cleanse (``nc``) and its trigger search (``defenses.trigger_inversion``).

Property tests on a hand-made model whose backdoor is a known 2×2 patch; the cost schedule
against a plain-Python transcription of the reference's per-epoch rule; the vmapped program
against per-class runs; and (slow) the defense lowering the digits demo's ASR.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ibau_jax import defenses
from ibau_jax.defenses import trigger_inversion as ti
from ibau_jax.defenses.nc import NCConfig, NeuralCleanse
from ibau_jax.errors import ConfigError

PATCH = (slice(5, 7), slice(5, 7))  # the toy backdoor: rows/columns 5..6 of an 8×8 image


class PatchModel:
    """Class 0 unless the 2×2 patch is bright: logits [0, 20 · (mean of the patch − 0.9)]
    (a third class, never reachable cheaply, with ``three=True``: it needs the whole top row)."""

    def __init__(self, three: bool = False):
        self.three = three

    def apply(self, variables, x, train=False):
        s = variables["params"]["scale"]
        patch = 20 * s * (jnp.mean(x[:, PATCH[0], PATCH[1], :], (1, 2, 3)) - 0.9)
        cols = [jnp.zeros_like(patch), patch]
        if self.three:
            cols.append(20 * s * (jnp.mean(x[:, :2, :, :], (1, 2, 3)) - 0.9))
        return jnp.stack(cols, -1)


VARS = {"params": {"scale": jnp.float32(1.0)}, "batch_stats": {}}


def _images(n=64, seed=0):
    return np.random.default_rng(seed).random((n, 8, 8, 1), dtype=np.float32) * 0.6


def _near_patch_fraction(mask):
    m = np.abs(mask[..., 0])
    return m[4:8, 4:8].sum() / m.sum()


# -------------------------------------------------------------------------- the cost schedule

def reference_schedule(accs, regs, cfg):
    """bolunwang/backdoor visualizer.visualize's per-epoch bookkeeping, transcribed as plain
    Python (cost starts at 0: RESET_COST_TO_ZERO). Returns per-epoch (cost after the epoch,
    reg_best, saved) and the epoch it stopped at (None: ran out)."""
    cost, reg_best = 0.0, float("inf")
    set_c = up_c = down_c = 0
    up_f = down_f = False
    es_c, es_best = 0, reg_best
    trace = []
    for step, (acc, reg) in enumerate(zip(accs, regs)):
        saved = acc >= cfg.attack_threshold and reg < reg_best
        if saved:
            reg_best = reg
        if reg_best < float("inf"):
            if reg_best >= cfg.early_stop_threshold * es_best:
                es_c += 1
            else:
                es_c = 0
        es_best = min(reg_best, es_best)
        if down_f and up_f and es_c >= cfg.early_stop_patience:
            trace.append((cost, reg_best, saved))
            return trace, step
        if cost == 0 and acc >= cfg.attack_threshold:
            set_c += 1
            if set_c >= cfg.patience:
                cost = cfg.init_cost
                up_c = down_c = 0
                up_f = down_f = False
        else:
            set_c = 0
        if acc >= cfg.attack_threshold:
            up_c += 1
            down_c = 0
        else:
            up_c = 0
            down_c += 1
        if up_c >= cfg.patience:
            up_c = 0
            cost *= cfg.cost_up
            up_f = True
        elif down_c >= cfg.patience:
            down_c = 0
            cost /= cfg.cost_down
            down_f = True
        trace.append((cost, reg_best, saved))
    return trace, None


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_schedule_matches_the_reference_rule(seed):
    """Scripted attack-success sequences (runs of hits and misses, so the cost is set, goes up
    and down, and the search stops early) give the reference's costs, bests and stop epoch."""
    cfg = ti.SearchConfig(patience=3, early_stop_patience=6, early_stop_threshold=0.999)
    rng = np.random.default_rng(seed)
    accs, regs = [], []
    while len(accs) < 160:
        n = int(rng.integers(1, 9))
        accs += [float(rng.choice([0.995, 1.0])) if rng.random() < 0.6 else float(rng.uniform(0.5, 0.98))] * n
        regs += list(100.0 * np.exp(-0.02 * len(regs)) + rng.uniform(0, 5, n))
    regs = [float(np.float32(r)) for r in regs]
    want, stop_at = reference_schedule(accs, regs, cfg)
    update = jax.jit(lambda s, a, r: ti.schedule_update(s, a, r, cfg))
    s = ti.schedule_init()
    got = []
    for a, r in zip(accs, regs):
        if bool(s.stopped):
            break
        s, saved = update(s, jnp.float32(a), jnp.float32(r))
        got.append((float(s.cost), float(s.reg_best), bool(saved)))
    assert len(got) == len(want) and (stop_at is None) == (not bool(s.stopped))
    for (gc, gr, gs), (wc, wr, ws) in zip(got, want):
        assert gc == pytest.approx(wc, rel=1e-6) and gr == pytest.approx(wr, rel=1e-6) and gs == ws
    costs = {c for c, _, _ in want}
    assert stop_at is not None and len(costs) > 3  # the script exercised set, up, down and the stop


# -------------------------------------------------------------------------- the search

def test_reversed_mask_finds_the_known_patch_and_vmap_equals_per_class_runs():
    """Class 1 is reached only through the 2×2 patch: its reversed mask puts ≥ 90 % of its L1
    mass on the patch's 4×4 neighbourhood with norm < 8 (the patch is 4 pixels); class 0 (every
    image's class already) needs no trigger, so its mask vanishes. Both classes in one vmapped
    program give what two separate single-class programs give."""
    cfg = ti.SearchConfig(epochs=40, batch_size=16, samples_per_epoch=32, class_chunk=2)
    x = _images()
    y = np.zeros(len(x), int)
    apply = PatchModel().apply
    res, _, _ = ti.reverse_engineer(apply, VARS, x, y, [0, 1], jax.random.PRNGKey(0), cfg)
    assert res.found.all()
    assert _near_patch_fraction(res.masks[1]) >= 0.9, res.masks[1][..., 0].round(2)
    assert 2.0 < res.norms[1] < 8.0 and res.norms[0] < 1.0, res.norms
    assert res.patterns[1][PATCH].min() > 0.8  # the pattern is bright where the mask is
    stamped = ti.stamp(x, res.masks[1], res.patterns[1])
    assert (np.argmax(apply(VARS, stamped), -1) == 1).mean() >= 0.99
    single = dataclasses.replace(cfg, class_chunk=1)
    alone, _, _ = ti.reverse_engineer(apply, VARS, x, y, [0, 1], jax.random.PRNGKey(0), single)
    np.testing.assert_allclose(alone.masks, res.masks, atol=1e-5)
    np.testing.assert_allclose(alone.norms, res.norms, rtol=1e-5)
    np.testing.assert_array_equal(alone.epochs, res.epochs)


def test_nc_run_without_a_flag_returns_the_model_unchanged():
    """A three-class toy: class 1's trigger is 4 pixels, class 2's 16 (the top rows), class 0's
    none; no norm is a small outlier, so nothing is flagged and the variables come back as they were."""
    x = _images(48)
    clean = defenses.CleanSet(x, np.zeros(48, int), 3)
    steps = []
    nc = NeuralCleanse(NCConfig(epochs=30, batch_size=16, samples_per_epoch=32, ft_batch_size=16), on_step=steps.append)
    res = nc.run(PatchModel(three=True), VARS, clean, jax.random.PRNGKey(1))
    assert res.flagged_classes == [] and res.history == []
    assert "unchanged" in res.diagnostics["mitigation"]
    assert res.variables["params"]["scale"] == 1.0
    assert res.class_scores[0] < 1.0 < res.class_scores[1] < 8.0 < res.class_scores[2]
    assert res.artifacts["masks"].shape == (3, 8, 8, 1) and res.artifacts["patterns"].shape == (3, 8, 8, 1)
    np.testing.assert_allclose(res.diagnostics["anomaly_index"],
                               defenses.anomaly.anomaly_index(res.class_scores), atol=1e-4)
    assert len(steps) == 30  # one bar step per epoch of the (single) chunk, early stop or not


def test_config_and_input_errors():
    for bad, msg in (({"epochs": 0}, "epochs must be an integer >= 1"), ({"lr": 0.0}, "lr must be"),
                     ({"cost_up": 1.0}, "cost_up must be"), ({"attack_threshold": 1.5}, "attack_threshold"),
                     ({"patch_fraction": 2.0}, "patch_fraction"), ({"class_chunk": 0}, "class_chunk"),
                     ({"samples_per_epoch": 8}, "samples_per_epoch"), ({"ft_lr": -1.0}, "lr must be")):
        with pytest.raises(ConfigError, match=msg):
            defenses.get("nc", **bad)
    x = _images(20)
    with pytest.raises(ConfigError, match="fewer than one fine-tuning batch of 128"):
        NeuralCleanse().run(PatchModel(True), VARS, defenses.CleanSet(x, np.zeros(20, int), 3), jax.random.PRNGKey(0))
    with pytest.raises(ConfigError, match="at least 3"):
        NeuralCleanse().run(PatchModel(), VARS, defenses.CleanSet(x, np.zeros(20, int), 2), jax.random.PRNGKey(0))


def test_a_diverged_search_is_a_one_line_user_error():
    nan_vars = {"params": {"scale": jnp.float32(np.nan)}, "batch_stats": {}}
    cfg = NCConfig(epochs=2, batch_size=16, samples_per_epoch=16, mitigate=False)
    with pytest.raises(defenses.DivergenceError, match="lower lr"):
        NeuralCleanse(cfg).run(PatchModel(True), nan_vars, defenses.CleanSet(_images(16), np.zeros(16, int), 3),
                               jax.random.PRNGKey(0))


@pytest.mark.slow
def test_nc_lowers_asr_on_the_digits_backdoor(digits_backdoor):
    """Measured (2-core CPU): class 0 (the target) flagged, its mask L1 ~10 against 85..196 for
    the others; asr_all 0.953 -> 0.207, clean accuracy 0.977 -> 0.977 (30 search epochs of 4
    batches, then ft's 10 epochs on the 300 images, 20 % patched)."""
    d = digits_backdoor
    clean = defenses.CleanSet(d["clean_x"], d["clean_y"], 10)
    res = defenses.get("nc", epochs=30, samples_per_epoch=128, flip=False, crop_pad=2).run(
        d["model"], d["variables"], clean, jax.random.PRNGKey(0))
    after = d["evaluate"](res.variables)
    assert res.flagged_classes == [0], res.class_scores
    assert len(res.history) == 10 and res.diagnostics["patched_images"] == 60
    assert d["before"]["asr_all"] >= 0.9
    assert after["asr_all"] <= 0.5, (d["before"], after)
    assert after["clean_acc"] >= d["before"]["clean_acc"] - 0.03, (d["before"], after)
