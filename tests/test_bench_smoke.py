"""`ibau-jax bench experiments/configs/smoke.toml`: the whole command on the digits data (zoo
training included), killed (SIGKILL) after its first finished cell and resumed: the records
equal an uninterrupted run's (wall and compile times excluded), and `report` rebuilds the
tables from the records alone."""
from __future__ import annotations

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
