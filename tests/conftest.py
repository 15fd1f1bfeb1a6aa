"""Shared test helpers: where ../shared is, and how its absence is treated.

Tests that need the shared data call ``shared_path(rel)``: it returns the path, or fails
(CI=true) / skips (elsewhere) when the file is absent, so CI can never pass by skipping.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# One persistent XLA compilation cache per test session, shared with the subprocesses the
# tests start (they inherit the environment): the same program (e.g. a faithful I-BAU round
# on the authors' model) is compiled once instead of once per test. Set before jax is imported.
_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _OWN_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="ibau-jax-xla-cache-")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")


def pytest_sessionfinish(session, exitstatus):
    # The process that made the cache removes it (xdist workers inherit the variable, so they
    # never own one); nothing is left in /tmp.
    if _OWN_CACHE is not None:
        import shutil
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)

REPO_ROOT = Path(__file__).resolve().parents[1]
CKPT = "ibau-original/checkpoints/badnets_8_02_ckpt.pth"
CIFAR_DIR = "datasets/cifar10"
TRIGGERS = "ibau-original/triggers"


def shared_root() -> Path:
    return Path(os.environ.get("IBAU_SHARED", REPO_ROOT.parent / "shared"))


def shared_path(rel: str) -> Path:
    path = shared_root() / rel
    if not path.exists():
        msg = f"shared data {path} not found (set IBAU_SHARED to the folder holding the shared data)"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return path


@pytest.fixture(scope="session")
def digits_backdoor():
    """The demo's poisoned model: bundled digits (32×32), BadNets target 0 at 10 %, small VGG
    (16, 32, 64) trained 12 epochs as `ibau-jax demo` does. Returns a dict with the model, its
    variables, the clean set (300 images), the test set and its triggered copy. ~25 s once."""
    from ibau_jax import attacks, models, rng, training
    from ibau_jax.data import digits

    d = digits.load_digits_32(0, 300, 300)
    streams = rng.streams(0)
    attack = attacks.make_attack("badnets", num_classes=10, target=0, seed=streams.seed_of("trigger"))
    poisoned = attacks.poison_dataset(d.train_x, d.train_y, attack, 0.1, streams.seed_of("poison"))
    asr_x, asr_t, _ = attacks.asr_test_set(d.test_x, d.test_y, attack)
    eval_sets = training.EvalSets(d.test_x, d.test_y, asr_x, asr_t, d.test_y)
    model = models.SmallVGG(10, widths=(16, 32, 64))
    cfg = training.TrainConfig(epochs=12, batch_size=64, lr=0.02, crop_pad=2, flip=False, seed=0, eval_every=12)
    state, _ = training.train(model, poisoned.x, poisoned.y, cfg, quiet=True, log=lambda s: None)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    import jax
    variables = jax.device_get(variables)
    return {"model": model, "variables": variables, "clean_x": d.clean_x, "clean_y": d.clean_y,
            "eval_sets": eval_sets, "evaluate": lambda v: eval_sets.evaluate(model, v),
            "before": eval_sets.evaluate(model, variables)}


def random_images(n: int = 4, seed: int = 0, shape=(32, 32, 3)):
    """(n, *shape) float32 images uniform in [0, 1) (tests of attacks)."""
    import numpy as np
    return np.random.default_rng(seed).random((n, *shape), dtype=np.float32)


def make_test_attack(name: str, **kw):
    """``attacks.get(name)`` with num_classes 10, target 2 and, for file triggers, the shared trigger folder."""
    from ibau_jax import attacks
    trig = shared_path(TRIGGERS) if name in attacks.FILE_TRIGGERS else None
    kw.setdefault("num_classes", 10)
    kw.setdefault("target", 2)
    return attacks.get(name, trigger_dir=trig, **kw)


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
    """Never touch ~/.cache or the network: IBAU_CACHE in tmp_path, downloads fail the test."""
    from ibau_jax.data import download as data_download
    monkeypatch.setenv("IBAU_CACHE", str(tmp_path / "default-cache"))

    def no_network(url, dst):
        raise AssertionError(f"test tried to download {url}")

    monkeypatch.setattr(data_download, "_fetch_url", no_network)
