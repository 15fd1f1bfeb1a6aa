"""ASR and clean accuracy against rounds / iterations for the unlearning defenses of a bench run.

    python experiments/defense_curves.py experiments/results/bench/cifar10_single_cpu \
        [--model badnets] [--defenses ibau sau anp] [--out docs/img/defense_curves.png]

Reads the records ``ibau-jax bench`` wrote (``RESULTS/records/*.json``) and draws one panel per
defense: clean accuracy, ``asr_all`` and robust accuracy after each round of its history (I-BAU
and SAU: rounds over the clean set; ANP: chunks of mask-optimisation iterations, then the
pruned model), with the poisoned model at x = 0.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _x(defense: str, rec: dict, i: int) -> tuple[float, str]:
    if rec.get("stage") == "prune":
        return float("nan"), "pruned"
    if "iterations" in rec:
        return float(rec["iterations"]), "iterations"
    return float(rec.get("round", i + 1)), "round"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("results")
    ap.add_argument("--model", default="badnets")
    ap.add_argument("--defenses", nargs="+", default=["ibau", "sau", "anp"])
    ap.add_argument("--out", default="docs/img/defense_curves.png")
    args = ap.parse_args()
    records = {}
    for f in sorted(Path(args.results, "records").glob("*.json")):
        r = json.loads(f.read_text())
        if r["model"]["name"] == args.model and r["defense"]["label"] in args.defenses:
            records[r["defense"]["label"]] = r
    missing = [d for d in args.defenses if d not in records]
    if missing:
        raise SystemExit(f"no finished record for {missing} of model {args.model!r} in {args.results}")
    fig, axes = plt.subplots(1, len(args.defenses), figsize=(4.2 * len(args.defenses), 3.4), squeeze=False)
    for ax, d in zip(axes[0], args.defenses):
        r = records[d]
        xs, unit, pruned = [0.0], "round", None
        ys = {k: [r["before"][k]] for k in ("clean_acc", "asr_all", "robust_acc")}
        for i, h in enumerate(r["history"]):
            x, u = _x(d, h, i)
            if u == "pruned":
                pruned = h
                continue
            unit = u
            xs.append(x)
            for k in ys:
                ys[k].append(h[k])
        for k, style in (("clean_acc", "-o"), ("asr_all", "-s"), ("robust_acc", "-^")):
            ax.plot(xs, ys[k], style, ms=3, label=k)
        if pruned is not None:  # ANP's returned model: the soft mask's last point, then pruning
            for k, c in (("clean_acc", "C0"), ("asr_all", "C1"), ("robust_acc", "C2")):
                ax.plot([xs[-1]], [pruned[k]], "*", color=c, ms=10)
        ax.set_title(f"{d} ({r.get('profile', '')} profile)")
        ax.set_xlabel(unit + ("  (★ = pruned model)" if pruned is not None else ""))
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("fraction")
    axes[0][0].legend(loc="center right", fontsize=8)
    fig.suptitle(f"{args.model}: accuracy, ASR and RA along each defense's run")
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
