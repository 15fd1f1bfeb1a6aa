"""What each ``ibau-jax`` subcommand does with its parsed flags: validate, load, run, write.

Flags are validated here before anything is loaded or compiled (a bad value never costs a
run); the work itself is library code (``experiment``, ``defenses``, ``sweep``, ``training``,
``demo``); results go through ``results`` (strict JSON, atomic writes).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Any

from ..errors import ConfigError, UserError


# ----------------------------------------------------------------------------- validation

def _values(args: argparse.Namespace, name: str) -> list[Any]:
    """The values a flag was given (a list for nargs flags), without the unset ones."""
    v = getattr(args, name, None)
    return [x for x in (v if isinstance(v, list) else [v]) if x is not None]


def validate(args: argparse.Namespace) -> None:
    """Range and finiteness of every numeric flag, and the writability of every output, up front."""
    from .. import results

    flag = lambda name: "--" + name.replace("_", "-")  # noqa: E731
    for name, low in (("rounds", 1), ("limit_batches", 0), ("devices", 1), ("n_clean", 1), ("seed", 0),
                      ("K", 1), ("batch_size", 1), ("num_seeds", 1), ("chunk", 1), ("epochs", 1),
                      ("train_limit", 0), ("eval_every", 1), ("eval_limit", 0), ("target", 0), ("n_train", 1),
                      ("n_test", 1), ("ibau_batch_size", 1), ("train_batch_size", 1), ("num_processes", 1),
                      ("process_id", 0)):
        for v in _values(args, name):
            if v < low:
                raise ConfigError(f"{flag(name)} must be >= {low}, got {v}")
    for name in ("radius", "outer_lr", "fp_step", "lr", "dp_noise", "dp_clip"):
        for v in _values(args, name):
            if not math.isfinite(v) or v <= 0:
                raise ConfigError(f"{flag(name)} must be a finite number > 0, got {v}")
    for name in ("inner_reg", "weight_decay"):
        for v in _values(args, name):
            if not math.isfinite(v) or v < 0:
                raise ConfigError(f"{flag(name)} must be a finite number >= 0, got {v}")
    for name in ("poison_ratio", "portion"):
        for v in _values(args, name):
            if not (math.isfinite(v) and 0 < v <= 1):
                raise ConfigError(f"{flag(name)} must be in (0, 1], got {v}")
    if (getattr(args, "dp_noise", None) is None) != (getattr(args, "dp_clip", None) is None):
        given, missing = ("--dp-noise", "--dp-clip") if args.dp_clip is None else ("--dp-clip", "--dp-noise")
        raise ConfigError(f"{given} needs {missing} too: DP-SGD takes both the noise multiplier and the "
                          "clipping norm (e.g. --dp-noise 1.0 --dp-clip 1.0), or neither")
    if getattr(args, "attack_option", None) and getattr(args, "attack", None) is not None:
        from .. import attacks
        attacks.parse_options(args.attack, args.attack_option)  # AttackError (exit 2) before any work
    save = getattr(args, "save", None)
    if save:
        if not str(save).endswith(".npz"):
            raise ConfigError("--save writes an ibau-jax checkpoint; give it a .npz name")
        results.check_writable(save, "--save")
    if getattr(args, "command", None) in ("defend", "unlearn", "sweep"):
        results.check_writable(args.out, "--out")
    if getattr(args, "command", None) == "attack":  # a run directory
        results.check_writable(Path(args.out) / "run.json", "--out")


# ----------------------------------------------------------------------------- loading

def resolve_run_dir(args: argparse.Namespace) -> int:
    """``--model RUN_DIR`` (from ``ibau-jax attack``): fill checkpoint/model/attack/target from it.

    Explicit ``--attack``/``--target`` still win. Returns the seed of the attack's trigger (the
    run's ``trigger_seed``, which seeded Blend's noise or WaNet's warp; 0 for a plain checkpoint).
    Sets ``args.attack_options``: the run's attack options (when its attack is the one used),
    then ``--attack-option``'s, typed and checked (``attacks.parse_options``).
    """
    from .. import attacks, models, training

    seed = 0
    run_options: dict[str, Any] = {}
    if args.model not in models.MODELS:
        if not Path(args.model).exists():
            raise UserError(f"--model {args.model!r} is neither an architecture ({', '.join(sorted(models.MODELS))}) "
                            "nor a run directory written by `ibau-jax attack`")
        run_dir = Path(args.model)
        # The latest committed epoch: its record and, inside the same checkpoint step, its weights
        # (never the RUN_DIR/model.npz export, which an interruption can leave one epoch behind).
        run = training.read_run(run_dir)
        cfg = run["config"]
        if args.checkpoint is None:
            args.checkpoint = run["checkpoint"]
        args.model = cfg.get("model", "small_vgg")
        args.attack = args.attack if args.attack is not None else cfg.get("attack", "badnets")
        if args.attack == cfg.get("attack"):
            run_options = dict(cfg.get("attack_options") or {})
        args.target = args.target if args.target is not None else cfg.get("target", 0)
        seed = int(cfg.get("trigger_seed", cfg.get("seed", 0)))
    if args.checkpoint is None:
        raise UserError("pass --checkpoint FILE, or --model RUN_DIR (a folder written by `ibau-jax attack`)")
    args.attack = args.attack if args.attack is not None else "badnets"
    args.target = args.target if args.target is not None else 8
    args.attack_options = {**attacks.parse_options(args.attack, run_options),
                           **attacks.parse_options(args.attack, getattr(args, "attack_option", None) or [])}
    return seed


def load_experiment(args: argparse.Namespace):
    """``experiment.load`` with the common flags (``--model RUN_DIR`` resolved first), measured
    on the first ``--eval-limit`` images when that is set."""
    from .. import experiment

    attack_seed = resolve_run_dir(args)
    exp = experiment.load(args.checkpoint, dataset=args.dataset, data_dir=args.data_dir, model=args.model,
                          attack=args.attack, target=args.target, trigger_dir=args.trigger_dir,
                          n_clean=args.n_clean, download=not args.no_download,
                          data_source=getattr(args, "data_source", "auto"), attack_seed=attack_seed,
                          attack_options=args.attack_options)
    return exp.limit_eval(args.eval_limit)


def _fmt(m: dict[str, Any]) -> str:
    f = lambda v: "–" if v is None else f"{v:.4f}"
    return (f"clean_acc {f(m['clean_acc'])}  asr_all {f(m['asr_all'])}  asr_nontarget {f(m['asr_nontarget'])}"
            f"  robust_acc {f(m.get('robust_acc'))}")


# ----------------------------------------------------------------------------- defend / unlearn

def unlearn_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """``unlearn``'s flags as overrides of the I-BAU defense's config."""
    o: dict[str, Any] = {"rounds": args.rounds, "K": args.K, "solver": args.solver, "batch_size": args.batch_size,
                         "max_batches": args.limit_batches, "mask_rng": args.mask_rng}
    if args.preset == "defense_py" or args.no_projection:
        o["radius"] = None
    if args.radius is not None and not args.no_projection:
        o["radius"] = args.radius
    if args.outer_lr is not None:
        o["outer_lr"] = args.outer_lr
    return o


def cmd_defend(args: argparse.Namespace) -> int:
    from .. import defenses, distributed

    # Everything the user typed is checked before jax does any work.
    name = args.defense if args.command == "defend" else "ibau"
    overrides = defenses.parse_overrides(name, args.set) if args.command == "defend" else unlearn_overrides(args)
    defense = defenses.get(name, **overrides)
    defense.check_size(args.n_clean)
    distributed.init_distributed(args.coordinator, args.num_processes, args.process_id)
    return run_defense(args, defense)


def run_defense(args: argparse.Namespace, defense, exp=None) -> int:
    """Run ``defense`` on ``exp`` (default: ``load_experiment(args)``), writing ``args.out`` after
    every round; 130 when interrupted. ``ibau-jax bench`` runs each of its cells through here."""
    import jax
    from tqdm import tqdm

    from .. import checkpoints, interrupt, metrics, results, sharding
    from ..defenses import CleanSet

    mesh = sharding.mesh_for(args.devices)
    exp = load_experiment(args) if exp is None else exp
    writer = jax.process_index() == 0  # multi-host: every process computes the same; one writes
    evaluate = lambda v: exp.evaluate(v, mesh)
    out = Path(args.out)
    result: dict[str, Any] = {
        "defense": defense.name, "config": dataclasses.asdict(defense.config),
        "run": {"checkpoint": str(args.checkpoint), "model": args.model, "dataset": args.dataset,
                "attack": args.attack, "attack_options": args.attack_options, "target": exp.target,
                "seed": args.seed, "n_clean": args.n_clean, "eval_limit": args.eval_limit,
                "jax_backend": jax.default_backend(), "devices": sharding.num_devices(mesh),
                "processes": jax.process_count(), "command": args.command},
        "before": evaluate(exp.variables), "after": None, "der": None, "history": [],
        "seconds": None, "compile_seconds": None, "complete": False, "interrupted": False}
    print(f"before    {_fmt(result['before'])}", flush=True)
    if writer:
        results.save(out, result)

    clean = CleanSet(exp.clean_x, exp.clean_y, exp.num_classes)
    total = defense.num_steps(clean) if hasattr(defense, "num_steps") else None
    bar = tqdm(total=total, unit="step", desc=defense.name, dynamic_ncols=True, disable=args.quiet or not writer)
    if hasattr(defense, "on_step") and not bar.disable:
        # a host callback from inside the compiled loop: only when a bar is shown
        defense.on_step = lambda *_: bar.update(1)

    every, last_evaluated = args.eval_every, 0

    def callback(r: int, variables, record: dict) -> dict | None:
        nonlocal last_evaluated
        if r % every:  # not this round: the record is kept, the evaluation (10k images on CPU) skipped
            result["history"].append(dict(record))
            return None
        m = evaluate(variables)
        last_evaluated = r
        result["history"].append({**record, **m})
        result["after"] = m
        result["der"] = metrics.der(result["before"], m)
        if writer:
            bar.write(f"round {r:<3} {_fmt(m)}  ({record['seconds']:.1f} s)")
            results.save(out, result)
        return m

    try:
        with interrupt.graceful():
            res = defense.run(exp.model, exp.variables, clean, jax.random.PRNGKey(args.seed), mesh=mesh,
                              callback=callback)
    except interrupt.Interrupted:
        bar.close()
        result["interrupted"] = True
        if writer:
            results.save(out, result)
        done = len(result["history"])
        print(f"interrupted after {done} round(s); {out} holds them, marked \"interrupted\": true",
              file=sys.stderr)
        return 130
    bar.close()
    result.update(history=res.history, seconds=round(res.seconds, 3), compile_seconds=round(res.compile_seconds, 3),
                  diagnostics=res.diagnostics, complete=True)
    if res.flagged_classes is not None:
        result.update(flagged_classes=res.flagged_classes, class_scores=res.class_scores)
    if result["after"] is None or last_evaluated != len(res.history):
        # a defense without rounds, or a last round that --eval-every skipped: evaluate the result
        result["after"] = evaluate(res.variables)
        result["der"] = metrics.der(result["before"], result["after"])
    if not writer:
        return 0
    results.save(out, result)
    print(f"after     {_fmt(result['after'])}  DER {result['der']:.4f}  "
          f"({result['seconds']:.1f} s + {result['compile_seconds']:.1f} s compiling)")
    if args.save:
        checkpoints.save_checkpoint(args.save, res.variables,
                                    {"model": args.model, "num_classes": exp.num_classes, "attack": args.attack,
                                     "target": exp.target, "defended_with": defense.name,
                                     "source_checkpoint": str(args.checkpoint)})
        print(f"saved the defended model to {args.save}")
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


# ----------------------------------------------------------------------------- evaluate / sweep

def cmd_evaluate(args: argparse.Namespace) -> int:
    from .. import results

    exp = load_experiment(args)
    print(json.dumps(results.strict(exp.evaluate(exp.variables, per_class=args.per_class))))
    return 0


def _parse_grid(name: str, pairs: list[str]) -> dict[str, list[Any]]:
    """``["field=v1,v2", ...]`` -> ``{field: [typed values]}`` for defense ``name``'s config."""
    from .. import defenses
    from ..defenses.base import parse_value

    cls = defenses.defense_class(name)
    grid: dict[str, list[Any]] = {}
    for pair in pairs:
        field, sep, values = pair.partition("=")
        if not sep or not values.strip():
            raise ConfigError(f"--grid {pair!r}: expected FIELD=V1,V2,...")
        grid[field.strip()] = [parse_value(cls.Config, field.strip(), v) for v in values.split(",")]
    return grid


