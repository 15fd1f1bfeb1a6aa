"""`ibau-jax bench experiments/configs/smoke.toml`: the whole command on the digits data (zoo
training included), killed (SIGKILL) after its first finished cell and resumed: the records
equal an uninterrupted run's (wall and compile times excluded), and `report` rebuilds the
tables from the records alone."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ibau_jax.bench import records

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "experiments" / "configs" / "smoke.toml"


def bench(results: Path, zoo: Path, **kw) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "ibau_jax.cli", "bench", str(SMOKE), "--results", str(results), "--zoo", str(zoo),
           "--quiet"]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, **kw)


def comparable(results: Path) -> dict:
    recs = records.finished(results)
    return {k: records.comparable({kk: v for kk, v in r.items() if kk != "run"}) for k, r in recs.items()}


@pytest.mark.slow
def test_smoke_bench_killed_and_resumed_equals_uninterrupted(tmp_path):
    zoo = tmp_path / "zoo"
    full = bench(tmp_path / "full", zoo)
    out, _ = full.communicate(timeout=1500)
    assert full.returncode == 0, out
    ref = comparable(tmp_path / "full")
    assert len(ref) == 4                                    # 2 attacks x 2 defenses
    for rec in ref.values():                                # the poisoned models work, I-BAU removes it
        assert rec["before"]["asr_all"] > 0.8 and rec["before"]["clean_acc"] > 0.9
        if rec["defense"]["name"] == "ibau":
            assert rec["after"]["asr_all"] < 0.3

    # the same config again, the zoo reused: killed as soon as its first record appears
    rec_dir = tmp_path / "part" / records.RECORDS
    p = bench(tmp_path / "part", zoo)
    deadline = time.time() + 1200
    while time.time() < deadline and p.poll() is None and not list(rec_dir.glob("*.json")):
        time.sleep(0.2)
    os.killpg(p.pid, signal.SIGKILL)
    p.communicate()
    partial = list(rec_dir.glob("*.json"))
    assert 1 <= len(partial) < 4, "the kill must land inside the run"
    first = {q.name: q.read_bytes() for q in partial}

    again = bench(tmp_path / "part", zoo)
    out, _ = again.communicate(timeout=1500)
    assert again.returncode == 0, out
    assert f"4 cells, {len(partial)} finished" in out
    assert {q.name: q.read_bytes() for q in partial} == first      # finished cells were not rerun
    assert comparable(tmp_path / "part") == ref

    report = subprocess.run([sys.executable, "-m", "ibau_jax.cli", "report", str(tmp_path / "part")], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stderr
    s = json.loads((tmp_path / "part" / "report" / "report.json").read_text())
    assert s["finished"] == 4 and not s["missing"] and s["profile"] == "full"
    r = ref["digits_badnets__ibau__n300__s0"]
    assert s["tables"]["300"]["digits_badnets"]["ibau"]["asr_all"] == r["after"]["asr_all"]


def test_a_zoo_models_attack_options_are_trained_recorded_and_used_by_its_cells(tmp_path):
    """[models.NAME] attack_options: the zoo trains with them, records them (run.json and the zoo
    record's spec), and a cell's experiment rebuilds the same trigger (here Blend at alpha 0.5)."""
    import numpy as np

    from ibau_jax import attacks, training
    from ibau_jax.bench import config, runner, zoo

    cfg = config.parse({"name": "o", "n_clean": [100], "defenses": {"ft": {"epochs": 1, "batch_size": 50}},
                        "models": {"s": {"dataset": "digits", "attack": "blend", "target": 0, "poison_ratio": 0.1,
                                         "attack_options": {"alpha": 0.5},
                                         "train": {"epochs": 1, "batch_size": 32, "train_limit": 64}}}})
    spec = cfg.model("s")
    entry = zoo.ensure(tmp_path / "zoo", spec, quiet=True, log=lambda s: None)
    run = training.read_run(entry.run_dir)
    assert run["config"]["attack_options"] == {"alpha": 0.5} == entry.record["spec"]["attack_options"]
    exp, _ = runner.digits_experiment(spec, entry, 100)
    blend = attacks.get("blend", num_classes=10, target=0, seed=int(run["config"]["trigger_seed"]), alpha=0.5)
    np.testing.assert_allclose(exp.asr_x, np.clip(exp.clean_x * blend.keep + blend.pattern, 0, 1), atol=1e-6)
    default = attacks.get("blend", num_classes=10, target=0, seed=int(run["config"]["trigger_seed"]))
    assert not np.allclose(exp.asr_x, np.clip(exp.clean_x * default.keep + default.pattern, 0, 1))
    # a cell on it (the bench's own path, ft for one epoch): its record names the options
    from ibau_jax.cli import commands
    cfg = dataclasses.replace(cfg, zoo=str(tmp_path / "zoo"))
    assert runner.run(cfg, tmp_path / "results", commands=commands, quiet=True, log=lambda s: None) == 0
    (rec,) = records.finished(tmp_path / "results").values()
    assert rec["model"]["spec"]["attack_options"] == {"alpha": 0.5}
    assert rec["before"]["asr_all"] == exp.evaluate(exp.variables)["asr_all"]   # measured with that trigger
