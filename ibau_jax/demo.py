"""``ibau-jax demo``: poison, train, unlearn and report, end to end, with no download.

Default data: scikit-learn's bundled 8×8 digits (1797 images, 10 classes, values 0..16),
scaled to [0, 1] and upsampled to 32×32 by nearest neighbour (each pixel becomes a 4×4
block: crisp strokes, and the BadNets patch at rows/cols 27..30 lands on a black border
block), grey copied to 3 channels. A seeded permutation splits it into train / clean
(the defender's I-BAU set) / test. ``--dataset cifar10`` uses CIFAR-10 instead (train
subset from the training set, clean and test subsets from the test set).
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np


@dataclasses.dataclass
class DemoData:
    train_x: np.ndarray   # (N, 32, 32, 3) float32 in [0, 1]
    train_y: np.ndarray   # (N,) int32
    clean_x: np.ndarray   # defender's clean set
    clean_y: np.ndarray
    test_x: np.ndarray    # clean accuracy / ASR set
    test_y: np.ndarray
    num_classes: int
    name: str


def load_digits_32(seed: int, n_clean: int, n_test: int) -> DemoData:
    """sklearn digits -> 32×32×3 float32 (nearest upsampling ×4), split by a seeded permutation."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)                      # (1797, 8, 8)
    x = np.repeat(np.repeat(x, 4, axis=1), 4, axis=2)              # (1797, 32, 32)
    x = np.repeat(x[..., None], 3, axis=-1)                        # (1797, 32, 32, 3)
    y = d.target.astype(np.int32)
    perm = np.random.default_rng(seed).permutation(len(y))
    x, y = x[perm], y[perm]
    if n_clean + n_test >= len(y):
        raise ValueError(f"--n-clean {n_clean} + --n-test {n_test} leave no digits to train on (1797 in all)")
    c, t = n_clean, n_clean + n_test
    return DemoData(x[t:], y[t:], x[:c], y[:c], x[c:t], y[c:t], 10, "digits")


def load_cifar10_subsets(data_dir: str | None, seed: int, n_train: int, n_clean: int, n_test: int,
                         download: bool) -> DemoData:
    """Random subsets: train from CIFAR-10's training set, clean and test from its test set."""
    from . import data

    test = data.load_cifar10(data_dir, split="test", download=download)
    train = data.load_cifar10(data_dir, split="train", download=download)
    rng = np.random.default_rng(seed)
    tr = rng.permutation(len(train))[:n_train]
    te = rng.permutation(len(test))[: n_clean + n_test]
    f = data.to_float
    return DemoData(f(train.x[tr]), train.y[tr], f(test.x[te[:n_clean]]), test.y[te[:n_clean]],
                    f(test.x[te[n_clean:]]), test.y[te[n_clean:]], 10, "cifar10")


def _report_md(rep: dict[str, Any]) -> str:
    c = rep["config"]
    lines = [f"# ibau-jax demo: {c['attack']} (target {c['target']}, poison ratio {c['poison_ratio']}) "
             f"on {c['dataset']}", "",
             f"Train {c['n_train']} / clean {c['n_clean']} / test {c['n_test']} images; small_vgg widths "
             f"{c['widths']}, {c['epochs']} epochs; I-BAU {c['rounds']} rounds (batch {c['ibau']['batch_size']}, "
             f"portion {c['ibau']['portion']}, outer lr {c['ibau']['outer_lr']}, K {c['ibau']['K']}); seed {c['seed']}.",
             "", "| stage | clean acc | ASR (all) | ASR (non-target) | seconds |", "|---|---|---|---|---|"]
    for r in rep["rows"]:
        lines.append(f"| {r['stage']} | {r['clean_acc']:.4f} | {r['asr_all']:.4f} | {r['asr_nontarget']:.4f} | "
                     f"{r['seconds']:.1f} |")
    lines += ["", f"Total {rep['seconds']:.1f} s. Figures: `curves.png`, `trigger.png`, `delta.png`."]
    return "\n".join(lines) + "\n"