def _sweep_defense(args: argparse.Namespace) -> int:
    """A defense other than I-BAU: one ``run`` per (setting, seed), ``sweep.sweep_defense``."""
    from .. import defenses, distributed

    ibau_flags = [f for f in ("outer_lr", "fp_step", "inner_reg", "radius") if getattr(args, f)]
    if ibau_flags or args.K != [5] or args.limit_batches:
        raise ConfigError(f"--K/--outer-lr/--fp-step/--inner-reg/--radius/--limit-batches sweep I-BAU; for "
                          f"--defense {args.defense} give its config fields with --grid FIELD=V1,V2 and --set")
    base = defenses.parse_overrides(args.defense, args.set)
    grid = _parse_grid(args.defense, args.grid)
    from .. import sweep
    for st in sweep.grid_settings(grid) or [{}]:  # every setting's config checked before any data loads
        defenses.get(args.defense, **{**base, **st}).check_size(args.n_clean)
    distributed.init_distributed(args.coordinator, args.num_processes, args.process_id)

    import time

    import jax

    from .. import results, sharding
    from ..defenses import CleanSet

    exp = load_experiment(args)
    seeds = list(range(args.seed, args.seed + args.num_seeds))
    mesh = sharding.mesh_for(args.devices)
    clean = CleanSet(exp.clean_x, exp.clean_y, exp.num_classes)
    t0 = time.perf_counter()

    def run_one(defense, seed: int) -> dict[str, float]:
        res = defense.run(exp.model, exp.variables, clean, jax.random.PRNGKey(seed), mesh=mesh)
        return exp.evaluate(res.variables, mesh)

    done = lambda k, n: print(f"[{k}/{n} runs] {time.perf_counter() - t0:.1f} s", flush=True)
    records = sweep.sweep_defense(args.defense, base, grid, seeds, run_one, on_run=done)
    result = {"config": {"defense": args.defense, "checkpoint": str(args.checkpoint), "model": args.model,
                         "dataset": args.dataset, "attack": args.attack, "attack_options": args.attack_options,
                         "target": exp.target, "seeds": seeds, "n_clean": args.n_clean,
                         "eval_limit": args.eval_limit, "overrides": base,
                         "devices": sharding.num_devices(mesh), "processes": jax.process_count(),
                         "jax_backend": jax.default_backend(),
                         "seconds": round(time.perf_counter() - t0, 3)},
              "before": exp.evaluate(exp.variables, mesh), "swept": sorted(grid), "records": records}
    table = sweep.sweep_markdown(result)
    print(table, end="")
    if jax.process_index() == 0:
        out = Path(args.out)
        results.write_atomic(out, results.dumps(result))
        results.write_atomic(out.with_suffix(".md"), table)
        print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    """Seeds x hyperparameter grid; I-BAU vmapped in chunks (``sweep.sweep_rounds``), any other
    defense one run per (setting, seed) (``sweep.sweep_defense``); mean ± std table."""
    from .. import defenses, distributed

    if args.defense != "ibau":
        return _sweep_defense(args)
    if args.grid or args.set:
        raise ConfigError("--grid/--set sweep other defenses; for ibau use --K, --outer-lr, --fp-step, "
                          "--inner-reg, --radius")

    config = defenses.get("ibau", batch_size=args.batch_size, solver=args.solver, mask_rng=args.mask_rng,
                          max_batches=args.limit_batches,
                          **({"radius": None} if args.preset == "defense_py" else {})).config
    grid: dict[str, list[Any]] = {"K": args.K}
    for flag in ("outer_lr", "fp_step", "inner_reg", "radius"):
        if getattr(args, flag):
            grid[flag] = getattr(args, flag)
    if "radius" in grid and config.radius is None:
        raise ConfigError("--radius needs the projection on: use --preset faithful")
    distributed.init_distributed(args.coordinator, args.num_processes, args.process_id)

    import time

    import jax

    from .. import results, sharding, sweep
    from ..defenses import ibau

    exp = load_experiment(args)
    seeds = list(range(args.seed, args.seed + args.num_seeds))
    mesh = sharding.mesh_for(args.devices)
    xb, yb, _, _ = ibau.prepare_batches(exp.clean_x, exp.clean_y, config)
    evaluate = lambda v: exp.evaluate(v, mesh)
    t0 = time.perf_counter()
    done = lambda k, n: print(f"[{k}/{n} runs of this K] {time.perf_counter() - t0:.1f} s", flush=True)
    records = sweep.sweep_rounds(exp.model, config, exp.variables, xb, yb, seeds=seeds, grid=grid,
                                 rounds=args.rounds, chunk=args.chunk, evaluate_fn=evaluate, mesh=mesh,
                                 on_chunk=done, strategy=args.strategy, mask_rng=args.mask_rng)
    result = {"config": {"checkpoint": str(args.checkpoint), "model": args.model, "dataset": args.dataset,
                         "defense": "ibau", "attack": args.attack, "attack_options": args.attack_options,
                         "target": exp.target, "rounds": args.rounds,
                         "seeds": seeds,
                         "mask_rng": args.mask_rng, "chunk": args.chunk, "strategy": args.strategy,
                         "n_clean": args.n_clean, "eval_limit": args.eval_limit,
                         "num_batches": int(xb.shape[0]), "preset": args.preset,
                         "ibau": dataclasses.asdict(config), "devices": sharding.num_devices(mesh),
                         "processes": jax.process_count(), "jax_backend": jax.default_backend(),
                         "seconds": round(time.perf_counter() - t0, 3)},
              "before": evaluate(exp.variables), "swept": sorted(grid, key=lambda k: (k != "K", k)),
              "records": records}
    table = sweep.sweep_markdown(result)
    print(table, end="")
    if jax.process_index() == 0:  # multi-host: every process computed the same table; one writes
        out = Path(args.out)
        results.write_atomic(out, results.dumps(result))
        results.write_atomic(out.with_suffix(".md"), table)
        print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


