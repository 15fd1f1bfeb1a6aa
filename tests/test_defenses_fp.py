"""Fine-Pruning (`fp`): channel ranking, the one-program sweep, the selection rule, baking, errors."""
from __future__ import annotations

import jax
import numpy as np
import pytest

from ibau_jax import defenses, models
from ibau_jax.defenses import fp
from ibau_jax.defenses.fp import FinePruning, FPConfig, UnsupportedModelError
from ibau_jax.errors import ConfigError, UserError


def _tiny(n=40, seed=0):
    model = models.SmallVGG(10, widths=(4, 4, 8))
    variables = jax.device_get(models.init_variables(model, seed=1, image_shape=(8, 8, 3)))
    rng = np.random.default_rng(seed)
    # non-trivial BN affines (a fresh init has scale 1, bias 0 everywhere)
    bn5 = {"scale": rng.uniform(0.5, 1.5, 8).astype(np.float32), "bias": rng.normal(0, 0.3, 8).astype(np.float32)}
    variables = {**variables, "params": {**variables["params"], "bn5": bn5}}
    return model, variables, rng.random((n, 8, 8, 3), dtype=np.float32)


def _apply(model, variables, x):
    return np.asarray(jax.jit(model.apply)(variables, x))


def _numpy_head(block, keep, kernel, bias):
    """Hand-made pruned head: zero the channels of block (N, H, W, C), flatten NCHW, linear."""
    z = np.asarray(block) * keep
    return np.transpose(z, (0, 3, 1, 2)).reshape(len(z), -1) @ np.asarray(kernel) + np.asarray(bias)


def test_fp_prunes_exactly_the_least_active_channels():
    """The run's zeroed bn5 channels = the k lowest numpy channel means of block3 on the ranking set,
    and the baked model's logits = the numpy head with those channels zeroed."""
    model, variables, x = _tiny(seed=2)
    block = np.asarray(models.features(model, variables, x, names=["block3"])["block3"])
    means = block.astype(np.float64).mean(axis=(0, 1, 2))
    # Labels: the predictions with the 3 least active channels zeroed (a random tiny model predicts
    # almost one class; these labels give a curve that rises, then falls: 0.275 .. 1.0 .. 0.0).
    m3 = np.ones(8, np.float32)
    m3[np.argsort(means, kind="stable")[:3]] = 0
    y = _apply(model, {**variables, "neuron_masks": {"bn5": m3}}, x).argmax(-1)
    clean = defenses.CleanSet(x, y, 10)
    # oracle selection ranks on the whole clean set (no split), so the numpy reference sees the same images
    res = FinePruning(FPConfig(epochs=0, selection="oracle", max_acc_drop=0.5), oracle_set=(x, y)).run(
        model, variables, clean, jax.random.PRNGKey(0))
    k = res.diagnostics["pruned"]
    assert k == 6, res.diagnostics
    expected = sorted(np.argsort(means, kind="stable")[:k].tolist())
    scale, bias = res.variables["params"]["bn5"]["scale"], res.variables["params"]["bn5"]["bias"]
    assert np.nonzero(scale == 0)[0].tolist() == expected == res.diagnostics["pruned_channels"]
    assert np.nonzero(bias == 0)[0].tolist() == expected
    np.testing.assert_array_equal(np.delete(scale, expected), np.delete(variables["params"]["bn5"]["scale"], expected))
    keep = np.ones(8, np.float32)
    keep[expected] = 0
    head = variables["params"]["classifier"]
    np.testing.assert_allclose(_apply(model, res.variables, x),
                               _numpy_head(block, keep, head["kernel"], head["bias"]), rtol=1e-5, atol=1e-5)
    # the sweep's accuracies are those of the full pruned models; the selection rule picked k
    accs = res.diagnostics["sweep_accuracies"]
    assert res.diagnostics["sweep_counts"] == list(range(8)) and accs[3] == 1.0
    assert fp.select_prune_count(np.asarray(accs), 0.5) == k and res.diagnostics["selected_accuracy"] == accs[k]


