"""`ibau-jax demo` end to end on the bundled digits: the backdoor works, I-BAU removes it."""
import json

import pytest

from ibau_jax import cli


@pytest.mark.slow
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


def test_demo_refuses_bad_settings_before_any_work(tmp_path, capsys):
    """Each bad demo setting is one line and exit 2, before any data is read or model trained."""
    cases = [(["--portion", "2"], "portion must be in (0, 1]"),
             (["--n-clean", "10"], "smaller than one I-BAU batch"),
             (["--n-clean", "1000", "--n-test", "900"], "leave no digits to train on"),
             (["--target", "12"], "outside 0..9"),
             (["--outer-lr", "nan"], "outer-lr must be a finite number"),
             (["--rounds", "0"], "--rounds must be >= 1")]
    for flags, msg in cases:
        assert cli.main(["demo", "--out", str(tmp_path / "d"), "--quiet", *flags]) == 2, flags
        err = capsys.readouterr().err
        assert msg in err and len(err.strip().splitlines()) == 1, (flags, err)
    assert not (tmp_path / "d" / "report.json").exists()
