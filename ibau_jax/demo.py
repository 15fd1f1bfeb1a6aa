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


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """The demo's settings (``ibau-jax demo -h`` documents each)."""

    dataset: str = "digits"
    data_dir: str | None = None
    no_download: bool = False
    n_train: int = 5000
    n_clean: int = 300
    n_test: int = 300
    target: int = 0
    poison_ratio: float = 0.1
    widths: tuple = (16, 32, 64)
    epochs: int = 12
    train_batch_size: int = 64
    lr: float = 0.02
    rounds: int = 10
    ibau_batch_size: int = 50
    portion: float = 0.4
    outer_lr: float = 2e-3
    K: int = 5
    seed: int = 0
    out: str = "runs/demo"
    quiet: bool = False

    def ibau_overrides(self) -> dict[str, Any]:
        return {"batch_size": self.ibau_batch_size, "portion": self.portion, "outer_lr": self.outer_lr,
                "K": self.K, "rounds": self.rounds}


def _report_md(rep: dict[str, Any]) -> str:
    c = rep["config"]
    lines = [f"# ibau-jax demo: {c['attack']} (target {c['target']}, poison ratio {c['poison_ratio']}) "
             f"on {c['dataset']}", "",
             f"Train {c['n_train']} / clean {c['n_clean']} / test {c['n_test']} images; small_vgg widths "
             f"{c['widths']}, {c['epochs']} epochs; I-BAU {c['rounds']} rounds (batch {c['ibau']['batch_size']}, "
             f"portion {c['ibau']['portion']}, outer lr {c['ibau']['outer_lr']}, K {c['ibau']['K']}); seed {c['seed']}.",
             "", "| stage | clean acc | ASR (all) | ASR (non-target) | RA | seconds |", "|---|---|---|---|---|---|"]
    for r in rep["rows"]:
        lines.append(f"| {r['stage']} | {r['clean_acc']:.4f} | {r['asr_all']:.4f} | {r['asr_nontarget']:.4f} | "
                     f"{r['robust_acc']:.4f} | {r['seconds']:.1f} |")
    lines += ["", f"DER {rep['der']:.4f}. I-BAU: {rep['ibau_seconds']:.1f} s of rounds, {rep['ibau_compile_seconds']:.1f} s "
              f"compiling. Total {rep['seconds']:.1f} s. Figures: `curves.png`, `trigger.png`, `delta.png`."]
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


def check(config: DemoConfig) -> None:
    """Every setting checked before any data is read or any program compiled."""
    from . import defenses, results
    from .errors import ConfigError

    if config.dataset not in ("digits", "cifar10"):
        raise ConfigError(f"unknown demo dataset {config.dataset!r}; choose digits or cifar10")
    if not 0 <= config.target < 10:
        raise ConfigError(f"--target {config.target} is outside 0..9")
    if config.dataset == "digits" and config.n_clean + config.n_test >= 1797:
        raise ConfigError(f"--n-clean {config.n_clean} + --n-test {config.n_test} leave no digits to train on "
                          "(1797 in all); lower them")
    if config.n_clean < config.ibau_batch_size:
        raise ConfigError(f"--n-clean {config.n_clean} is smaller than one I-BAU batch "
                          f"(--ibau-batch-size {config.ibau_batch_size}); raise it or lower the batch")
    defenses.get("ibau", **config.ibau_overrides())       # validates the I-BAU settings
    results.check_writable(Path(config.out) / "report.json", "--out")


