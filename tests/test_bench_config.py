"""`ibau-jax bench` / `report` without running a defense: config validation, the grid, the
results directory (manifest, records, refusals) and the report, on synthetic records."""
from __future__ import annotations

import copy
import json
import math

import pytest

from ibau_jax.bench import config, grid, records, report
from ibau_jax.cli import main
from ibau_jax.errors import ConfigError, UserError

RAW = {
    "name": "t", "seeds": [0, 1], "n_clean": [100, 300],
    "models": {"a": {"dataset": "digits", "attack": "badnets", "target": 0, "poison_ratio": 0.1,
                     "train": {"epochs": 1}},
               "b": {"dataset": "digits", "attack": "blend", "target": 0, "poison_ratio": 0.1,
                     "train": {"epochs": 1}}},
    "defenses": {"ibau": {"rounds": 2}, "ft": {"epochs": 1}},
    "profile": {"cpu": {"seeds": [0], "defenses": {"ibau": {"rounds": 1}}}},
}


def raw(**changes):
    r = copy.deepcopy(RAW)
    for path, v in changes.items():
        node = r
        *head, last = path.split("__")
        for k in head:
            node = node[k]
        node[last] = v
    return r


@pytest.mark.parametrize("changes, words", [
    ({"defenses__nope": {}}, ["unknown defense 'nope'", "ibau", "ft"]),
    ({"models__a__attack": "nope"}, ["unknown attack 'nope'", "badnets", "blend"]),
    ({"models__a__arch": "vgg99"}, ["unknown arch 'vgg99'", "small_vgg"]),
    ({"models__a__dataset": "mnist"}, ["unknown dataset 'mnist'", "digits", "cifar10"]),
    ({"models__a__colour": 1}, ["unknown field(s) colour", "poison_ratio"]),
    ({"defenses__ibau__roundz": 1}, ["[defenses.ibau]", "roundz", "valid fields", "rounds"]),
    ({"bogus": 1}, ["unknown field(s) bogus"]),
    ({"n_clean": [100, 400]}, ["n_clean 400 exceeds the digits clean pool"]),
    ({"models__a__train": {"epochs": 0}}, ["epochs must be an integer >= 1"]),
    ({"models__b__attack_options": {"gain": 1}}, ["[models.b]", "no option 'gain'", "alpha"]),
    ({"models__b__attack_options": {"alpha": "strong"}}, ["[models.b]", "alpha must be a finite number"]),
    ({"models__b__attack_options": 0.3}, ["[models.b].attack_options must be a table"]),
])
def test_config_errors_name_the_problem_and_the_choices(changes, words):
    with pytest.raises(ConfigError) as e:
        config.parse(raw(**changes))
    msg = str(e.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg


def test_attack_options_enter_the_spec_and_its_identity_only_when_given():
    from ibau_jax.bench import zoo
    plain = config.parse(raw())
    opts = config.parse(raw(models__b__attack_options={"alpha": 1}))
    assert opts.model("b").attack_options == {"alpha": 1.0}                 # typed as the default (float)
    assert zoo.spec_dict(opts.model("b"))["attack_options"] == {"alpha": 1.0}
    assert "attack_options" not in zoo.spec_dict(plain.model("b"))          # older zoo entries stay valid
    assert opts.fingerprint != plain.fingerprint


def test_profile_merges_and_changes_the_fingerprint():
    full, cpu = config.parse(raw()), config.parse(raw(), profile="cpu")
    assert full.seeds == (0, 1) and cpu.seeds == (0,)
    assert full.defense("ibau").overrides == {"rounds": 2} and cpu.defense("ibau").overrides == {"rounds": 1}
    assert cpu.defense("ft").overrides == {"epochs": 1}          # tables merge, not replace
    assert full.fingerprint == config.parse(raw()).fingerprint != cpu.fingerprint
    with pytest.raises(ConfigError, match="unknown profile"):
        config.parse(raw(), profile="gpu")


def test_grid_is_the_product_with_stable_ids():
    cfg = config.parse(raw())
    cells = grid.cells(cfg)
    expect = {f"{m}__{d}__n{n}__s{s}" for m in "ab" for d in ("ibau", "ft") for n in (100, 300) for s in (0, 1)}
    assert [c.id for c in cells] == list(dict.fromkeys(c.id for c in cells))  # no duplicates
    assert {c.id for c in cells} == expect
    sub = config.parse(raw(), only_models=["b"], only_defenses=["ft"])
    assert {c.id for c in grid.cells(sub, selected=True)} == {i for i in expect if i.startswith("b__ft")}
    assert sub.fingerprint == cfg.fingerprint        # a subset run writes into the same results
    with pytest.raises(ConfigError, match="--models: zz not in"):
        config.parse(raw(), only_models=["zz"])


def _record(cfg, cell, before, after, seconds=1.0):
    from ibau_jax.bench import zoo

    dspec = cfg.defense(cell.defense)
    return {"format": records.FORMAT, "cell": cell.id, "fingerprint": cfg.fingerprint, "profile": cfg.profile,
            "n_clean": cell.n_clean, "seed": cell.seed,
            "model": {"name": cell.model, "spec": json.loads(json.dumps(zoo.spec_dict(cfg.model(cell.model))))},
            "defense": {"label": cell.defense, "name": dspec.defense, "overrides": dspec.overrides},
            "before": before, "after": after, "der": 0.5, "ra": after["robust_acc"], "history": [],
            "seconds": seconds, "compile_seconds": 2.0}


def test_results_dir_refuses_other_configs_and_corrupt_records(tmp_path):
    cfg = config.parse(raw())
    cells = grid.cells(cfg)
    d, _ = records.open_results(tmp_path / "r", cfg, cells)
    records.open_results(d, cfg, cells)                                  # same config: fine
    with pytest.raises(records.ResultsError, match="another config") as e:
        records.open_results(d, config.parse(raw(), profile="cpu"), cells)
    assert "new --results dir" in str(e.value)
    m = {"clean_acc": 0.9, "asr_all": 0.1, "asr_nontarget": 0.1, "robust_acc": 0.8}
    p = records.write_record(d, _record(cfg, cells[0], m, m))
    with pytest.raises(records.ResultsError, match="exists already"):
        records.write_record(d, _record(cfg, cells[0], m, m))
    assert records.finished(d).keys() == {cells[0].id}
    p.write_text('{"format": 1, "cell": ')                             # a torn write
    with pytest.raises(records.ResultsError) as e:
        records.finished(d)
    assert str(p) in str(e.value) and "delete it to rerun that cell" in str(e.value)
    with pytest.raises(records.ResultsError, match="is corrupt"):
        records.open_results(d, cfg, cells)                             # refused before any work


def test_an_edited_config_keeps_the_cells_it_did_not_change_and_names_those_it_did(tmp_path):
    """Editing a config keeps every finished cell whose model and defense settings are unchanged
    (the manifest follows the edit); a finished cell whose settings changed is refused by name."""
    cfg = config.parse(raw())
    cells = grid.cells(cfg)
    d, _ = records.open_results(tmp_path / "r", cfg, cells)
    m = {"clean_acc": 0.9, "asr_all": 0.1, "asr_nontarget": 0.1, "robust_acc": 0.8}
    a_ft = next(c for c in cells if c.model == "a" and c.defense == "ft")
    records.write_record(d, _record(cfg, a_ft, m, m))
    # model b retrained differently, a defense added: a's finished cell stays valid
    grown = config.parse(raw(models__b__train={"epochs": 3}, defenses__fp={"epochs": 1}))
    assert grown.fingerprint != cfg.fingerprint
    assert records.open_results(d, grown, grid.cells(grown))[1].keys() == {a_ft.id}
    assert records.read_manifest(d)["fingerprint"] == grown.fingerprint
    assert report.current_records(d, records.read_manifest(d)).keys() == {a_ft.id}
    # ft's settings changed: the finished ft cell is named, the manifest is left as it was
    for changed in (raw(defenses__ft={"epochs": 2}), raw(models__a__target=1)):
        new = config.parse(changed)
        with pytest.raises(records.ResultsError) as e:
            records.open_results(d, new, grid.cells(new))
        assert a_ft.id in str(e.value) and "delete those records" in str(e.value) and "\n" not in str(e.value)
        assert records.read_manifest(d)["fingerprint"] == grown.fingerprint
    # a record whose cell left the config is ignored, not refused
    fewer = config.parse(raw(defenses={"ibau": {"rounds": 2}}))
    assert records.open_results(d, fewer, grid.cells(fewer))[1] == {}
    assert report.current_records(d, records.read_manifest(d)) == {}


def test_report_tables_runtime_reference_and_plot(tmp_path):
    cfg = config.parse(raw(defenses__fp={"epochs": 1}))
    cells = grid.cells(cfg)
    d, _ = records.open_results(tmp_path / "r", cfg, cells)
    before = {"clean_acc": 0.94, "asr_all": 0.88, "asr_nontarget": 0.87, "robust_acc": 0.12}
    # model a, n 300: ibau seeds 0/1 -> acc 0.86/0.88 (mean 0.87), ft seed 0 only; ibau 10 s, ft 40 s
    done = {("a", "ibau", 300, 0): (0.86, 0.08, 10.0), ("a", "ibau", 300, 1): (0.88, 0.06, 10.0),
            ("a", "ft", 300, 0): (0.90, 0.70, 40.0), ("a", "ibau", 100, 0): (0.80, 0.20, 5.0),
            ("a", "ft", 100, 0): (0.85, 0.90, 30.0), ("a", "fp", 300, 0): (0.89, 0.60, 60.0)}
    for c in cells:
        k = (c.model, c.defense, c.n_clean, c.seed)
        if k in done:
            acc, asr, sec = done[k]
            rec = _record(cfg, c, before, {"clean_acc": acc, "asr_all": asr, "asr_nontarget": asr,
                                           "robust_acc": 1 - asr}, sec)
            if c.defense == "ibau":
                rec["history"] = [{"round": 1, "seconds": sec / 2}, {"round": 2, "seconds": sec / 2}]
            records.write_record(d, rec)
    records.write_status(d, {"b__ibau__n300__s0": "zoo model 'b' is not trained yet"})
    ref = tmp_path / "paper.csv"
    ref.write_text("model,defense,clean_acc,asr,ra,source\na,ibau,83.1,9.4,,paper\n")
    written = report.write(d, references=[str(ref)])
    md = (d / "report" / "report.md").read_text()
    s = json.loads((d / "report" / "report.json").read_text())
    assert math.isclose(s["tables"]["300"]["a"]["ibau"]["clean_acc"], 0.87)
    assert s["tables"]["300"]["a"]["ibau"]["seeds"] == 2
    assert "| a | 94.0 / 88.0 (12.0) | 87.0 / 7.0 (93.0) | 83.1 / 9.4 | 90.0 / 70.0 (30.0) |" in md
    assert "ibau [paper]" in md and "profile `full`" in md
    # no reference for model b: '–' in the reference column, 'missing' only for our cells not run
    assert "| b | missing | missing | – | missing |" in md
    # ft (40 s) is the floor, not one of the paper's baselines: fp (60 s) / ibau (10 s)
    assert s["runtime_ratio"]["fastest_baseline"] == "fp" and math.isclose(s["runtime_ratio"]["ratio"], 6.0)
    assert "(fp, 60.0 s) / I-BAU (ibau, 10.0 s) = 6.00x; / I-BAU's first round (5.0 s) = 12.00x" in md
    assert "`b__ibau__n300__s0`: zoo model 'b' is not trained yet" in md
    assert len(s["missing"]) == len(cells) - len(done)
    png = d / "report" / "clean_size_a.png"
    assert png in written and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_bad_inputs_exit_2_with_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('[models.a]\ndataset = "digits"\nattack = "badnets"\ntarget = 0\npoison_ratio = 0.1\n'
                   'train = { epochs = 1 }\n[defenses.nope]\n')
    assert main(["bench", str(bad), "--results", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown defense 'nope'" in err and "ibau" in err
    assert not (tmp_path / "r").exists()                      # checked before anything was written
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    assert "no manifest.json" in capsys.readouterr().err
    (tmp_path / "x.csv").write_text("a,b\n1,2\n")
    cfg = config.parse(raw())
    d, _ = records.open_results(tmp_path / "r2", cfg, grid.cells(cfg))
    assert main(["report", str(d), "--reference", str(tmp_path / "x.csv")]) == 2
    assert "needs a header" in capsys.readouterr().err
    assert issubclass(records.ResultsError, UserError) and issubclass(report.ReferenceError, UserError)


def test_a_cell_too_small_for_its_defense_fails_before_any_work(tmp_path, capsys):
    """clean-set size 100 with ft's batch of 128: one line, exit 2, before zoo training or any cell."""
    cfg = tmp_path / "small.toml"
    cfg.write_text('zoo = "' + str(tmp_path / "zoo") + '"\nn_clean = [300, 100]\n'
                   '[models.a]\ndataset = "digits"\nattack = "badnets"\ntarget = 0\npoison_ratio = 0.1\n'
                   'train = { epochs = 1 }\n[defenses.ibau]\nbatch_size = 50\n[defenses.ft]\n')
    assert main(["bench", str(cfg), "--results", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert "cell a__ft__n100__s0 cannot run: the clean set has 100 images, fewer than one batch of 128" in err, err
    assert "[defenses.ft]" in err
    assert not (tmp_path / "zoo").exists()                     # no zoo model was trained
    assert not list((tmp_path / "r").glob("records/*.json"))   # and no cell ran


@pytest.mark.parametrize("name", ["smoke", "cifar10_single", "gtsrb_single", "clean_size", "poison_ratio",
                                  "multi_target"])
@pytest.mark.parametrize("profile", ["full", "cpu"])
def test_every_ready_made_config_can_run_every_cell(name, profile):
    """Each shipped config parses and each of its cells passes its defense's clean-set-size check
    (clean_size.toml goes down to 100 images)."""
    from pathlib import Path

    from ibau_jax.bench import runner
    path = Path(__file__).resolve().parents[1] / "experiments" / "configs" / f"{name}.toml"
    cfg = config.load(path, profile=profile)
    cells = grid.cells(cfg)
    assert cells
    runner.preflight(cfg, cells)


def test_eval_every_is_read_and_checked():
    assert config.parse(raw()).eval_every == 1
    assert config.parse(raw(eval_every=5)).eval_every == 5
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ConfigError, match="eval_every must be an integer >= 1"):
            config.parse(raw(eval_every=bad))
