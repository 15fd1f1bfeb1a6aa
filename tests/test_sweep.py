"""Sweeps: seeds and hyperparameters vmapped (or lax.map-ed) in chunks equal separate rounds."""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest

from ibau_jax import sweep
from ibau_jax.defenses import ibau
from ibau_jax.errors import ConfigError

sys.path.insert(0, str(Path(__file__).parent))
import sharding_helper  # noqa: E402


@pytest.fixture(scope="module")
def small():
    return sharding_helper.problem()


def _flat(tree):
    return sharding_helper.flat(tree)


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["map"])  # vmap: below, with hyperparameters
def test_sweep_over_seeds_matches_separate_rounds(small, strategy):
    model, variables, config, xb, yb, _ = small
    seeds = [0, 1, 2, 3]
    recs = sweep.sweep_rounds(model, config, variables, xb, yb, seeds=seeds, chunk=4, keep_params=True,
                              strategy=strategy)
    assert len(recs) == 1 and len(recs[0]["params"]) == 4
    round_fn = ibau.make_round(model, config)
    params, bs = variables["params"], variables["batch_stats"]
    outs = []
    for s, got in zip(seeds, recs[0]["params"]):
        masks = ibau.seed_masks(s, 1, xb.shape[0], config)[0]  # as `ibau-jax unlearn --seed s`, round 1
        ref = _flat(round_fn(params, bs, config.outer_tx().init(params), xb, yb, masks).params)
        assert _rel(_flat(got), ref) <= 1e-4
        outs.append(ref)
    assert _rel(outs[0], outs[1]) > 1e-6  # the seeds really differ


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["vmap"])  # seeds and traced hyperparameters batched together
def test_sweep_over_hyperparameters_matches_configs(small, strategy):
    model, variables, config, xb, yb, _ = small
    grid = {"outer_lr": [1e-2, 3e-3], "fp_step": [0.1, 0.05], "inner_reg": [1e-2], "radius": [1.0]}
    evals = []
    recs = sweep.sweep_rounds(model, config, variables, xb, yb, seeds=[5], grid=grid, chunk=3,
                              keep_params=True, strategy=strategy, evaluate_fn=lambda v: evals.append(1) or
                              {"clean_acc": 0.5, "asr_all": 0.1, "asr_nontarget": 0.0, "robust_acc": 0.2})
    assert len(recs) == 4 and len(evals) == 4  # chunks of 3: one full, one padded
    params, bs = variables["params"], variables["batch_stats"]
    masks = ibau.seed_masks(5, 1, xb.shape[0], config)[0]
    for r in recs:
        cfg = dataclasses.replace(config, **{k: r[k] for k in grid})
        ref = _flat(ibau.make_round(model, cfg)(params, bs, cfg.outer_tx().init(params), xb, yb, masks).params)
        assert _rel(_flat(r["params"][0]), ref) <= 1e-4, r
        assert r["clean_acc_mean"] == 0.5 and r["clean_acc_std"] == 0.0


def test_sweep_rejects_unknown_field_and_no_seeds(small):
    model, variables, config, xb, yb, _ = small
    with pytest.raises(ConfigError, match="unknown IBAUConfig field"):
        sweep.sweep_rounds(model, config, variables, xb, yb, seeds=[0], grid={"lr": [1.0]})
    with pytest.raises(ConfigError, match="at least one seed"):
        sweep.sweep_rounds(model, config, variables, xb, yb, seeds=[])


def test_sweep_defense_runs_every_setting_and_seed_and_checks_settings_first():
    """Any registered defense: one run per (setting, seed), mean ± std (ddof 1) over seeds;
    a bad value anywhere in the grid fails before the first run."""
    import numpy as np
    import pytest

    from ibau_jax import sweep
    from ibau_jax.errors import ConfigError

    calls = []

    def run_one(defense, seed):
        calls.append((defense.config.lr, defense.config.epochs, seed))
        v = defense.config.lr * 10 + seed / 100
        return {"clean_acc": v, "asr_all": 1 - v, "asr_nontarget": 0.5, "robust_acc": seed / 10}

    recs = sweep.sweep_defense("ft", {"epochs": 2}, {"lr": [0.01, 0.02]}, [0, 1, 2], run_one)
    assert calls == [(lr, 2, s) for lr in (0.01, 0.02) for s in (0, 1, 2)]
    assert [r["lr"] for r in recs] == [0.01, 0.02] and recs[0]["seeds"] == [0, 1, 2]
    vals = np.array([0.1, 0.11, 0.12])
    assert recs[0]["clean_acc_mean"] == pytest.approx(vals.mean())
    assert recs[0]["clean_acc_std"] == pytest.approx(vals.std(ddof=1))
    calls.clear()
    with pytest.raises(ConfigError, match="lr must be"):
        sweep.sweep_defense("ft", {}, {"lr": [0.01, -1.0]}, [0], run_one)
    assert calls == []
