"""The data-parallel train step and epoch on 1, 2, 3 and 8 (forced CPU) devices equal the
one-device step, also when the batch (20) does not split evenly (3 and 8 devices pad it)."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

HELPER = Path(__file__).with_name("training_sharded_helper.py")
SIZES = (1, 2, 3, 8)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded") / "train.npz"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, str(HELPER), str(out), *map(str, SIZES)], env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    with np.load(out) as z:
        return dict(z)


def _rel(a, b):
    return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.mark.slow
def test_the_reference_step_moves_the_weights(results):
    assert int(results["devices"]) == 8
    assert _rel(results["ref"], results["init"]) > 1e-3  # otherwise the comparisons prove nothing


@pytest.mark.slow
@pytest.mark.parametrize("n", SIZES)
def test_sharded_train_step_matches_single_device(results, n):
    assert int(results[f"mesh{n}"]) == n
    assert _rel(results[f"step{n}"], results["ref"]) <= 1e-5
    assert _rel(results[f"step{n}"] - results["init"], results["ref"] - results["init"]) <= 1e-4
    np.testing.assert_allclose(results[f"loss{n}"], results["loss_ref"], rtol=1e-5)
    assert float(results[f"acc{n}"]) == float(results["acc_ref"])  # padding never counts as a hit or miss


@pytest.mark.slow
def test_sharded_epoch_matches_single_device(results):
    n = SIZES[-1]
    assert _rel(results["epoch_ref"], results["init"]) > 1e-3
    assert _rel(results[f"epoch{n}"], results["epoch_ref"]) <= 1e-5
    np.testing.assert_allclose(results[f"epoch_loss{n}"], results["epoch_loss_ref"], rtol=1e-5)
