"""ibau_jax.training run directories: resume equals an uninterrupted run, a SIGKILL at any write
leaves a run that resumes to the same weights and reads consistently, mismatches are refused."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from ibau_jax import cli, training

sys.path.insert(0, str(Path(__file__).parent))
import training_kill_helper as kh  # noqa: E402

HELPER = Path(__file__).with_name("training_kill_helper.py")


def _leaves(tree):
    return [np.asarray(a) for a in jax.tree.leaves(tree)]


def _same(a, b):
    la, lb = _leaves(a), _leaves(b)
    return len(la) == len(lb) and all(np.array_equal(u, v) for u, v in zip(la, lb))


def _run(run_dir, **kw):
    model, x, y, config = kh.problem()
    if "lr" in kw:
        config = training.TrainConfig(**{**config.__dict__, "lr": kw.pop("lr")})
    if "x" in kw:
        x = kw.pop("x")
    return training.train(model, x, y, config, run_dir=run_dir, meta=kh.META, quiet=True, log=lambda s: None, **kw)


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    d = tmp_path_factory.mktemp("full") / "run"
    state, history = _run(d)
    return d, state, history


def _strip(h):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in h]


@pytest.mark.slow
def test_resume_equals_uninterrupted_and_checks_config(full, tmp_path):
    _, ref, hist_ref = full
    _, hist_half = _run(tmp_path / "cut", stop_after=1)
    assert len(hist_half) == 1 and training.read_run(tmp_path / "cut")["epochs_done"] == 1
    resumed, hist = _run(tmp_path / "cut", resume=True)
    assert _same((ref.params, ref.batch_stats, ref.opt_state), (resumed.params, resumed.batch_stats, resumed.opt_state))
    assert _strip(hist) == _strip(hist_ref)
    with pytest.raises(training.RunError, match=r"differs in \['lr'\]"):
        _run(tmp_path / "cut", resume=True, lr=0.1)
    with pytest.raises(training.RunError, match="already holds a run"):
        _run(tmp_path / "cut")
    # Other training data (one pixel changed) is refused, naming the fix.
    _, x, _, _ = kh.problem()
    x = x.copy()
    x[0, 0, 0, 0] += 0.5
    with pytest.raises(training.RunError, match="training data differ.*same data.*new --out"):
        _run(tmp_path / "cut", resume=True, x=x)
    assert issubclass(training.RunError, training.rundir.UserError)


def test_run_record_exports_and_latest_model(full):
    d, ref, hist = full
    run = training.read_run(d)
    assert run["epochs_done"] == 3 and _strip(run["history"]) == _strip(hist)
    assert run["config"]["epochs"] == 3 and len(run["config"][training.DATA_KEY]) == 64
    _, x, y, _ = kh.problem()
    assert run["config"][training.DATA_KEY] == training.data_fingerprint(x, y)
    variables, meta = training.latest_model(d)
    assert meta == {**kh.META, "epoch": 3}
    assert _same(variables, {"params": ref.params, "batch_stats": ref.batch_stats})
    # The step's model.npz (what `evaluate --model RUN_DIR` loads) and the exports hold the same weights.
    for path in (run["checkpoint"], d / training.MODEL_NPZ):
        with np.load(path) as z:
            np.testing.assert_array_equal(z["params/conv0/kernel"], variables["params"]["conv0"]["kernel"])
            assert json.loads(z["__meta__"].tobytes())["epoch"] == 3
    assert json.loads((d / training.RUN_JSON).read_text())["epochs_done"] == 3
    assert sorted(os.listdir(d / training.CHECKPOINTS)) == ["2", "3"]  # MAX_TO_KEEP = 2


@pytest.mark.slow
def test_sigkill_at_every_write_resumes_to_the_same_weights(full, tmp_path):
    _, ref, _ = full
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           # Every subprocess after the first reuses the compiled programs.
           "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    for k in range(1, kh.EPOCHS * kh.WRITES_PER_EPOCH + 1):
        d = tmp_path / f"kill{k}"
        r = subprocess.run([sys.executable, str(HELPER), str(d), str(k)], env=env, capture_output=True,
                           text=True, timeout=600)
        assert r.returncode == -signal.SIGKILL, (k, r.returncode, r.stderr[-2000:])
        finished = (k - 2) // kh.WRITES_PER_EPOCH + 1 if k >= 2 else 0  # epochs committed at the kill
        if finished:
            run = training.read_run(d)
            variables, meta = training.latest_model(d)
            assert run["epochs_done"] == meta["epoch"] == finished, k
            with np.load(run["checkpoint"]) as z:  # the file evaluate reads: the record's epoch
                assert json.loads(z["__meta__"].tobytes())["epoch"] == finished
                np.testing.assert_array_equal(z["params/classifier/kernel"], variables["params"]["classifier"]["kernel"])
        else:
            with pytest.raises(training.RunError, match="no finished epoch"):
                training.read_run(d)
        state, history = _run(d, resume=True)
        assert _same((ref.params, ref.batch_stats, ref.opt_state), (state.params, state.batch_stats, state.opt_state)), k
        assert [h["epoch"] for h in history] == [1, 2, 3]
        assert json.loads((d / training.RUN_JSON).read_text())["epochs_done"] == 3
        assert not [p for p in os.listdir(d / training.CHECKPOINTS) if "tmp" in p], k


def test_missing_or_corrupt_run_dir(full, tmp_path, capsys):
    with pytest.raises(training.RunError, match="does not exist"):
        _run(tmp_path / "nowhere", resume=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(training.RunError, match="checkpoints/ is missing"):
        training.read_run(tmp_path / "empty")
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "run.json").write_text("{}")
    with pytest.raises(training.RunError, match="older ibau-jax"):
        training.latest_model(legacy)
    # A damaged step: its run record is gone.
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(full[0], bad)
    for f in (bad / training.CHECKPOINTS / "3" / "run").iterdir():
        f.write_text("{not json")
    with pytest.raises(training.RunError, match="step 3 is corrupt.*delete"):
        training.read_run(bad)
    # the CLI turns it into one line and exit status 2
    assert cli.main(["unlearn", "--model", str(bad), "--out", str(tmp_path / "r.json")]) == 2
    assert "corrupt" in capsys.readouterr().err
    assert cli.main(["unlearn", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "r.json")]) == 2
    assert "neither an architecture" in capsys.readouterr().err
