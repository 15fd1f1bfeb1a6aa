"""The committed zoo (experiments/zoo): the CIFAR-10 models trained for cifar10_single.toml
(Blend, SIG, WaNet) are the entries its config asks for, load through the restricted loader,
were trained on the full training set, and meet the floors (clean accuracy >= 0.80, ASR >= 0.9)."""
from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest

from ibau_jax import checkpoints, training
from ibau_jax.bench import config, zoo

ROOT = Path(__file__).resolve().parents[1]
TRAINED = ("blend", "sig", "wanet")  # committed with their records (docs/evaluation.md, "Zoo models")


@pytest.fixture(scope="module")
def single():
    return config.load(ROOT / "experiments" / "configs" / "cifar10_single.toml", profile="cpu")


@pytest.mark.parametrize("name", TRAINED)
def test_committed_zoo_model_matches_its_spec_and_meets_the_floors(single, name):
    entry = zoo.lookup(ROOT / "experiments" / "zoo", single.model(name))  # ZooError if its spec changed
    assert entry is not None, f"experiments/zoo/{name} is not committed"
    rec, run = entry.record, training.read_run(entry.run_dir)
    assert rec["kind"] == "trained" and rec["epochs"] == run["epochs_done"] == single.model(name).train["epochs"]
    assert run["config"]["n_train"] == 50000 and run["config"]["train_limit"] == 0  # the full training set
    assert rec["clean_acc"] >= 0.80 and rec["asr"] >= 0.9, rec
    assert rec["clean_acc"] == run["history"][-1]["clean_acc"]
    variables, meta = checkpoints.load_model(entry.run_dir / run["checkpoint"], "small_vgg", 10)
    assert meta["attack"] == name and meta["target"] == single.model(name).target
    assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree.leaves(variables))
