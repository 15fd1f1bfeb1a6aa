"""Run a benchmark's cells: the zoo models first, then every unfinished cell, one record each.

Each cell goes through the same code as ``ibau-jax defend`` (the command layer's
``run_defense``, handed in as ``commands`` so that this package never imports the CLI; its
printout kept in ``RESULTS/work/CELL.log``); its record is written atomically once the cell
is finished, so a rerun skips it, and Ctrl-C (or a kill) loses only the cell in progress.
A progress bar over cells shows the ETA.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path
from typing import Any, Callable, Protocol

from .. import defenses
from ..errors import ConfigError
from . import grid, records, zoo
from .config import BenchConfig, ModelSpec


class Commands(Protocol):
    """What a benchmark needs from the command layer (``ibau_jax.cli.commands`` is one): the
    ``defend`` run of a cell, its data, and ``attack``'s training for zoo models."""

    def run_defense(self, args: argparse.Namespace, defense: Any, exp: Any = None) -> int: ...
    def load_experiment(self, args: argparse.Namespace) -> Any: ...
    def resolve_run_dir(self, args: argparse.Namespace) -> int: ...
    def validate(self, args: argparse.Namespace) -> None: ...
    def cmd_attack(self, args: argparse.Namespace) -> int: ...


def cell_args(spec: ModelSpec, entry: zoo.ZooModel, cell: grid.Cell, out: Path,
              eval_every: int = 1) -> argparse.Namespace:
    """The ``defend`` flags of ``cell`` (what ``run_defense`` and ``load_experiment`` read)."""
    a = argparse.Namespace(command="bench", dataset=spec.dataset, data_dir=spec.data_dir, trigger_dir=spec.trigger_dir,
                           attack=spec.attack, attack_option=spec.attack_options, target=spec.target,
                           n_clean=cell.n_clean, no_download=True, data_source="auto", seed=cell.seed, out=str(out),
                           save=None, quiet=True, devices=None, eval_every=eval_every, eval_limit=0)
    if entry.run_dir is not None and spec.dataset != "digits":
        a.model, a.checkpoint = str(entry.run_dir), None   # resolved like `defend --model RUN_DIR`
    else:
        a.model, a.checkpoint = spec.arch, str(entry.checkpoint) if entry.checkpoint else None
    return a


def digits_experiment(spec: ModelSpec, entry: zoo.ZooModel, n_clean: int):
    """A digits cell's ``experiment.Experiment``: clean set = the first ``n_clean`` images of the
    digits clean pool, accuracy on the digits test set, ASR on triggered copies of the clean set
    (the original split's rule), the trigger seeded as it was in training."""
    from .. import attacks, checkpoints, experiment, models, training

    run = training.read_run(entry.run_dir)
    d = zoo.digits_data()
    variables, _ = checkpoints.load_model(run["checkpoint"], spec.arch, d.num_classes)
    attack = attacks.make_attack(spec.attack, num_classes=d.num_classes, target=spec.target,
                                 seed=int(run["config"]["trigger_seed"]), **run["config"].get("attack_options", {}))
    cx, cy = d.clean_x[:n_clean], d.clean_y[:n_clean]
    asr_x, asr_t, _ = attacks.asr_test_set(cx, cy, attack)
    exp = experiment.Experiment(models.get_model(spec.arch, d.num_classes), variables, d.num_classes, attack.target,
                                cx, cy, d.test_x, d.test_y, asr_x, asr_t, attacks.asr_true_labels(cy, attack))
    return exp, run["checkpoint"]


class _Experiments:
    """Loaded experiments by (model, n_clean): a model's data is read once for all its defenses."""

    def __init__(self, commands: Commands):
        self.cache: dict[tuple[str, int], Any] = {}
        self.commands = commands

    def get(self, spec: ModelSpec, entry: zoo.ZooModel, cell: grid.Cell, args: argparse.Namespace):
        commands = self.commands
        key = (spec.name, cell.n_clean)
        if spec.dataset == "digits":
            if key not in self.cache:
                self.cache = {key: digits_experiment(spec, entry, cell.n_clean)}
            exp, args.checkpoint = self.cache[key]
            args.attack_options = dict(spec.attack_options)  # what the digits model was trained with
            return exp
        if key not in self.cache:
            self.cache = {key: commands.load_experiment(args)}  # one at a time: CIFAR-10 sets are large
        else:
            commands.resolve_run_dir(args)
        return self.cache[key]