def run_demo(config: DemoConfig) -> dict[str, Any]:
    """Poison -> train -> I-BAU rounds -> report.md, curves.png, trigger.png, delta.png in ``config.out``.

    Random streams (``rng.streams(seed)``): the data split uses ``seed`` itself (as before),
    poisoning the "poison" stream, training "init" and "epochs", I-BAU the key ``PRNGKey(seed)``.
    """
    import jax

    from . import attacks, defenses, metrics, models, results, rng, training
    from .data import digits

    check(config)
    t_start = time.perf_counter()
    streams = rng.streams(config.seed)
    if config.dataset == "digits":
        d = digits.load_digits_32(config.seed, config.n_clean, config.n_test)
    else:
        d = digits.load_cifar10_subsets(config.data_dir, config.seed, config.n_train, config.n_clean,
                                        config.n_test, download=not config.no_download)
    attack = attacks.make_attack("badnets", num_classes=d.num_classes, target=config.target,
                                 seed=streams.seed_of("trigger"))
    poisoned = attacks.poison_dataset(d.train_x, d.train_y, attack, config.poison_ratio, streams.seed_of("poison"))
    asr_x, asr_t, _ = attacks.asr_test_set(d.test_x, d.test_y, attack)
    eval_sets = training.EvalSets(d.test_x, d.test_y, asr_x, asr_t, d.test_y)

    widths = tuple(config.widths)
    model = models.SmallVGG(d.num_classes, widths=widths)  # canonical conv: fast inside scans on CPU
    tcfg = training.TrainConfig(epochs=config.epochs, batch_size=config.train_batch_size, lr=config.lr,
                                crop_pad=2 if config.dataset == "digits" else 4,
                                flip=config.dataset != "digits",  # mirrored digits are other symbols
                                seed=config.seed, eval_every=config.epochs)
    t0 = time.perf_counter()
    state, _ = training.train(model, poisoned.x, poisoned.y, tcfg, eval_sets=eval_sets, quiet=config.quiet,
                              log=lambda s: None)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    before = eval_sets.evaluate(model, variables)
    rows = [{"stage": "poisoned (trained)", **before, "seconds": time.perf_counter() - t0}]
    print(f"trained   clean_acc {before['clean_acc']:.4f}  asr_all {before['asr_all']:.4f}  "
          f"asr_nontarget {before['asr_nontarget']:.4f}  ({rows[0]['seconds']:.1f} s)", flush=True)

    defense = defenses.get("ibau", **config.ibau_overrides())

    def callback(r, v, record):
        m = eval_sets.evaluate(model, v)
        rows.append({"stage": f"round {r}", **m, "seconds": record["seconds"]})
        print(f"round {r:<3} clean_acc {m['clean_acc']:.4f}  asr_all {m['asr_all']:.4f}  "
              f"asr_nontarget {m['asr_nontarget']:.4f}  ({record['seconds']:.1f} s)", flush=True)
        return m

    clean = defenses.CleanSet(d.clean_x, d.clean_y, d.num_classes)
    res = defense.run(model, jax.device_get(variables), clean, jax.random.PRNGKey(config.seed), callback=callback)
    print(f"I-BAU: {res.seconds:.1f} s for {config.rounds} rounds, {res.compile_seconds:.1f} s compiling", flush=True)

    out_dir = Path(config.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    n_clean = res.diagnostics["num_batches"] * defense.config.batch_size
    rep = {"config": {"dataset": d.name, "attack": "badnets", "target": config.target,
                      "poison_ratio": config.poison_ratio, "n_train": len(d.train_y), "n_clean": int(n_clean),
                      "n_test": len(d.test_y), "widths": list(widths), "epochs": config.epochs, "seed": config.seed,
                      "rounds": config.rounds, "ibau": dataclasses.asdict(defense.config),
                      "train": dataclasses.asdict(tcfg)},
           "rows": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in rows],
           "der": metrics.der(before, rows[-1]), "ibau_seconds": round(res.seconds, 1),
           "ibau_compile_seconds": round(res.compile_seconds, 1),
           "seconds": round(time.perf_counter() - t_start, 1)}
    results.write_atomic(out_dir / "report.json", results.dumps(rep))
    results.write_atomic(out_dir / "report.md", _report_md(rep))
    idx = int(np.flatnonzero(d.test_y != config.target)[0])
    _figures(out_dir, rep, d.test_x[idx], asr_x[idx], np.asarray(res.artifacts["delta"]))
    print(f"wrote {out_dir}/report.md, curves.png, trigger.png, delta.png ({rep['seconds']:.1f} s in all)")
    return rep
