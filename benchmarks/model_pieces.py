"""Which parts of the small VGG cost time in a faithful I-BAU round (CPU): a timing ablation.

    python benchmarks/model_pieces.py [--shared ../shared] [--batches 10] [--reps 3]

Runs the first ``--batches`` batches of a faithful round (perturbation search and outer
steps, ``ibau.make_round``) from the authors' BadNets checkpoint, once per model variant,
and reports the best of ``--reps`` runs per batch:

- ``library``: the model as shipped (``models.max_pool_2x2``, ``models.elu``);
- ``reduce_window pool``: ``nn.max_pool`` instead (its derivatives are
  ``select_and_scatter`` ops);
- ``expm1 elu``: ``nn.elu`` instead;
- ``both old``: both of the above (the model before 2026-12-03);
- ``1x1 convs``: every 3×3 convolution replaced by a 1×1 matrix product (a timing
  experiment only: 1/9 of the convolution FLOPs, wrong numbers), to see what the rest
  of the model costs;
- ``rgb as 3 channels``: the first layer's convolutions without the zero 4th input
  channel that ``conv._conv`` adds on CPU.

``--variants a,b`` runs only those (names as above); the variants are run in turn, and
``--cycles N`` repeats the whole sequence N times (interleaving them, so that a slow
spell of a shared machine does not fall on one variant only); each variant reports its best.

Writes benchmarks/results/model_pieces_<backend>.json and prints a markdown table.
Why it matters: docs/performance.md.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp

from ibau_jax import experiment, models
from ibau_jax.defenses import ibau
from ibau_jax.models import conv, layers, vgg
from ibau_jax.results import write_atomic
from timing import best_seconds

REPO = Path(__file__).resolve().parents[1]
# (module, name) -> the library's object; SmallVGG (models/vgg.py), Conv3x3 (models/layers.py)
# and conv3x3 look these names up in their own modules at trace time
LIBRARY = {(vgg, "max_pool_2x2"): models.max_pool_2x2, (vgg, "elu"): models.elu,
           (layers, "conv3x3"): models.conv3x3, (conv, "_conv"): conv._conv}
OLD_POOL = {(vgg, "max_pool_2x2"): lambda x: nn.max_pool(x, (2, 2), strides=(2, 2))}
OLD_ELU = {(vgg, "elu"): nn.elu}
VARIANTS = {
    "library": {},
    "reduce_window pool": OLD_POOL,
    "expm1 elu": OLD_ELU,
    "both old": {**OLD_POOL, **OLD_ELU},
    "1x1 convs": {(layers, "conv3x3"): lambda x, w: jnp.einsum("nhwc,co->nhwo", x, w[1, 1])},
    "rgb as 3 channels": {(conv, "_conv"): conv._canonical_conv},   # no zero 4th channel
}


def faithful_round_inputs(shared: Path, batches: int, cfg: ibau.IBAUConfig) -> tuple:
    """Arguments of ``ibau.make_round(...)`` for the first ``batches`` batches of the original
    clean set (CIFAR-10 test 0..4999), from the authors' BadNets checkpoint, seed-0 masks:
    (params, batch_stats, opt_state, xb (B, n, 32, 32, 3), yb (B, n), masks (B, n))."""
    exp = experiment.load(shared / "ibau-original/checkpoints/badnets_8_02_ckpt.pth",
                          data_dir=shared / "datasets/cifar10", download=False)
    xb, yb = map(jnp.asarray, exp.batches(cfg.batch_size, batches))
    params = jax.tree.map(jnp.asarray, exp.variables["params"])
    bs = jax.tree.map(jnp.asarray, exp.variables["batch_stats"])
    masks = jnp.asarray(ibau.seed_masks(0, 1, batches, cfg)[0])
    return params, bs, cfg.outer_tx().init(params), xb, yb, masks


def time_round(model, cfg, inputs, reps: int) -> tuple[float, float]:
    """(compile seconds, best run seconds) of one round over the given batches."""
    t0 = time.perf_counter()
    compiled = ibau.make_round(model, cfg).lower(*inputs).compile()
    compile_s = time.perf_counter() - t0
    return compile_s, best_seconds(compiled, *inputs, reps=reps, warmup=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shared", default=os.environ.get("IBAU_SHARED", str(REPO.parent / "shared")))
    ap.add_argument("--batches", type=int, default=10)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names (see above)")
    ap.add_argument("--cycles", type=int, default=1, help="run the sequence of variants this many times")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    cfg = ibau.IBAUConfig.faithful()
    inputs = faithful_round_inputs(Path(args.shared), args.batches, cfg)

    best: dict[str, dict] = {}
    try:
        for _ in range(args.cycles):
            for name in names:
                for (module, attr), fn in {**LIBRARY, **VARIANTS[name]}.items():
                    setattr(module, attr, fn)
                compile_s, run_s = time_round(models.get_model("small_vgg", 10), cfg, inputs, args.reps)
                row = {"variant": name, "per_batch_s": run_s / args.batches, "compile_s": compile_s}
                print(row, flush=True)
                if name not in best or row["per_batch_s"] < best[name]["per_batch_s"]:
                    best[name] = row
    finally:   # leave the modules as shipped, also after an error or Ctrl-C
        for (module, attr), fn in LIBRARY.items():
            setattr(module, attr, fn)
    rows = [best[n] for n in names]

    result = {"backend": jax.default_backend(), "cpu_count": os.cpu_count(), "jax_version": jax.__version__,
              "batches": args.batches, "reps": args.reps, "cycles": args.cycles, "rows": rows}
    out = Path(args.out) if args.out else REPO / f"benchmarks/results/model_pieces_{result['backend']}.json"
    write_atomic(out, json.dumps(result, indent=2) + "\n")
    print("| model variant | s per batch (search + outer step, best of %d) | compile s |" % (args.reps * args.cycles))
    print("|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['per_batch_s']:.3f} | {r['compile_s']:.1f} |")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
