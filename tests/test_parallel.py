"""Data-parallel rounds on 1/2/4/8 CPU devices, two-process (multi-host) rounds, and vmapped sweeps.

Device counts come from XLA_FLAGS=--xla_force_host_platform_device_count, which must be set
before JAX starts, so those checks run tests/parallel_helper.py in subprocesses.
"""
from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from ibau_jax import parallel
from ibau_jax.defenses import ibau

HELPER = Path(__file__).with_name("parallel_helper.py")
sys.path.insert(0, str(HELPER.parent))
import parallel_helper  # noqa: E402


def _env(devices: int) -> dict[str, str]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    for k in ("IBAU_COORDINATOR", "IBAU_NUM_PROCESSES", "IBAU_PROCESS_ID"):
        env.pop(k, None)
    return env


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def mesh_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("par") / "meshes.npz"
    subprocess.run([sys.executable, str(HELPER), "meshes", str(out), "1", "2", "4", "8"],
                   env=_env(8), check=True, timeout=300)
    return dict(np.load(out))


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_sharded_round_matches_single_device(mesh_results, n):
    ref, init = mesh_results["ref"], mesh_results["init"]
    assert _rel(ref, init) > 1e-3  # the round really moved the parameters
    assert _rel(mesh_results[f"mesh{n}"], ref) <= 1e-4
    # stricter: the parameter *change* agrees too
    assert _rel(mesh_results[f"mesh{n}"] - init, ref - init) <= 1e-4


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_sharded_train_step_matches_single_device(mesh_results, n):
    ref, init = mesh_results["train_ref"], mesh_results["train_init"]
    assert _rel(ref, init) > 1e-4  # the step moved params and BatchNorm statistics
    assert _rel(mesh_results[f"train{n}"] - init, ref - init) <= 1e-4


def test_sharded_predict_matches(mesh_results):
    np.testing.assert_array_equal(mesh_results["pred_mesh"], mesh_results["pred_ref"])


def test_indivisible_batch_is_a_clear_error():
    r = subprocess.run([sys.executable, str(HELPER), "badbatch"], env=_env(4), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "batch size 6 is not divisible by the 4 devices" in r.stdout
    assert "multiple of 4" in r.stdout


def test_check_divisible_in_process():
    mesh = parallel.make_mesh(1)
    parallel.check_divisible(7, mesh)  # one device: anything goes
    with pytest.raises(ValueError, match="asked for 2 devices but 1"):
        parallel.make_mesh(len(jax.devices()) + 1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_single_process(mesh_results, tmp_path):
    out = tmp_path / "multi.npz"
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, str(HELPER), "multi", str(out), "--coordinator",
                               f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)],
                              env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    try:
        logs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(logs)
    res = np.load(out)
    assert res["info"].tolist() == [2, 8, 4]  # 2 processes, global mesh of 8, 4 local devices
    assert _rel(res["multi"], mesh_results["ref"]) <= 1e-4
    p1 = np.load(f"{out}.p1.npz")
    np.testing.assert_array_equal(p1["multi"], res["multi"])  # both processes hold the same result


def test_init_distributed_env(monkeypatch):
    for k in ("IBAU_COORDINATOR", "IBAU_NUM_PROCESSES", "IBAU_PROCESS_ID"):
        monkeypatch.delenv(k, raising=False)
    assert parallel.init_distributed() is False  # nothing given: single process, no-op
    monkeypatch.setenv("IBAU_COORDINATOR", "127.0.0.1:1")
    with pytest.raises(ValueError, match="number of processes"):
        parallel.init_distributed()
    monkeypatch.setenv("IBAU_NUM_PROCESSES", "2")
    monkeypatch.setenv("IBAU_PROCESS_ID", "2")
    with pytest.raises(ValueError, match=r"process_id must be in \[0, 2\)"):
        parallel.init_distributed()


# ----------------------------------------------------------------------------- sweeps

@pytest.fixture(scope="module")
def small():
    return parallel_helper.problem()


def _flat(tree):
    return parallel_helper.flat(tree)


@pytest.mark.parametrize("strategy", ["vmap", "map"])
def test_sweep_over_seeds_matches_separate_rounds(small, strategy):
    model, variables, config, xb, yb, _ = small
    seeds = [0, 1, 2, 3]
    recs = parallel.sweep_rounds(model, config, variables, xb, yb, seeds=seeds, chunk=4, keep_params=True,
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


@pytest.mark.parametrize("strategy", ["vmap", "map"])
def test_sweep_over_hyperparameters_matches_configs(small, strategy):
    model, variables, config, xb, yb, _ = small
    grid = {"outer_lr": [1e-2, 3e-3], "fp_step": [0.1, 0.05], "inner_reg": [1e-2], "radius": [1.0]}
    evals = []
    recs = parallel.sweep_rounds(model, config, variables, xb, yb, seeds=[5], grid=grid, chunk=3,
                                 keep_params=True, strategy=strategy, evaluate_fn=lambda v: evals.append(1) or
                                 {"clean_acc": 0.5, "asr_all": 0.1, "asr_nontarget": 0.0})
    assert len(recs) == 4 and len(evals) == 4  # chunks of 3: one full, one padded
    params, bs = variables["params"], variables["batch_stats"]
    masks = ibau.seed_masks(5, 1, xb.shape[0], config)[0]
    for r in recs:
        cfg = dataclasses.replace(config, **{k: r[k] for k in grid})
        ref = _flat(ibau.make_round(model, cfg)(params, bs, cfg.outer_tx().init(params), xb, yb, masks).params)
        assert _rel(_flat(r["params"][0]), ref) <= 1e-4, r
        assert r["clean_acc_mean"] == 0.5 and r["clean_acc_std"] == 0.0


def test_sweep_rejects_unknown_field(small):
    model, variables, config, xb, yb, _ = small
    with pytest.raises(ValueError, match="unknown IBAUConfig field"):
        parallel.sweep_rounds(model, config, variables, xb, yb, seeds=[0], grid={"lr": [1.0]})