# ----------------------------------------------------------------------------- attack / demo

def cmd_attack(args: argparse.Namespace) -> int:
    """Train a poisoned model (``training.train``) and write RUN_DIR (one checkpoint step per epoch
    under checkpoints/, plus the model.npz and run.json exports)."""
    from .. import attacks, data, experiment, interrupt, models, rng, training

    streams = rng.streams(args.seed)  # independent streams: trigger pattern, poison choice, init, epochs
    if args.dataset == "cifar10":
        train_set = data.load_cifar10(args.data_dir, split="train", source=getattr(args, "data_source", "auto"),
                                      download=not args.no_download)
    else:
        if args.data_dir is None:
            raise UserError("training on GTSRB needs --data-dir: a folder with the official archive "
                            "(Final_Training/Images/000NN/*.ppm) or train_roi32.npz")
        train_set = data.load_gtsrb(args.data_dir, split="train")
    test = experiment.load_test_set(args.dataset, args.data_dir, download=not args.no_download,
                                    source=getattr(args, "data_source", "auto"))
    x, y = train_set.x, train_set.y
    if args.train_limit:
        x, y = x[: args.train_limit], y[: args.train_limit]
    options = attacks.parse_options(args.attack, getattr(args, "attack_option", None) or [])
    attack = attacks.make_attack(args.attack, num_classes=test.num_classes, target=args.target,
                                 trigger_dir=args.trigger_dir, seed=streams.seed_of("trigger"), **options)
    poisoned = attacks.poison_dataset(data.to_float(x), y, attack, args.poison_ratio, streams.seed_of("poison"))
    test_x = data.to_float(test.x)
    asr_x, asr_t, _ = attacks.asr_test_set(test_x, test.y, attack)
    eval_sets = training.EvalSets(test_x, test.y, asr_x, asr_t, attacks.asr_true_labels(test.y, attack))
    lr = args.lr if args.lr is not None else (0.05 if args.optimizer == "sgd" else 1e-3)
    config = training.TrainConfig(epochs=args.epochs, batch_size=args.batch_size, optimizer=args.optimizer, lr=lr,
                                  weight_decay=args.weight_decay, flip=args.dataset != "gtsrb", seed=args.seed,
                                  eval_every=args.eval_every, dp_noise=args.dp_noise, dp_clip=args.dp_clip)
    run_config = {"dataset": args.dataset, "attack": args.attack, "target": attack.target,
                  "poison_ratio": args.poison_ratio, "model": args.model, "train_limit": args.train_limit,
                  "n_train": int(len(y)), "trigger_seed": streams.seed_of("trigger")}
    if options:  # only when given: runs without options keep the run.json of earlier versions (--resume)
        run_config["attack_options"] = options
    meta = {"model": args.model, "num_classes": test.num_classes, "dataset": args.dataset,
            "attack": args.attack, "target": attack.target, "poison_ratio": args.poison_ratio}
    model = models.get_model(args.model, test.num_classes)
    try:
        with interrupt.graceful("stopping after the epoch in progress (Ctrl-C again to abandon it now)"):
            _, history = training.train(model, poisoned.x, poisoned.y, config, eval_sets=eval_sets,
                                        run_dir=args.out, run_config=run_config, meta=meta, resume=args.resume,
                                        quiet=args.quiet)
    except interrupt.Interrupted:
        print(f"interrupted: {args.out} holds every finished epoch; continue with the same flags and --resume",
              file=sys.stderr)
        return 130
    last = history[-1]
    if "clean_acc" in last:
        print(f"final     {_fmt(last)}")
    print(f"wrote {args.out}/run.json and {args.out}/model.npz")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Self-contained demo: poison -> train -> I-BAU -> report (``ibau_jax.demo``)."""
    from .. import demo

    fields = {f.name for f in dataclasses.fields(demo.DemoConfig)}
    demo.run_demo(demo.DemoConfig(**{k: v for k, v in vars(args).items() if k in fields}))
    return 0


# ----------------------------------------------------------------------------- bench / report

def cmd_bench(args: argparse.Namespace) -> int:
    """A benchmark config's grid of defense runs into a resumable results directory (``bench``)."""
    from ..bench import config as bench_config, runner

    cfg = bench_config.load(args.config, profile=args.profile, only_models=args.models,
                            only_defenses=args.defenses)
    if args.zoo:
        cfg = dataclasses.replace(cfg, zoo=args.zoo)
    try:
        return runner.run(cfg, args.results, commands=sys.modules[__name__], train=not args.no_train,
                          quiet=args.quiet)
    except KeyboardInterrupt:
        print(f"interrupted: {args.results} holds every finished cell; rerun the same command to continue",
              file=sys.stderr)
        return 130


def cmd_report(args: argparse.Namespace) -> int:
    """Tables and plots of a results directory, from its records alone (``bench.report``)."""
    from ..bench import report

    written = report.write(args.results_dir, out=args.out, references=args.reference)
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


COMMANDS = {"defend": cmd_defend, "unlearn": cmd_defend, "evaluate": cmd_evaluate, "sweep": cmd_sweep,
            "attack": cmd_attack, "demo": cmd_demo, "bench": cmd_bench, "report": cmd_report}
