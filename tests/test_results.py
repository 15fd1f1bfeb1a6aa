"""The result contract's writer: strict JSON, markdown, atomic files, writability probes."""
import json
import math
import os

import pytest

from ibau_jax import results
from ibau_jax.errors import UserError


def _result(**kw):
    r = {"defense": "ibau", "config": {"rounds": 1}, "run": {"attack": "badnets", "target": 8, "dataset": "cifar10",
                                                            "seed": 0},
         "before": {"clean_acc": 0.85, "asr_all": 0.97, "asr_nontarget": 0.96, "robust_acc": 0.02},
         "after": {"clean_acc": 0.83, "asr_all": 0.1, "asr_nontarget": None, "robust_acc": 0.8},
         "der": 0.92, "history": [{"round": 1, "seconds": 1.5, "clean_acc": 0.83, "asr_all": 0.1,
                                   "asr_nontarget": None, "robust_acc": 0.8, "delta_norm": float("nan")}],
         "seconds": 1.5, "compile_seconds": 3.0}
    r.update(kw)
    return r


def test_strict_json_has_no_nan(tmp_path):
    out = tmp_path / "r.json"
    results.save(out, _result())
    text = out.read_text()
    assert "NaN" not in text and "Infinity" not in text
    data = json.loads(text)
    assert data["history"][0]["delta_norm"] is None
    assert set(results.CONTRACT_KEYS) <= set(data)
    md = out.with_suffix(".md").read_text()
    assert "| after | 0.8300 | 0.1000 | – | 0.8000 |" in md and "DER 0.9200" in md
    with pytest.raises(ValueError):
        json.dumps({"x": math.nan}, allow_nan=False)  # what strict() protects against


def test_markdown_of_a_run_in_progress():
    md = results.markdown(_result(after=None, der=None, seconds=None, compile_seconds=None, history=[]))
    assert "in progress" in md and "| before |" in md


def test_check_writable(tmp_path):
    assert results.check_writable(tmp_path / "new" / "r.json") == tmp_path / "new" / "r.json"
    with pytest.raises(UserError, match="is a directory"):
        results.check_writable(tmp_path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="not a directory"):
        results.check_writable(tmp_path / "file" / "r.json")
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        with pytest.raises(UserError, match="not writable"):
            results.check_writable(ro / "r.json")
