"""The ``ibau-jax`` command line: flags only (no computation; ``commands`` does the work).

The choices come from the libraries' registries (attacks, models, solvers), so a registered
addition appears here without an edit.
"""
from __future__ import annotations

import argparse

from ..experiment import DATASETS


def _attack_names() -> tuple[str, ...]:
    from .. import attacks

    return tuple(attacks.ATTACK_NAMES)


def _model_names() -> tuple[str, ...]:
    from .. import models

    return tuple(sorted(models.MODELS))


def _solvers() -> tuple[str, ...]:
    from .. import hypergrad

    return tuple(hypergrad.SOLVERS)


def _mask_rngs() -> tuple[str, ...]:
    from ..defenses import ibau

    return tuple(ibau.MASK_RNGS)


def _data_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="cifar10", choices=DATASETS)
    p.add_argument("--data-dir", default=None,
                   help="CIFAR-10: npz folder, cifar-10-python.tar.gz or its folder (default: download "
                        "to the cache); GTSRB: folder with test_roi32.npz or the official archive")
    p.add_argument("--no-download", action="store_true", help="never download data")
    p.add_argument("--data-source", default="auto", choices=("auto", "npz", "tar", "tfds"),
                   help="CIFAR-10 only: npz files, the official tar (or its extracted folder), "
                        "tensorflow-datasets (pip install 'ibau-jax[tfds]'; --data-dir is the tfds "
                        "data folder), or auto (npz, then tar, then download)")


def _model_flags(p: argparse.ArgumentParser) -> None:
    """What a defense or an evaluation works on: the model, the data, the attack."""
    p.add_argument("--checkpoint", default=None,
                   help="PyTorch checkpoint (.pth) or ibau-jax checkpoint (.npz); optional with --model RUN_DIR")
    p.add_argument("--model", default="small_vgg",
                   help=f"architecture ({', '.join(_model_names())}) or a RUN_DIR written by "
                        "`ibau-jax attack` (its weights, model, attack and target become the defaults)")
    _data_flags(p)
    p.add_argument("--trigger-dir", default=None, help="folder with the trigger PNGs (and mask.npy)")
    p.add_argument("--attack", default=None, choices=_attack_names(), help="default: badnets or RUN_DIR's")
    p.add_argument("--attack-option", action="append", default=[], metavar="KEY=VALUE",
                   help="an option of the attack's trigger, as it was trained (repeatable; default: RUN_DIR's)")
    p.add_argument("--target", type=int, default=None, help="the backdoor's target class (default 8 or RUN_DIR's)")
    p.add_argument("--n-clean", type=int, default=5000,
                   help="test images 0..n-1 are the defender's clean set, the rest measure accuracy")
    p.add_argument("--eval-limit", type=int, default=0,
                   help="measure accuracy and ASR on the first N images of each set only (quick checks; "
                        "0 = all, the default; the result records it)")


def _device_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--devices", type=int, default=None,
                   help="devices on the data-parallel mesh (default: all, over all processes); any count")
    p.add_argument("--coordinator", default=None, help="multi-host: host:port of process 0 (or IBAU_COORDINATOR)")
    p.add_argument("--num-processes", type=int, default=None, help="multi-host: processes (or IBAU_NUM_PROCESSES)")
    p.add_argument("--process-id", type=int, default=None, help="multi-host: this process (or IBAU_PROCESS_ID)")


def _run_flags(p: argparse.ArgumentParser, out_default: str) -> None:
    p.add_argument("--seed", type=int, default=0, help="the defense's key is PRNGKey(seed)")
    p.add_argument("--out", default=out_default, help="result JSON (a markdown report is written beside it)")
    p.add_argument("--save", default=None, help="write the defended model here (.npz)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--eval-every", type=int, default=1,
                   help="rounds (epochs) between evaluations of the defended model; the last is always evaluated")
    _device_flags(p)