def run_cell(config: BenchConfig, cell: grid.Cell, entry: zoo.ZooModel, results_dir: Path,
             experiments: _Experiments) -> dict[str, Any] | None:
    """Run one cell; its record, or None when interrupted (Ctrl-C)."""
    commands = experiments.commands
    spec, dspec = config.model(cell.model), config.defense(cell.defense)
    work = results_dir / records.WORK
    work.mkdir(exist_ok=True)
    out = work / f"{cell.id}.json"
    args = cell_args(spec, entry, cell, out, config.eval_every)
    defense = defenses.get(dspec.defense, **dspec.overrides)
    t0 = time.perf_counter()
    with open(work / f"{cell.id}.log", "w", encoding="utf-8") as log, contextlib.redirect_stdout(log):
        exp = experiments.get(spec, entry, cell, args)
        rc = commands.run_defense(args, defense, exp=exp)
    wall = time.perf_counter() - t0
    if rc == 130:
        return None
    res = json.loads(out.read_text(encoding="utf-8"))
    after = res["after"] or {}
    rec = {"format": records.FORMAT, "cell": cell.id, "config_name": config.name, "fingerprint": config.fingerprint,
           "profile": config.profile, "n_clean": cell.n_clean, "seed": cell.seed,
           "model": {"name": spec.name, "spec": zoo.spec_dict(spec), "zoo": entry.record},
           "defense": {"label": dspec.label, "name": dspec.defense, "overrides": dspec.overrides,
                       "config": res["config"]},
           "run": res["run"], "before": res["before"], "after": res["after"], "der": res["der"],
           "ra": after.get("robust_acc"), "history": res["history"], "seconds": res["seconds"],
           "compile_seconds": res["compile_seconds"], "wall_seconds": round(wall, 3),
           "diagnostics": res.get("diagnostics"), "machine": records.machine(), "versions": records.versions()}
    for k in ("flagged_classes", "class_scores"):
        if k in res:
            rec[k] = res[k]
    return rec


def preflight(config: BenchConfig, cells: list[grid.Cell]) -> None:
    """Check every cell's defense against its clean-set size before the first cell runs, so a
    setting that cannot run (a batch larger than the clean set) never costs the cells before it."""
    for cell in cells:
        dspec = config.defense(cell.defense)
        try:
            defenses.get(dspec.defense, **dspec.overrides).check_size(cell.n_clean)
        except ConfigError as e:
            raise ConfigError(f"cell {cell.id} cannot run: {e} (in [defenses.{dspec.label}] of the "
                              f"config; nothing was run)") from None


def _compilation_cache(path: Path) -> None:
    """Keep compiled programs on disk (unless the user chose a cache): every cell of a model
    runs the same programs, and a resumed run compiles nothing again."""
    import os

    import jax

    if not os.environ.get("JAX_COMPILATION_CACHE_DIR") and not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", str(path))


def run(config: BenchConfig, results_dir: str | Path, *, commands: Commands, train: bool = True,
        quiet: bool = False, log: Callable[[str], None] = print) -> int:
    """Run every unfinished (selected) cell of ``config`` into ``results_dir``; 0, or 130 when
    interrupted. ``commands``: the command layer (``ibau_jax.cli.commands``). Cells whose zoo
    model is not trained (``train=False``) or whose defense diverged are listed in
    ``RESULTS/status.json`` (the report names them)."""
    from tqdm import tqdm

    from ..defenses import DivergenceError

    all_cells = grid.cells(config)
    d, done = records.open_results(results_dir, config, all_cells)
    _compilation_cache(d / records.WORK / "xla_cache")
    todo = [c for c in grid.cells(config, selected=True) if c.id not in done]
    preflight(config, todo)   # before any zoo training or cell
    status = {k: v for k, v in records.read_status(d).items() if k not in {c.id for c in todo}}
    entries: dict[str, zoo.ZooModel] = {}
    for name in dict.fromkeys(c.model for c in todo):
        spec = config.model(name)
        entry = zoo.lookup(config.zoo, spec)
        if entry is None and (train or spec.kind == "import"):
            entry = zoo.ensure(config.zoo, spec, quiet=quiet, log=log, commands=commands)
        if entry is None:
            for c in todo:
                if c.model == name:
                    status[c.id] = (f"zoo model {name!r} is not trained yet ({config.zoo}/{name}); "
                                    "run without --no-train to train it")
        else:
            entries[name] = entry
    runnable = [c for c in todo if c.model in entries]
    records.write_status(d, status)
    log(f"{config.name} (profile {config.profile}): {len(all_cells)} cells, {len(done)} finished, "
        f"{len(runnable)} to run"
        + (f", {len(todo) - len(runnable)} waiting for zoo models" if len(todo) > len(runnable) else ""))
    experiments = _Experiments(commands)
    bar = tqdm(total=len(done) + len(runnable), initial=len(done), unit="cell", desc=config.name,
               dynamic_ncols=True, disable=quiet)
    try:
        for cell in runnable:
            bar.set_postfix_str(cell.id)
            try:
                rec = run_cell(config, cell, entries[cell.model], d, experiments)
            except DivergenceError as e:
                status[cell.id] = f"diverged: {e}"
                records.write_status(d, status)
                bar.write(f"{cell.id}: diverged ({e}); listed in {d / records.STATUS}")
                continue
            if rec is None:
                bar.write(f"interrupted: {cell.id} was not finished; rerun the same command to continue")
                return 130
            records.write_record(d, rec)
            bar.write(f"{cell.id}: ACC {rec['after']['clean_acc']:.4f}  ASR {rec['after']['asr_all']:.4f}  "
                      f"({rec['seconds']:.1f} s + {rec['compile_seconds']:.1f} s compiling)")
            bar.update(1)
    finally:
        bar.close()
    log(f"wrote {d}; tables: ibau-jax report {d}")
    return 0
