"""`ibau-jax demo` end to end on the bundled digits: the backdoor works, I-BAU removes it."""
import json

from ibau_jax import cli


def test_demo_removes_backdoor_and_writes_report(tmp_path, capsys):
    out = tmp_path / "demo"
    # The README's command with its default settings (10 rounds). Clean accuracy moves by a
    # few points from round to round (0.90 after round 8, 0.95 after rounds 9 and 10 on the
    # 2-core CPU), so the test checks the run a user gets, not a shortened one.
    assert cli.main(["demo", "--out", str(out), "--quiet"]) == 0
    rep = json.loads((out / "report.json").read_text())
    poisoned, final = rep["rows"][0], rep["rows"][-1]
    assert poisoned["asr_all"] >= 0.9 and poisoned["clean_acc"] >= 0.9, poisoned
    assert final["asr_all"] <= 0.2 and final["asr_nontarget"] <= 0.1, final
    assert final["clean_acc"] >= poisoned["clean_acc"] - 0.05, (poisoned, final)
    for name in ("report.md", "curves.png", "trigger.png", "delta.png"):
        assert (out / name).stat().st_size > 0, name
    assert "| round 8 |" in (out / "report.md").read_text()