def _figures(out: Path, rep: dict[str, Any], clean_img: np.ndarray, trig_img: np.ndarray,
             delta: np.ndarray) -> None:
    import matplotlib
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    rows = rep["rows"]  # poisoned model, then one row per round
    xs = list(range(len(rows)))
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(xs, [r["clean_acc"] for r in rows], "o-", label="clean accuracy")
    ax.plot(xs, [r["asr_all"] for r in rows], "s-", label="ASR (all)")
    ax.plot(xs, [r["asr_nontarget"] for r in rows], "^--", label="ASR (non-target)")
    ax.set_xlabel("I-BAU round (0 = poisoned model)")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(loc="center right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=100)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(4, 2.2))
    for a, img, title in zip(axes, (clean_img, trig_img), ("clean", "triggered")):
        a.imshow(np.clip(img, 0, 1), interpolation="nearest")
        a.set_title(title)
        a.axis("off")
    fig.tight_layout()
    fig.savefig(out / "trigger.png", dpi=100)
    plt.close(fig)

    d = delta[0]
    d = (d - d.min()) / max(float(d.max() - d.min()), 1e-12)  # min-max normalised for display
    fig, ax = plt.subplots(figsize=(2.4, 2.4))
    ax.imshow(d, interpolation="nearest")
    ax.set_title("recovered δ (normalised)")
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(out / "delta.png", dpi=100)
    plt.close(fig)


def run_demo(args) -> dict[str, Any]:
    """Poison -> train -> I-BAU rounds -> report.md, curves.png, trigger.png, delta.png in ``args.out``."""
    import jax

    from . import attacks, models, train
    from .defenses import ibau
    from .cli import write_atomic

    t_start = time.perf_counter()
    if args.dataset == "digits":
        d = load_digits_32(args.seed, args.n_clean, args.n_test)
    else:
        d = load_cifar10_subsets(args.data_dir, args.seed, args.n_train, args.n_clean, args.n_test,
                                 download=not args.no_download)
    attack = attacks.make_attack("badnets", num_classes=d.num_classes, target=args.target, seed=args.seed)
    poisoned = attacks.poison_dataset(d.train_x, d.train_y, attack, args.poison_ratio, args.seed)
    asr_x, asr_t, _ = attacks.asr_test_set(d.test_x, d.test_y, attack)
    eval_sets = train.EvalSets(d.test_x, d.test_y, asr_x, asr_t, d.test_y)

    widths = tuple(args.widths)
    model = models.SmallVGG(d.num_classes, widths=widths)  # canonical conv: fast inside scans on CPU
    tcfg = train.TrainConfig(epochs=args.epochs, batch_size=args.train_batch_size, lr=args.lr,
                             crop_pad=2 if args.dataset == "digits" else 4,
                             flip=args.dataset != "digits",  # mirrored digits are other symbols
                             seed=args.seed, eval_every=args.epochs)
    t0 = time.perf_counter()
    state, _ = train.train(model, poisoned.x, poisoned.y, tcfg, eval_sets=eval_sets, quiet=args.quiet,
                           log=lambda s: None)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    before = eval_sets.evaluate(model, variables)
    rows = [{"stage": "poisoned (trained)", **before, "seconds": time.perf_counter() - t0}]
    print(f"trained   clean_acc {before['clean_acc']:.4f}  asr_all {before['asr_all']:.4f}  "
          f"asr_nontarget {before['asr_nontarget']:.4f}  ({rows[0]['seconds']:.1f} s)", flush=True)

    config = ibau.IBAUConfig.faithful(batch_size=args.ibau_batch_size, portion=args.portion,
                                      outer_lr=args.outer_lr, K=args.K)
    n = (len(d.clean_x) // config.batch_size) * config.batch_size
    xb = d.clean_x[:n].reshape(-1, config.batch_size, *d.clean_x.shape[1:])
    yb = d.clean_y[:n].reshape(-1, config.batch_size)
    round_fn = ibau.make_round(model, config)
    params, batch_stats = state.params, state.batch_stats
    opt_state = config.outer_tx().init(params)
    all_masks = ibau.seed_masks(args.seed, args.rounds, xb.shape[0], config, rng="jax")
    delta = None
    for r in range(1, args.rounds + 1):
        t0 = time.perf_counter()
        out = jax.block_until_ready(round_fn(params, batch_stats, opt_state, xb, yb, all_masks[r - 1]))
        params, opt_state, delta = out.params, out.opt_state, np.asarray(out.delta)
        m = eval_sets.evaluate(model, {"params": params, "batch_stats": batch_stats})
        rows.append({"stage": f"round {r}", **m, "seconds": time.perf_counter() - t0})
        print(f"round {r:<3} clean_acc {m['clean_acc']:.4f}  asr_all {m['asr_all']:.4f}  "
              f"asr_nontarget {m['asr_nontarget']:.4f}  ({rows[-1]['seconds']:.1f} s"
              f"{', incl. compile' if r == 1 else ''})", flush=True)

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    rep = {"config": {"dataset": d.name, "attack": "badnets", "target": args.target,
                      "poison_ratio": args.poison_ratio, "n_train": len(d.train_y), "n_clean": int(n),
                      "n_test": len(d.test_y), "widths": list(widths), "epochs": args.epochs, "seed": args.seed,
                      "rounds": args.rounds, "ibau": dataclasses.asdict(config), "train": dataclasses.asdict(tcfg)},
           "rows": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in rows],
           "seconds": round(time.perf_counter() - t_start, 1)}
    write_atomic(out_dir / "report.json", json.dumps(rep, indent=2) + "\n")
    write_atomic(out_dir / "report.md", _report_md(rep))
    idx = int(np.flatnonzero(d.test_y != args.target)[0])
    _figures(out_dir, rep, d.test_x[idx], asr_x[idx], delta)
    print(f"wrote {out_dir}/report.md, curves.png, trigger.png, delta.png ({rep['seconds']:.1f} s in all)")
    return rep
