"""Data parallelism: padding and weights, I-BAU on 1/2/3/4/8 CPU devices (3 pads the batch of 8),
sharded evaluation, two-process (multi-host) rounds, and distributed start-up.

Device counts come from XLA_FLAGS=--xla_force_host_platform_device_count, which must be set
before JAX starts, so those checks run tests/sharding_helper.py in subprocesses.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ibau_jax import distributed, sharding
from ibau_jax.errors import ConfigError, UserError

HELPER = Path(__file__).with_name("sharding_helper.py")
SIZES = (1, 2, 3, 8)


def _env(devices: int) -> dict[str, str]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    for k in ("IBAU_COORDINATOR", "IBAU_NUM_PROCESSES", "IBAU_PROCESS_ID"):
        env.pop(k, None)
    return env


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# ----------------------------------------------------------------------------- in process

def test_pad_examples_and_weights():
    x = np.arange(2 * 5 * 3, dtype=np.float32).reshape(2, 5, 3)
    p = sharding.pad_examples(x, 1, 8)
    assert p.shape == (2, 8, 3)
    np.testing.assert_array_equal(p[:, :5], x)
    assert not p[:, 5:].any()
    assert sharding.pad_examples(x, 1, 5) is x or np.array_equal(sharding.pad_examples(x, 1, 5), x)
    w = sharding.example_weights(5, 8, (2,))
    np.testing.assert_array_equal(w, np.tile([1, 1, 1, 1, 1, 0, 0, 0], (2, 1)))
    with pytest.raises(ValueError):
        sharding.pad_examples(x, 1, 4)


def test_weighted_mean_ignores_padding_and_is_plain_mean_without_weights():
    v = jnp.asarray([1.0, 2.0, 6.0, 100.0, -7.0])
    w = jnp.asarray([1.0, 1.0, 1.0, 0.0, 0.0])
    assert float(sharding.weighted_mean(v, w)) == pytest.approx(3.0)
    assert float(sharding.weighted_mean(v[:3], None)) == float(jnp.mean(v[:3]))


def test_padded_size():
    assert sharding.padded_size(100, None) == 100
    mesh = sharding.make_mesh(1)
    assert sharding.padded_size(7, mesh) == 7


def test_check_divisible_and_mesh_errors():
    mesh = sharding.make_mesh(1)
    sharding.check_divisible(7, mesh)  # one device: anything goes
    with pytest.raises(ConfigError, match="asked for 2 devices but 1"):
        sharding.make_mesh(len(jax.devices()) + 1)


def test_init_distributed_env(monkeypatch):
    for k in ("IBAU_COORDINATOR", "IBAU_NUM_PROCESSES", "IBAU_PROCESS_ID"):
        monkeypatch.delenv(k, raising=False)
    assert distributed.init_distributed() is False  # nothing given: single process, no-op
    monkeypatch.setenv("IBAU_COORDINATOR", "127.0.0.1:1")
    with pytest.raises(UserError, match="number of processes"):
        distributed.init_distributed()
    monkeypatch.setenv("IBAU_NUM_PROCESSES", "2")
    monkeypatch.setenv("IBAU_PROCESS_ID", "2")
    with pytest.raises(UserError, match=r"process_id must be in \[0, 2\)"):
        distributed.init_distributed()


# ----------------------------------------------------------------------------- forced devices

@pytest.fixture(scope="module")
def mesh_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("par") / "meshes.npz"
    subprocess.run([sys.executable, str(HELPER), "meshes", str(out), *map(str, SIZES)],
                   env=_env(8), check=True, timeout=600)
    return dict(np.load(out))


@pytest.mark.slow
@pytest.mark.parametrize("n", SIZES)
def test_sharded_defense_matches_single_device(mesh_results, n):
    ref, init = mesh_results["ref"], mesh_results["init"]
    assert _rel(ref, init) > 1e-3  # the round really moved the parameters
    assert int(mesh_results[f"devices{n}"]) == n
    assert int(mesh_results[f"padded{n}"]) == (9 if n == 3 else 8)  # 3 devices: the batch of 8 is padded
    assert _rel(mesh_results[f"mesh{n}"], ref) <= 1e-4
    # stricter: the parameter *change* agrees too
    assert _rel(mesh_results[f"mesh{n}"] - init, ref - init) <= 1e-4


@pytest.mark.slow
def test_sharded_predict_matches(mesh_results):
    np.testing.assert_array_equal(mesh_results["pred_mesh"], mesh_results["pred_ref"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_single_process(mesh_results, tmp_path):
    out = tmp_path / "multi.npz"
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, str(HELPER), "multi", str(out), "--coordinator",
                               f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)],
                              env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    try:
        logs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(logs)
    res = np.load(out)
    assert res["info"].tolist() == [2, 8, 4]  # 2 processes, global mesh of 8, 4 local devices
    assert _rel(res["multi"], mesh_results["ref"]) <= 1e-4
    p1 = np.load(f"{out}.p1.npz")
    np.testing.assert_array_equal(p1["multi"], res["multi"])  # both processes hold the same result
