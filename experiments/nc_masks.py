"""Neural Cleanse and TABOR detection on the authors' CIFAR-10 BadNets checkpoint: every class's
reversed mask and pattern, pictured, with the norms, anomaly indices and flags.

    python experiments/nc_masks.py [--shared ../shared] [--n-clean 5000] [--epochs 10]
                                   [--samples-per-epoch 1000] [--defenses nc tabor]

Loads badnets_8_02_ckpt.pth as ``ibau-jax defend`` does (``experiment.load``; the clean set is
test images 0..n_clean-1), runs each defense's detection only (``mitigate=False``) and writes
docs/img/{nc,tabor}_masks.png (rows: mask m, pattern p, m·p; the flagged class titled red)
and experiments/results/nc_masks.json: per defense the mask L1 norms, anomaly indices, flagged
classes, attack success, seconds, and for each flagged class (and the true target 8) the
fraction of its mask's L1 mass within one pixel of the 4×4 trigger (rows/columns 27..30, so
26..31).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import jax
import numpy as np

from ibau_jax import defenses, experiment

REPO = Path(__file__).resolve().parents[1]
NEAR = slice(26, 32)  # the trigger's rows/columns 27..30, one pixel either side


def near_trigger_fraction(mask: np.ndarray) -> float:
    """Share of ‖m‖₁ within one pixel of the BadNets trigger, for m (32, 32, 1)."""
    m = np.abs(np.asarray(mask)[..., 0])
    return float(m[NEAR, NEAR].sum() / m.sum())


def draw(path: Path, masks: np.ndarray, patterns: np.ndarray, norms, flagged, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(norms)
    fig, axes = plt.subplots(3, k, figsize=(1.3 * k, 4.3))
    for c in range(k):
        for r, (img, cmap) in enumerate(((masks[c, ..., 0], "gray"), (patterns[c], None),
                                         (masks[c] * patterns[c], None))):
            ax = axes[r, c]
            ax.imshow(np.clip(img, 0, 1), cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
        axes[0, c].set_title(f"{c}: {norms[c]:.0f}", fontsize=8, color="red" if c in flagged else "black")
    for r, name in enumerate(("mask", "pattern", "m·p")):
        axes[r, 0].set_ylabel(name, fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shared", default=os.environ.get("IBAU_SHARED", str(REPO.parent / "shared")))
    ap.add_argument("--n-clean", type=int, default=5000)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--samples-per-epoch", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--defenses", nargs="+", default=["nc", "tabor"])
    ap.add_argument("--out-json", default=str(REPO / "experiments" / "results" / "nc_masks.json"))
    ap.add_argument("--fig-dir", default=str(REPO / "docs" / "img"))
    args = ap.parse_args()

    shared = Path(args.shared)
    exp = experiment.load(shared / "ibau-original/checkpoints/badnets_8_02_ckpt.pth",
                          data_dir=shared / "datasets/cifar10", trigger_dir=shared / "ibau-original/triggers",
                          attack="badnets", target=8, n_clean=args.n_clean, download=False)
    clean = defenses.CleanSet(exp.clean_x, exp.clean_y, exp.num_classes)
    out = {"settings": {"n_clean": args.n_clean, "epochs": args.epochs,
                        "samples_per_epoch": args.samples_per_epoch, "seed": args.seed,
                        "jax_backend": jax.default_backend()}}
    if Path(args.out_json).exists():
        out = {**json.loads(Path(args.out_json).read_text()), **out}
    for name in args.defenses:
        d = defenses.get(name, epochs=args.epochs, samples_per_epoch=args.samples_per_epoch, mitigate=False)
        t0 = time.perf_counter()
        res = d.run(exp.model, exp.variables, clean, jax.random.PRNGKey(args.seed))
        wall = time.perf_counter() - t0
        masks, patterns = res.artifacts["masks"], res.artifacts["patterns"]
        near = {str(c): round(near_trigger_fraction(masks[c]), 4) for c in sorted(set(res.flagged_classes) | {8})}
        out[name] = {"flagged_classes": res.flagged_classes,
                     "mask_l1": [round(s, 2) for s in res.class_scores],
                     "anomaly_index": res.diagnostics["anomaly_index"],
                     "attack_success": res.diagnostics["attack_success"],
                     "final_cost": res.diagnostics["final_cost"],
                     "search_epochs": res.diagnostics["search_epochs"],
                     "near_trigger_fraction": near,
                     # the real trigger is white (1, 1, 1) on rows/columns 27..30
                     "pattern_on_trigger_8": [round(float(v), 3) for v in patterns[8][27:31, 27:31].mean((0, 1))],
                     "seconds": round(res.seconds, 1), "compile_seconds": round(res.compile_seconds, 1),
                     "wall_seconds": round(wall, 1)}
        print(name, json.dumps(out[name]), flush=True)
        draw(Path(args.fig_dir) / f"{name}_masks.png", masks, patterns, res.class_scores, res.flagged_classes,
             f"{name}: reversed triggers of the BadNets (target 8) checkpoint; title = class: mask L1 "
             f"(flagged red); {args.n_clean} clean images, {args.epochs} epochs x {args.samples_per_epoch} samples")
        Path(args.out_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out_json).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out_json} and {args.fig_dir}/{{{','.join(args.defenses)}}}_masks.png")


if __name__ == "__main__":
    main()