def build_parser() -> argparse.ArgumentParser:
    from .. import defenses  # the registry's names only (no jax import)

    parser = argparse.ArgumentParser(
        prog="ibau-jax", description="Backdoor defenses in JAX: I-BAU and its baselines, compiled.")
    sub = parser.add_subparsers(dest="command", required=True)

    d = sub.add_parser("defend", help="run a registered defense on a poisoned model")
    _model_flags(d)
    d.add_argument("--defense", required=True, metavar="NAME",
                   help=f"registered defense ({', '.join(defenses.names())})")
    d.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a field of the defense's config (repeatable), e.g. --set rounds=1")
    _run_flags(d, "result.json")
    d.set_defaults(command="defend")

    u = sub.add_parser("unlearn", help="run I-BAU rounds on a poisoned model (defend --defense ibau)")
    _model_flags(u)
    u.add_argument("--rounds", type=int, default=1)
    u.add_argument("--preset", default="faithful", choices=("faithful", "defense_py"),
                   help="faithful = the original notebook (L2 projection on); defense_py = projection off")
    u.add_argument("--solver", default="neumann", choices=_solvers())
    u.add_argument("--K", type=int, default=5, help="fixed-point (Neumann) steps")
    u.add_argument("--batch-size", type=int, default=100)
    u.add_argument("--radius", type=float, default=None, help="L2 radius of δ (default 10)")
    u.add_argument("--no-projection", action="store_true")
    u.add_argument("--outer-lr", type=float, default=None, help="Adam learning rate (default 1e-3)")
    u.add_argument("--limit-batches", type=int, default=0, help="use only the first B clean batches (quick runs)")
    u.add_argument("--mask-rng", default="python", choices=_mask_rngs(),
                   help="how the perturbed image of each outer batch is drawn: python = the original "
                        "code's random.sample stream after random.seed(SEED) (default); jax = jax.random")
    _run_flags(u, "result.json")

    e = sub.add_parser("evaluate", help="clean accuracy, ASR and robust accuracy of a model")
    _model_flags(e)
    e.add_argument("--per-class", action="store_true",
                   help="add class_acc: the clean accuracy within each class (a list by class id)")

    w = sub.add_parser("sweep", help="a defense over seeds x hyperparameters (I-BAU: vmapped in chunks); "
                                     "mean ± std table")
    _model_flags(w)
    w.add_argument("--defense", default="ibau", metavar="NAME",
                   help="the defense to sweep (default ibau, whose grid is given by --K/--outer-lr/...)")
    w.add_argument("--grid", action="append", default=[], metavar="FIELD=V1,V2,...",
                   help="defenses other than ibau: values of a config field (repeatable; one run per combination)")
    w.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="defenses other than ibau: a config field every run shares (repeatable)")
    w.add_argument("--preset", default="faithful", choices=("faithful", "defense_py"))
    w.add_argument("--solver", default="neumann", choices=_solvers())
    w.add_argument("--batch-size", type=int, default=100)
    w.add_argument("--K", type=int, nargs="+", default=[5], help="values of K (one compilation each)")
    w.add_argument("--outer-lr", type=float, nargs="+", default=None, help="values of the outer learning rate")
    w.add_argument("--fp-step", type=float, nargs="+", default=None, help="values of the fixed-point step η")
    w.add_argument("--inner-reg", type=float, nargs="+", default=None, help="values of the inner L2 weight")
    w.add_argument("--radius", type=float, nargs="+", default=None, help="values of the projection radius")
    w.add_argument("--seed", type=int, default=0, help="first seed")
    w.add_argument("--num-seeds", type=int, default=4, help="seeds seed .. seed+num_seeds-1 per setting")
    w.add_argument("--mask-rng", default="python", choices=_mask_rngs(), help="as in unlearn")
    w.add_argument("--chunk", type=int, default=4, help="runs (setting x seed) per compiled call; bounds memory")
    w.add_argument("--strategy", default="auto", choices=("auto", "vmap", "map"),
                   help="runs of a chunk batched (vmap) or in sequence inside one program (map); auto: map on CPU")
    w.add_argument("--rounds", type=int, default=1)
    w.add_argument("--limit-batches", type=int, default=0, help="use only the first B clean batches (quick runs)")
    w.add_argument("--out", default="sweep.json")
    _device_flags(w)

    a = sub.add_parser("attack", help="train a poisoned model; writes RUN_DIR (model.npz, run.json)")
    _data_flags(a)
    a.add_argument("--attack", default="badnets", choices=_attack_names())
    a.add_argument("--attack-option", action="append", default=[], metavar="KEY=VALUE",
                   help="an option of the attack's builder, e.g. sig delta=0.157 or wanet noise=false "
                        "(repeatable; docs/attacks.md lists them)")
    a.add_argument("--trigger-dir", default=None, help="folder with the trigger PNGs (file triggers)")
    a.add_argument("--target", type=int, default=0)
    a.add_argument("--poison-ratio", type=float, default=0.1)
    a.add_argument("--model", default="small_vgg", choices=_model_names())
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
    a.add_argument("--dp-noise", type=float, default=None, metavar="SIGMA",
                   help="DP-SGD training (a backdoor defense): Gaussian noise multiplier σ > 0; needs --dp-clip")
    a.add_argument("--dp-clip", type=float, default=None, metavar="C",
                   help="DP-SGD: clip every example's gradient to L2 norm C > 0; needs --dp-noise")

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

    b = sub.add_parser("bench", help="run a benchmark config: models x defenses x clean-set sizes x seeds, "
                                     "one JSON record per finished cell (resumable)")
    b.add_argument("config", help="TOML config (ready-made ones: experiments/configs/)")
    b.add_argument("--results", required=True, help="results directory; a rerun skips its finished cells")
    b.add_argument("--profile", default="full", choices=("full", "cpu"),
                   help="cpu = the config's [profile.cpu] reductions (fewer rounds/seeds)")
    b.add_argument("--zoo", default=None, help="zoo directory of poisoned models (default: the config's zoo)")
    b.add_argument("--models", nargs="+", default=None, metavar="NAME", help="run only these models of the config")
    b.add_argument("--defenses", nargs="+", default=None, metavar="LABEL",
                   help="run only these defenses of the config")
    b.add_argument("--no-train", action="store_true",
                   help="do not train missing zoo models; their cells are listed as missing")
    b.add_argument("--quiet", action="store_true", help="no progress bars")

    r = sub.add_parser("report", help="tables (markdown, JSON) and plots (PNG) of a bench results directory, "
                                      "from its records alone")
    r.add_argument("results_dir")
    r.add_argument("--reference", action="append", default=[], metavar="CSV",
                   help="reference numbers to place beside ours (columns model,defense,clean_acc,asr[,ra][,source]; "
                        "repeatable)")
    r.add_argument("--out", default=None, help="output folder (default: RESULTS_DIR/report)")
    return parser