def test_sweep_equals_the_full_model_with_channels_zeroed():
    """sweep_accuracies / pruned_logits (one program over all masks) = model.apply with the BN neuron
    mask zeroing those channels, and the baked variables give the same logits."""
    model, variables, x = _tiny(24, seed=3)
    site = fp.prune_site(model, variables)
    y = np.random.default_rng(1).integers(0, 10, len(x))
    masks = fp.keep_masks(np.array([5, 2, 7, 0, 1, 3, 4, 6]), np.array([0, 1, 3, 6]))
    assert masks.sum(1).tolist() == [8, 7, 5, 2] and masks[2].tolist() == [1, 1, 0, 1, 1, 0, 1, 0]
    _, feats = fp.last_block_features(fp.make_feature_fn(model, site), variables, x, batch=10)  # 3 padded batches
    head = variables["params"]["classifier"]
    logits = np.asarray(fp.pruned_logits(feats, head["kernel"], head["bias"], masks))
    for m, lg in zip(masks, logits):
        full = _apply(model, {**variables, "neuron_masks": {"bn5": m}}, x)
        np.testing.assert_allclose(lg, full, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(_apply(model, fp.bake(variables, site, m), x), full, rtol=1e-6, atol=1e-6)
    accs = np.asarray(fp.sweep_accuracies(feats, y, head["kernel"], head["bias"], masks))
    np.testing.assert_array_equal(accs, (logits.argmax(-1) == y).mean(-1).astype(np.float32))
    assert fp.prune_counts(128, 0.01).tolist() == list(range(0, 128, 2))   # ⌈1.28⌉ = 2 (BackdoorBench)
    assert fp.prune_counts(64, 0.01).tolist() == list(range(64))
    assert fp.prune_counts(8, 0.3).tolist() == [0, 3, 6]


def test_select_prune_count_on_hand_made_curves():
    """Keep the last count before the first relative drop > max_acc_drop (gains are no drop)."""
    sel = fp.select_prune_count
    curve = np.array([1.0, 1.0, 0.9, 0.75, 0.7, 0.9, 0.95])
    assert sel(curve, 0.25) == 3          # 0.75 is a drop of exactly 0.25 (kept); 0.7 stops the sweep
    assert sel(curve, 0.2) == 2           # later recoveries do not count: the sweep stopped at 0.75
    assert sel(curve, 0.0) == 1
    assert sel(np.array([0.5, 0.6, 0.55]), 0.05) == 2   # above the baseline all along
    assert sel(np.array([0.8, 0.1, 0.8]), 0.1) == 0     # the first step already fails: no pruning
    assert sel(np.array([0.0, 0.0]), 0.1) == 1          # a zero baseline cannot drop


def test_fp_bad_inputs_are_one_line_user_errors():
    for bad, msg in (({"prune_step": 0.0}, r"prune_step must be in \(0, 1\]"),
                     ({"max_acc_drop": 1.0}, r"max_acc_drop must be in \[0, 1\)"),
                     ({"holdout_fraction": 1.5}, r"holdout_fraction must be in \(0, 1\)"),
                     ({"selection": "best"}, "selection must be one of"), ({"epochs": -1}, "epochs must be"),
                     ({"lr": float("nan")}, "lr must be")):
        with pytest.raises(ConfigError, match=msg):
            FPConfig(**bad)
    with pytest.raises(ConfigError, match="selection='oracle' .* test data"):
        defenses.get("fp", selection="oracle")
    model, variables, x = _tiny(40)
    y = np.zeros(40, int)
    for cfg, msg in ((FPConfig(holdout_fraction=0.2), "holds out 8, fewer than 10; raise holdout_fraction"),
                     (FPConfig(holdout_fraction=0.5, batch_size=32), "20 remain .* fewer than one batch of 32")):
        with pytest.raises(ConfigError, match=msg):
            FinePruning(cfg).run(model, variables, defenses.CleanSet(x, y, 10), jax.random.PRNGKey(0))
    with pytest.raises(UnsupportedModelError, match="fp cannot prune ResNet18: .*residual sum") as e:
        FinePruning().run(models.ResNet18(10), {}, defenses.CleanSet(x, y, 10), jax.random.PRNGKey(0))
    assert isinstance(e.value, UserError) and "\n" not in str(e.value)
    no_bn = {**variables, "params": {k: v for k, v in variables["params"].items() if k != "bn5"}}
    with pytest.raises(UnsupportedModelError, match="no bn5/scale"):
        FinePruning().run(model, no_bn, defenses.CleanSet(x, y, 10), jax.random.PRNGKey(0))


@pytest.mark.slow
def test_fp_lowers_asr_on_the_digits_backdoor_and_pruned_channels_stay_zero(digits_backdoor):
    """Measured on the 2-core CPU (10 epochs, holdout 60 of 300 images, 41 of 64 channels pruned):
    asr_all 0.953 -> 0.533, clean accuracy 0.977 -> 0.973 (pruning alone, epochs=0: 0.570 / 0.853;
    3 epochs: 0.590 / 0.920; ``ft`` alone: 0.953 -> 0.883 in 10 epochs)."""
    d = digits_backdoor
    clean = defenses.CleanSet(d["clean_x"], d["clean_y"], 10)
    steps = []
    res = FinePruning(FPConfig(epochs=10, holdout_fraction=0.2, flip=False, crop_pad=2),
                      on_step=lambda *_: steps.append(1)).run(d["model"], d["variables"], clean, jax.random.PRNGKey(0))
    after = d["evaluate"](res.variables)
    assert d["before"]["asr_all"] >= 0.9
    assert after["asr_all"] <= d["before"]["asr_all"] - 0.3, (d["before"], after)
    assert after["clean_acc"] >= d["before"]["clean_acc"] - 0.03, (d["before"], after)
    assert [h["round"] for h in res.history] == list(range(1, 11)) and res.compile_seconds > 0
    assert len(steps) == FinePruning(FPConfig(epochs=10, holdout_fraction=0.2)).num_steps(clean) == 10 * (240 // 128)
    pruned = res.diagnostics["pruned_channels"]
    assert len(pruned) == res.diagnostics["pruned"] > 0
    bn5, bn5_before = res.variables["params"]["bn5"], d["variables"]["params"]["bn5"]
    assert not np.any(bn5["scale"][pruned]) and not np.any(bn5["bias"][pruned])
    assert not np.allclose(np.delete(bn5["scale"], pruned), np.delete(bn5_before["scale"], pruned))
    # the channels are silent: the defended model's block3 is exactly 0 there
    block = np.asarray(models.features(d["model"], res.variables, d["clean_x"][:50], names=["block3"])["block3"])
    assert not np.any(block[..., pruned]) and np.any(block)
