"""Command line: ``ibau-jax unlearn``, ``evaluate``, ``sweep``, ``attack`` (train a poisoned model) and ``demo``.

    ibau-jax unlearn --checkpoint badnets_8_02_ckpt.pth --dataset cifar10 --data-dir DIR \\
        --trigger-dir DIR --attack badnets --target 8 --rounds 1 --out result.json

``unlearn`` prints clean accuracy and both ASR conventions before and after every round
with the round's seconds, shows a progress bar over the outer steps, and rewrites
RESULT.json (plus RESULT.md, a markdown table) atomically after every round, so an
interrupted run keeps every finished round.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .. import experiment
from ..experiment import DATASETS, Experiment, load_test_set


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


# ----------------------------------------------------------------------------- output files

def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temp file in the same folder and ``os.replace``."""
    from ..checkpoints import atomic_write

    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def markdown_table(result: dict[str, Any]) -> str:
    """The result's per-round figures as a markdown table."""
    c = result["config"]
    lines = [f"# I-BAU: {c['attack']} (target {c['target']}) on {c['dataset']}, "
             f"solver {c['ibau']['solver']} K={c['ibau']['K']}, seed {c['seed']}", "",
             "| round | clean acc | ASR (all) | ASR (non-target) | seconds |",
             "|---|---|---|---|---|"]
    b = result["before"]
    lines.append(f"| before | {b['clean_acc']:.4f} | {b['asr_all']:.4f} | {b['asr_nontarget']:.4f} | |")
    for r in result["rounds"]:
        lines.append(f"| {r['round']} | {r['clean_acc']:.4f} | {r['asr_all']:.4f} | "
                     f"{r['asr_nontarget']:.4f} | {r['seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def save_result(out: Path, result: dict[str, Any]) -> None:
    write_atomic(out, json.dumps(result, indent=2) + "\n")
    write_atomic(out.with_suffix(".md"), markdown_table(result))


# ----------------------------------------------------------------------------- loading

def resolve_run_dir(args: argparse.Namespace) -> int:
    """``--model RUN_DIR`` (from ``ibau-jax attack``): fill checkpoint/model/attack/target from it.

    Explicit ``--attack``/``--target`` still win. Returns the attack's seed (the run's, else 0).
    """
    from .. import models, train

    seed = 0
    if args.model not in models.MODELS:
        if not Path(args.model).exists():
            raise CLIError(f"--model {args.model!r} is neither an architecture ({', '.join(sorted(models.MODELS))}) "
                           "nor a run directory written by `ibau-jax attack`")
        run_dir = Path(args.model)
        run = train.read_run(run_dir)
        cfg = run["config"]
        if args.checkpoint is None:
            args.checkpoint = str(run_dir / train.MODEL_NPZ)
        args.model = cfg.get("model", "small_vgg")
        args.attack = args.attack if args.attack is not None else cfg.get("attack", "badnets")
        args.target = args.target if args.target is not None else cfg.get("target", 0)
        seed = int(cfg.get("seed", 0))
    if args.checkpoint is None:
        raise CLIError("pass --checkpoint FILE, or --model RUN_DIR (a folder written by `ibau-jax attack`)")
    args.attack = args.attack if args.attack is not None else "badnets"
    args.target = args.target if args.target is not None else 8
    return seed


def load_experiment(args: argparse.Namespace) -> Experiment:
    """``experiment.load`` with the common flags (``--model RUN_DIR`` resolved first)."""
    attack_seed = resolve_run_dir(args)
    return experiment.load(args.checkpoint, dataset=args.dataset, data_dir=args.data_dir, model=args.model,
                           attack=args.attack, target=args.target, trigger_dir=args.trigger_dir,
                           n_clean=args.n_clean, download=not args.no_download,
                           data_source=getattr(args, "data_source", "auto"), attack_seed=attack_seed)


def _fmt(m: dict[str, float]) -> str:
    return f"clean_acc {m['clean_acc']:.4f}  asr_all {m['asr_all']:.4f}  asr_nontarget {m['asr_nontarget']:.4f}"


# ----------------------------------------------------------------------------- commands

def cmd_unlearn(args: argparse.Namespace) -> int:
    from .. import parallel

    # Multi-host: join before any other JAX work (flags or IBAU_* env vars; no-op when absent).
    parallel.init_distributed(args.coordinator, args.num_processes, args.process_id)
    import jax
    from tqdm import tqdm

    from .. import checkpoints
    from ..defenses import ibau

    exp = load_experiment(args)
    model, variables, target = exp.model, exp.variables, exp.target
    overrides: dict[str, Any] = {"K": args.K, "solver": args.solver, "batch_size": args.batch_size}
    if args.no_projection:
        overrides["radius"] = None
    elif args.radius is not None:
        overrides["radius"] = args.radius
    if args.outer_lr is not None:
        overrides["outer_lr"] = args.outer_lr
    preset = {"faithful": ibau.IBAUConfig.faithful, "defense_py": ibau.IBAUConfig.defense_py}[args.preset]
    config = preset(**overrides)

    xb, yb = exp.batches(config.batch_size, args.limit_batches)
    mesh = parallel.cli_mesh(args.devices)
    writer = jax.process_index() == 0  # multi-host: every process computes the same; one writes
    evaluate = lambda v: exp.evaluate(v, mesh)
    result: dict[str, Any] = {
        "config": {"checkpoint": str(args.checkpoint), "model": args.model, "dataset": args.dataset,
                   "attack": args.attack, "target": target, "rounds": args.rounds, "seed": args.seed,
                   "mask_rng": args.mask_rng, "n_clean": args.n_clean, "num_batches": int(xb.shape[0]), "preset": args.preset,
                   "ibau": dataclasses.asdict(config), "jax_backend": jax.default_backend(),
                   "devices": mesh.size if mesh is not None else 1, "processes": jax.process_count()},
        "before": evaluate(variables), "rounds": []}
    print(f"before    {_fmt(result['before'])}", flush=True)
    out = Path(args.out)
    if writer:
        save_result(out, result)

    bar = tqdm(total=args.rounds * xb.shape[0], unit="step", desc="unlearning", dynamic_ncols=True,
               disable=args.quiet or not writer)
    on_step = lambda loss: bar.update(1)
    round_fn = (parallel.make_sharded_round(model, config, mesh, on_step) if mesh is not None
                else ibau.make_round(model, config, on_step=on_step))
    params, batch_stats = variables["params"], variables["batch_stats"]
    opt_state = config.outer_tx().init(params)
    all_masks = ibau.seed_masks(args.seed, args.rounds, xb.shape[0], config, args.mask_rng)
    for r in range(1, args.rounds + 1):
        masks = all_masks[r - 1]
        bar.set_postfix_str(f"round {r}/{args.rounds}" + (" (compiling)" if r == 1 else ""))
        t0 = time.perf_counter()
        outp = jax.block_until_ready(round_fn(params, batch_stats, opt_state, xb, yb, masks))
        seconds = time.perf_counter() - t0
        params, opt_state = outp.params, outp.opt_state
        if mesh is not None:  # replicated global arrays -> this process's copy
            params, opt_state = parallel.to_host((params, opt_state))
        if not all(bool(np.isfinite(np.asarray(a)).all()) for a in jax.tree.leaves(params)):
            raise CLIError(f"round {r} produced non-finite parameters (the solver diverged); "
                           f"lower --outer-lr, or use --solver normal_cg / gmres / dense")
        m = evaluate({"params": params, "batch_stats": batch_stats})
        delta = parallel.to_host(outp.delta) if mesh is not None else outp.delta
        m.update(round=r, seconds=round(seconds, 3), delta_norm=float(np.linalg.norm(np.asarray(delta))),
                 includes_compile=r == 1)
        result["rounds"].append(m)
        if writer:
            bar.write(f"round {r:<3} {_fmt(m)}  ({seconds:.1f} s{', incl. compile' if r == 1 else ''})")
            save_result(out, result)
    bar.close()
    if not writer:
        return 0
    if args.save:
        checkpoints.save_checkpoint(args.save, {"params": params, "batch_stats": batch_stats},
                                    {"model": args.model, "num_classes": exp.num_classes,
                                     "attack": args.attack, "target": target, "unlearned_with": "ibau-jax",
                                     "rounds": args.rounds, "source_checkpoint": str(args.checkpoint)})
        print(f"saved the unlearned model to {args.save}")
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    exp = load_experiment(args)
    print(json.dumps(exp.evaluate(exp.variables)))
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    """Seeds x hyperparameter grid, vmapped in chunks (``parallel.sweep_rounds``); mean ± std table."""
    from .. import parallel

    # Multi-host: join before any other JAX work (flags or IBAU_* env vars; no-op when absent).
    parallel.init_distributed(args.coordinator, args.num_processes, args.process_id)
    import jax

    from ..defenses import ibau

    exp = load_experiment(args)
    model, variables, target = exp.model, exp.variables, exp.target
    preset = {"faithful": ibau.IBAUConfig.faithful, "defense_py": ibau.IBAUConfig.defense_py}[args.preset]
    config = preset(batch_size=args.batch_size, solver=args.solver)
    grid: dict[str, list[Any]] = {"K": args.K}
    for flag, field in (("outer_lr", "outer_lr"), ("fp_step", "fp_step"), ("inner_reg", "inner_reg"),
                        ("radius", "radius")):
        if getattr(args, flag):
            grid[field] = getattr(args, flag)
    if "radius" in grid and config.radius is None:
        raise CLIError("--radius needs the projection on: use --preset faithful")
    seeds = list(range(args.seed, args.seed + args.num_seeds))

    xb, yb = exp.batches(config.batch_size, args.limit_batches)
    mesh = parallel.cli_mesh(args.devices)

    evaluate = lambda v: exp.evaluate(v, mesh)

    t0 = time.perf_counter()
    done = lambda k, n: print(f"[{k}/{n} runs of this K] {time.perf_counter() - t0:.1f} s", flush=True)
    records = parallel.sweep_rounds(model, config, variables, xb, yb, seeds=seeds, grid=grid, rounds=args.rounds,
                                    chunk=args.chunk, evaluate_fn=evaluate, mesh=mesh, on_chunk=done,
                                    strategy=args.strategy, mask_rng=args.mask_rng)
    result = {"config": {"checkpoint": str(args.checkpoint), "model": args.model, "dataset": args.dataset,
                         "attack": args.attack, "target": target, "rounds": args.rounds, "seeds": seeds,
                         "mask_rng": args.mask_rng, "chunk": args.chunk, "strategy": args.strategy, "n_clean": args.n_clean, "num_batches": int(xb.shape[0]),
                         "preset": args.preset, "ibau": dataclasses.asdict(config),
                         "devices": mesh.size if mesh is not None else 1, "processes": jax.process_count(),
                         "jax_backend": jax.default_backend(), "seconds": round(time.perf_counter() - t0, 3)},
              "before": evaluate(variables), "swept": sorted(grid, key=lambda k: (k != "K", k)),
              "records": records}
    table = parallel.sweep_markdown(result)
    print(table, end="")
    if jax.process_index() == 0:  # multi-host: every process computed the same table; one writes
        out = Path(args.out)
        write_atomic(out, json.dumps(result, indent=2) + "\n")
        write_atomic(out.with_suffix(".md"), table)
        print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


def cmd_attack(args: argparse.Namespace) -> int:
    """Train a poisoned model (``train.train``) and write RUN_DIR (model.npz, train_state.npz, run.json)."""
    from .. import attacks, data, models, train

    if args.dataset == "cifar10":
        train_set = data.load_cifar10(args.data_dir, split="train", source=getattr(args, "data_source", "auto"),
                                      download=not args.no_download)
    else:
        if args.data_dir is None:
            raise CLIError("training on GTSRB needs --data-dir: a folder with the official archive "
                           "(Final_Training/Images/000NN/*.ppm) or train_roi32.npz")
        train_set = data.load_gtsrb(args.data_dir, split="train")
    test = load_test_set(args.dataset, args.data_dir, download=not args.no_download,
                         source=getattr(args, "data_source", "auto"))
    x, y = train_set.x, train_set.y
    if args.train_limit:
        x, y = x[: args.train_limit], y[: args.train_limit]
    attack = attacks.make_attack(args.attack, num_classes=test.num_classes, target=args.target,
                                 trigger_dir=args.trigger_dir, seed=args.seed)
    poisoned = attacks.poison_dataset(data.to_float(x), y, attack, args.poison_ratio, args.seed)
    test_x = data.to_float(test.x)
    asr_x, asr_t, _ = attacks.asr_test_set(test_x, test.y, attack)
    eval_sets = train.EvalSets(test_x, test.y, asr_x, asr_t, test.y)
    lr = args.lr if args.lr is not None else (0.05 if args.optimizer == "sgd" else 1e-3)
    config = train.TrainConfig(epochs=args.epochs, batch_size=args.batch_size, optimizer=args.optimizer, lr=lr,
                               weight_decay=args.weight_decay, flip=args.dataset != "gtsrb", seed=args.seed,
                               eval_every=args.eval_every)
    run_config = {"dataset": args.dataset, "attack": args.attack, "target": attack.target,
                  "poison_ratio": args.poison_ratio, "model": args.model, "train_limit": args.train_limit,
                  "n_train": int(len(y))}
    meta = {"model": args.model, "num_classes": test.num_classes, "dataset": args.dataset,
            "attack": args.attack, "target": attack.target, "poison_ratio": args.poison_ratio}
    model = models.get_model(args.model, test.num_classes)
    _, history = train.train(model, poisoned.x, poisoned.y, config, eval_sets=eval_sets, run_dir=args.out,
                             run_config=run_config, meta=meta, resume=args.resume, quiet=args.quiet)
    last = history[-1]
    if "clean_acc" in last:
        print(f"final     {_fmt(last)}")
    print(f"wrote {args.out}/run.json and {args.out}/model.npz")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Self-contained demo: poison -> train -> I-BAU -> report (see ``ibau_jax.demo``)."""
    from .. import demo

    demo.run_demo(args)
    return 0


# ----------------------------------------------------------------------------- parser

def _data_source_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-source", default="auto", choices=("auto", "npz", "tar", "tfds"),
                   help="CIFAR-10 only: npz files, the official tar (or its extracted folder), "
                        "tensorflow-datasets (pip install 'ibau-jax[tfds]'; --data-dir is the tfds "
                        "data folder), or auto (npz, then tar, then download)")


def _common(p: argparse.ArgumentParser) -> None:
    from .. import attacks, models

    p.add_argument("--checkpoint", default=None,
                   help="PyTorch checkpoint (.pth) or ibau-jax checkpoint (.npz); optional with --model RUN_DIR")
    p.add_argument("--model", default="small_vgg",
                   help=f"architecture ({', '.join(sorted(models.MODELS))}) or a RUN_DIR written by "
                        "`ibau-jax attack` (its weights, model, attack and target become the defaults)")
    p.add_argument("--dataset", default="cifar10", choices=DATASETS)
    p.add_argument("--data-dir", default=None,
                   help="CIFAR-10: npz folder, cifar-10-python.tar.gz or its folder (default: download "
                        "to the cache); GTSRB: folder with test_roi32.npz or the official archive")
    p.add_argument("--no-download", action="store_true", help="never download data")
    _data_source_flag(p)
    p.add_argument("--trigger-dir", default=None, help="folder with the trigger PNGs (and mask.npy)")
    p.add_argument("--attack", default=None, choices=attacks.ATTACK_NAMES, help="default: badnets or RUN_DIR's")
    p.add_argument("--target", type=int, default=None, help="the backdoor's target class (default 8 or RUN_DIR's)")
    p.add_argument("--n-clean", type=int, default=5000,
                   help="test images 0..n-1 are the defender's clean set, the rest measure accuracy")


def build_parser() -> argparse.ArgumentParser:
    from .. import attacks, hypergrad, models, parallel
    from ..defenses import ibau

    parser = argparse.ArgumentParser(prog="ibau-jax", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    u = sub.add_parser("unlearn", help="run I-BAU rounds on a poisoned model")
    _common(u)
    u.add_argument("--rounds", type=int, default=1)
    u.add_argument("--preset", default="faithful", choices=("faithful", "defense_py"),
                   help="faithful = the original notebook (L2 projection on); defense_py = projection off")
    u.add_argument("--solver", default="neumann", choices=hypergrad.SOLVERS)
    u.add_argument("--K", type=int, default=5, help="fixed-point (Neumann) steps")
    u.add_argument("--batch-size", type=int, default=100)
    u.add_argument("--radius", type=float, default=None, help="L2 radius of δ (default 10)")
    u.add_argument("--no-projection", action="store_true")
    u.add_argument("--outer-lr", type=float, default=None, help="Adam learning rate (default 1e-3)")
    u.add_argument("--limit-batches", type=int, default=0, help="use only the first B clean batches (quick runs)")
    u.add_argument("--seed", type=int, default=0)
    u.add_argument("--mask-rng", default="python", choices=ibau.MASK_RNGS,
                   help="how the perturbed image of each outer batch is drawn: python = the original "
                        "code's random.sample stream after random.seed(SEED) (default); jax = jax.random")
    u.add_argument("--out", default="result.json")
    u.add_argument("--save", default=None, help="write the unlearned model here (.npz)")
    u.add_argument("--quiet", action="store_true", help="no progress bar")
    parallel.add_distributed_args(u)
    u.set_defaults(func=cmd_unlearn)

    e = sub.add_parser("evaluate", help="clean accuracy and ASR of a model")
    _common(e)
    e.set_defaults(func=cmd_evaluate)

    w = sub.add_parser("sweep", help="I-BAU over seeds x hyperparameters, vmapped in chunks; mean ± std table")
    _common(w)
    w.add_argument("--preset", default="faithful", choices=("faithful", "defense_py"))
    w.add_argument("--solver", default="neumann", choices=hypergrad.SOLVERS)
    w.add_argument("--batch-size", type=int, default=100)
    w.add_argument("--K", type=int, nargs="+", default=[5], help="values of K (one compilation each)")
    w.add_argument("--outer-lr", type=float, nargs="+", default=None, help="values of the outer learning rate")
    w.add_argument("--fp-step", type=float, nargs="+", default=None, help="values of the fixed-point step η")
    w.add_argument("--inner-reg", type=float, nargs="+", default=None, help="values of the inner L2 weight")
    w.add_argument("--radius", type=float, nargs="+", default=None, help="values of the projection radius")
    w.add_argument("--seed", type=int, default=0, help="first seed")
    w.add_argument("--num-seeds", type=int, default=4, help="seeds seed .. seed+num_seeds-1 per setting")
    w.add_argument("--mask-rng", default="python", choices=ibau.MASK_RNGS, help="as in unlearn")
    w.add_argument("--chunk", type=int, default=4, help="runs (setting x seed) per compiled call; bounds memory")
    w.add_argument("--strategy", default="auto", choices=("auto", "vmap", "map"),
                   help="runs of a chunk batched (vmap) or in sequence inside one program (map); auto: map on CPU")
    w.add_argument("--rounds", type=int, default=1)
    w.add_argument("--limit-batches", type=int, default=0, help="use only the first B clean batches (quick runs)")
    w.add_argument("--out", default="sweep.json")
    parallel.add_distributed_args(w)
    w.set_defaults(func=cmd_sweep)

    a = sub.add_parser("attack", help="train a poisoned model; writes RUN_DIR (model.npz, run.json)")
    a.add_argument("--dataset", default="cifar10", choices=DATASETS)
    a.add_argument("--data-dir", default=None, help="as for unlearn; the training split is read")
    a.add_argument("--no-download", action="store_true", help="never download data")
    _data_source_flag(a)
    a.add_argument("--attack", default="badnets", choices=attacks.ATTACK_NAMES)
    a.add_argument("--trigger-dir", default=None, help="folder with the trigger PNGs (file triggers)")
    a.add_argument("--target", type=int, default=0)
    a.add_argument("--poison-ratio", type=float, default=0.1)
    a.add_argument("--model", default="small_vgg", choices=sorted(models.MODELS))
    a.add_argument("--epochs", type=int, default=30)
    a.add_argument("--train-limit", type=int, default=0, help="train on the first N images only (0 = all)")
    a.add_argument("--batch-size", type=int, default=128)
    a.add_argument("--optimizer", default="sgd", choices=("sgd", "adam"))
    a.add_argument("--lr", type=float, default=None, help="peak learning rate (default: sgd 0.05, adam 1e-3)")
    a.add_argument("--weight-decay", type=float, default=5e-4)
    a.add_argument("--eval-every", type=int, default=1, help="epochs between evaluations")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--out", required=True, help="run directory")
    a.add_argument("--resume", action="store_true", help="continue the run in --out from its last epoch")
    a.add_argument("--quiet", action="store_true", help="no progress bar")
    a.set_defaults(func=cmd_attack)

    dm = sub.add_parser("demo", help="self-contained demo: poison, train, unlearn, report (no download)")
    dm.add_argument("--dataset", default="digits", choices=("digits", "cifar10"),
                    help="digits = scikit-learn's bundled 8x8 digits upsampled to 32x32 (default)")
    dm.add_argument("--data-dir", default=None, help="CIFAR-10 only")
    dm.add_argument("--no-download", action="store_true")
    dm.add_argument("--n-train", type=int, default=5000, help="CIFAR-10 only (digits: what clean/test leave)")
    dm.add_argument("--n-clean", type=int, default=300, help="defender's clean images for I-BAU")
    dm.add_argument("--n-test", type=int, default=300, help="images for clean accuracy and ASR")
    dm.add_argument("--target", type=int, default=0)
    dm.add_argument("--poison-ratio", type=float, default=0.1)
    dm.add_argument("--widths", type=int, nargs=3, default=[16, 32, 64], help="small_vgg conv widths")
    dm.add_argument("--epochs", type=int, default=12)
    dm.add_argument("--train-batch-size", type=int, default=64)
    dm.add_argument("--lr", type=float, default=0.02)
    dm.add_argument("--rounds", type=int, default=10)
    dm.add_argument("--ibau-batch-size", type=int, default=50)
    dm.add_argument("--portion", type=float, default=0.4, help="fraction of each I-BAU batch that gets δ")
    dm.add_argument("--outer-lr", type=float, default=2e-3)
    dm.add_argument("--K", type=int, default=5)
    dm.add_argument("--seed", type=int, default=0)
    dm.add_argument("--out", default="runs/demo")
    dm.add_argument("--quiet", action="store_true")
    dm.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from ..attacks import AttackError
    from ..checkpoints import CheckpointError
    from ..data import DataError

    args = build_parser().parse_args(argv)
    if getattr(args, "rounds", 1) < 1:
        print("ibau-jax: error: --rounds must be >= 1", file=sys.stderr)
        return 2
    if getattr(args, "save", None) and not str(args.save).endswith(".npz"):
        print("ibau-jax: error: --save writes an ibau-jax checkpoint; give it a .npz name", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except (CLIError, AttackError, CheckpointError, DataError, ValueError) as e:
        print(f"ibau-jax: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
