"""A small VGG on GTSRB (43 classes): clean accuracy, and a BadNets-poisoned model's ASR.

    python experiments/gtsrb_model.py --shared ../shared --out experiments/results/gtsrb_model.json

Only GTSRB's test set is shared (``datasets/gtsrb/test_roi32.npz``: 12,630 images, 43
classes), so the models train on its images 0 .. n_train-1 and are scored on the rest
(n_train .. 12,629, disjoint). Training as ``ibau-jax attack --dataset gtsrb``: SGD with
momentum 0.9 and a cosine schedule, random crop (4-pixel padding), no horizontal flip (signs
are not mirror-symmetric). The BadNets model poisons ``--badnets-ratio`` of the training
images (4x4 white patch, target ``--target``); its ASRs are measured on the triggered held-out
images. Writes ``--out`` (JSON) and the same name with ``.md`` (the table), each atomically.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ibau_jax import attacks, checkpoints, data, metrics, models, rng, training  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shared", default=os.environ.get("IBAU_SHARED", str(REPO.parent / "shared")))
    ap.add_argument("--out", default="experiments/results/gtsrb_model.json")
    ap.add_argument("--n-train", type=int, default=10000, help="train on images 0..N-1, test on the rest")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--widths", type=int, nargs=3, default=[16, 32, 64],
                    help="small VGG conv widths (the authors': 32 64 128)")
    ap.add_argument("--badnets-ratio", type=float, default=0.1, help="0 = train the clean model only")
    ap.add_argument("--target", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args()

    t_all = time.perf_counter()
    gtsrb = data.load_gtsrb(Path(args.shared) / "datasets/gtsrb")
    if not 0 < args.n_train < len(gtsrb):
        raise SystemExit(f"--n-train must be in 1..{len(gtsrb) - 1}")
    x_tr, y_tr = data.to_float(gtsrb.x[:args.n_train]), gtsrb.y[:args.n_train]
    x_te, y_te = data.to_float(gtsrb.x[args.n_train:]), gtsrb.y[args.n_train:]
    model = models.SmallVGG(gtsrb.num_classes, widths=tuple(args.widths))
    config = training.TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, flip=False,
                               seed=args.seed, eval_every=args.epochs)
    majority = float(np.bincount(y_te, minlength=gtsrb.num_classes).max() / len(y_te))

    runs = {}
    variants = [("clean", None)]
    if args.badnets_ratio > 0:
        variants.append(("badnets", attacks.make_attack("badnets", num_classes=gtsrb.num_classes,
                                                        target=args.target,
                                                        seed=rng.streams(args.seed).seed_of("trigger"))))
    for name, attack in variants:
        t0 = time.perf_counter()
        if attack is None:
            xs, ys, eval_sets = x_tr, y_tr, None
        else:
            poisoned = attacks.poison_dataset(x_tr, y_tr, attack, args.badnets_ratio,
                                              rng.streams(args.seed).seed_of("poison"))
            asr_x, asr_t, _ = attacks.asr_test_set(x_te, y_te, attack)
            xs, ys, eval_sets = poisoned.x, poisoned.y, training.EvalSets(x_te, y_te, asr_x, asr_t, y_te)
        state, history = training.train(model, xs, ys, config, quiet=args.quiet, log=lambda s: None)
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        if attack is None:
            m = {"clean_acc": metrics.accuracy(metrics.predict(model.apply, variables, x_te), y_te)}
        else:
            m = eval_sets.evaluate(model, variables)
        runs[name] = {**m, "seconds": round(time.perf_counter() - t0, 1),
                      "train_loss": history[-1]["loss"], "train_acc": history[-1]["train_acc"]}
        print(f"{name}: " + "  ".join(f"{k} {v:.4f}" for k, v in m.items())
              + f"  ({runs[name]['seconds']:.0f} s)", flush=True)

    result = {"config": {**{k: getattr(args, k) for k in ("n_train", "epochs", "batch_size", "lr", "widths",
                                                           "badnets_ratio", "target", "seed")},
                         "n_test": int(len(y_te)), "train_images": f"0..{args.n_train - 1}",
                         "test_images": f"{args.n_train}..{len(gtsrb) - 1}", "flip": False, "crop_pad": 4,
                         "majority_class_share_test": round(majority, 4)},
              "runs": runs, "seconds": round(time.perf_counter() - t_all, 1)}
    lines = [f"GTSRB test_roi32.npz: train on images 0..{args.n_train - 1}, test on "
             f"{args.n_train}..{len(gtsrb) - 1} ({len(y_te)} images; majority class {majority:.4f}, "
             f"chance {1 / gtsrb.num_classes:.4f}); small VGG widths {'/'.join(map(str, args.widths))}, "
             f"{args.epochs} epochs, seed {args.seed}.", "",
             "| model | clean acc | ASR (all) | ASR (non-target) | seconds |", "|---|---|---|---|---|"]
    for name, r in runs.items():
        label = "clean" if name == "clean" else f"BadNets {args.badnets_ratio:g} → class {args.target}"
        asr = (f"{r['asr_all']:.4f} | {r['asr_nontarget']:.4f}" if "asr_all" in r else "– | –")
        lines.append(f"| {label} | {r['clean_acc']:.4f} | {asr} | {r['seconds']:.0f} |")
    table = "\n".join(lines) + "\n"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    checkpoints.atomic_write(out, lambda f: f.write((json.dumps(result, indent=2) + "\n").encode()))
    checkpoints.atomic_write(out.with_suffix(".md"), lambda f: f.write(table.encode()))
    print(table, end="")
    print(f"wrote {out} and {out.with_suffix('.md')} ({result['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
