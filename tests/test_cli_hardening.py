"""Bad input is refused before any work, with one line and exit 2; Ctrl-C stops cleanly.

Each case reproduces an observation of the hardening review (issue "Hardening"): the input,
and the behaviour now. The table in docs/reliability.md lists them.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import CIFAR_DIR, CKPT, TRIGGERS, shared_path
from ibau_jax import cli


def _model_args(*extra):
    return ["--checkpoint", str(shared_path(CKPT)), "--dataset", "cifar10",
            "--data-dir", str(shared_path(CIFAR_DIR)), "--no-download",
            "--trigger-dir", str(shared_path(TRIGGERS)), "--attack", "badnets", "--target", "8", *extra]


def _refused(argv, capsys, *needles):
    """main(argv) exits 2 with one line naming the problem, and nothing was loaded or run."""
    assert cli.main(argv) == 2, argv
    out, err = capsys.readouterr()
    assert "before" not in out, (argv, out)                  # the model was never evaluated
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ibau-jax: error: "), (argv, err)
    for n in needles:
        assert n in lines[0], (argv, lines[0], n)


@pytest.fixture
def a_file(tmp_path):
    f = tmp_path / "plainfile"
    f.write_text("x")
    return f


# 1. late failures that lost finished work: now refused up front
def test_unwritable_outputs_are_refused_before_the_work(tmp_path, a_file, capsys):
    _refused(["unlearn", *_model_args("--out", str(tmp_path / "r.json"), "--save", str(a_file / "m.npz"))],
             capsys, "--save", "is not a directory")
    _refused(["unlearn", *_model_args("--out", str(a_file / "r.json"))], capsys, "--out", "is not a directory")
    (tmp_path / "adir").mkdir()
    _refused(["unlearn", *_model_args("--out", str(tmp_path / "adir"))], capsys, "is a directory")
    _refused(["sweep", *_model_args("--out", str(a_file / "s.json"))], capsys, "--out")
    _refused(["defend", "--defense", "ft", *_model_args("--out", str(a_file / "r.json"))], capsys, "--out")
    _refused(["demo", "--out", str(a_file / "demo")], capsys, "--out")
    _refused(["attack", "--data-dir", str(tmp_path), "--out", str(a_file / "run")], capsys, "--out")


@pytest.mark.parametrize("argv, needle", [
    (["demo", "--portion", "2"], "--portion must be in (0, 1]"),
    (["demo", "--n-clean", "10"], "smaller than one I-BAU batch"),
    (["attack", "--eval-every", "0", "--out", "RUN"], "--eval-every must be >= 1"),
    (["unlearn", "--outer-lr", "nan", "--out", "R"], "--outer-lr must be a finite number > 0"),
    # 2. accepted with exit 0 and wrong results before
    (["unlearn", "--radius", "-1", "--out", "R"], "--radius must be a finite number > 0"),
    (["unlearn", "--limit-batches", "-4", "--out", "R"], "--limit-batches must be >= 0"),
    (["attack", "--train-limit", "-49500", "--out", "RUN"], "--train-limit must be >= 0"),
    (["unlearn", "--devices", "0", "--out", "R"], "--devices must be >= 1"),
    (["sweep", "--num-seeds", "0", "--out", "R"], "--num-seeds must be >= 1"),
    (["defend", "--defense", "ibau", "--set", "inner_reg=inf", "--out", "R"], "inner_reg='inf': must be a finite number"),
    (["defend", "--defense", "ft", "--set", "epochs=0", "--out", "R"], "epochs must be an integer >= 1"),
    (["attack", "--attack", "sig", "--attack-option", "gain=2", "--out", "RUN"], "attack 'sig' has no option 'gain'"),
    (["attack", "--attack", "wanet", "--attack-option", "k=two", "--out", "RUN"], "option k must be an integer"),
])
def test_bad_values_are_refused_up_front(argv, needle, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    extra = _model_args() if argv[0] in ("unlearn", "sweep", "defend") else []
    _refused([*argv, *extra], capsys, needle)


def test_a_run_dirs_attack_options_are_the_defaults_and_flags_override_them(tmp_path, monkeypatch):
    """`--model RUN_DIR` rebuilds the trigger with the options it was trained with (run.json's
    attack_options); --attack-option overrides one; another --attack drops them."""
    import argparse

    from ibau_jax import attacks, training
    from ibau_jax.cli import commands

    run = {"config": {"model": "small_vgg", "attack": "sig", "target": 0, "trigger_seed": 7,
                      "attack_options": {"delta": 0.157}}, "checkpoint": str(tmp_path / "ck.npz")}
    monkeypatch.setattr(training, "read_run", lambda d: run)

    def resolved(*options, attack=None):
        args = argparse.Namespace(model=str(tmp_path), checkpoint=None, attack=attack, target=None,
                                  attack_option=list(options))
        assert commands.resolve_run_dir(args) == 7 and args.checkpoint == run["checkpoint"]
        return args.attack_options

    assert resolved() == {"delta": 0.157}
    assert resolved("freq=3") == {"delta": 0.157, "freq": 3.0}
    assert resolved("delta=0.1") == {"delta": 0.1}
    assert resolved(attack="badnets") == {}
    with pytest.raises(attacks.AttackError, match="no option 'gain'"):
        resolved("gain=1")


# 5. Ctrl-C: finish the work in progress, mark the result, exit 130 (no crash)
@pytest.mark.slow
def test_ctrl_c_stops_at_a_round_boundary_and_marks_the_result(tmp_path):
    out = tmp_path / "r.json"
    cmd = [sys.executable, "-m", "ibau_jax.cli", "defend", "--defense", "ibau", "--set", "rounds=4",
           "--set", "max_batches=1", *_model_args("--quiet", "--out", str(out), "--eval-limit", "500")]
    for wait_for in ("before", "round 1"):
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONUNBUFFERED": "1"})
        for line in p.stdout:
            if line.startswith(wait_for):
                break
        time.sleep(0.5)  # "before": inside the first compilation (or the first round)
        p.send_signal(signal.SIGINT)
        rest, err = p.communicate(timeout=600)
        assert p.returncode == 130, (wait_for, p.returncode, err[-2000:])
        assert "Segmentation" not in err and "Traceback" not in err, err
        res = json.loads(out.read_text())
        assert res["interrupted"] is True and res["complete"] is False
        assert len(res["history"]) < 4, wait_for
        if wait_for == "round 1":
            assert len(res["history"]) >= 1 and res["after"] == {k: res["history"][-1][k] for k in res["after"]}
