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
  of the model costs.

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

from ibau_jax import checkpoints, data, ibau, models
from ibau_jax.cli import write_atomic

REPO = Path(__file__).resolve().parents[1]
LIBRARY = {"max_pool_2x2": models.max_pool_2x2, "elu": models.elu, "conv3x3": models.conv3x3}
OLD_POOL = {"max_pool_2x2": lambda x: nn.max_pool(x, (2, 2), strides=(2, 2))}
OLD_ELU = {"elu": nn.elu}
VARIANTS = {
    "library": {},
    "reduce_window pool": OLD_POOL,
    "expm1 elu": OLD_ELU,
    "both old": {**OLD_POOL, **OLD_ELU},
    "1x1 convs": {"conv3x3": lambda x, w: jnp.einsum("nhwc,co->nhwo", x, w[1, 1])},
}


def time_round(model, cfg, inputs, reps: int) -> tuple[float, float]:
    """(compile seconds, best run seconds) of one round over the given batches."""
    t0 = time.perf_counter()
    compiled = ibau.make_round(model, cfg).lower(*inputs).compile()
    compile_s = time.perf_counter() - t0
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*inputs))
        best = min(best, time.perf_counter() - t0)
    return compile_s, best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shared", default=os.environ.get("IBAU_SHARED", str(REPO.parent / "shared")))
    ap.add_argument("--batches", type=int, default=10)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    shared = Path(args.shared)
    test = data.load_cifar10(shared / "datasets/cifar10", download=False)
    clean, _ = data.ibau_split(test)
    cfg = ibau.IBAUConfig.faithful()
    xb = jnp.asarray(data.batches(data.to_float(clean.x), cfg.batch_size)[: args.batches])
    yb = jnp.asarray(data.batches(clean.y, cfg.batch_size)[: args.batches])
    variables, _ = checkpoints.load_torch_checkpoint(shared / "ibau-original/checkpoints/badnets_8_02_ckpt.pth")
    params = jax.tree.map(jnp.asarray, variables["params"])
    bs = jax.tree.map(jnp.asarray, variables["batch_stats"])
    masks = jnp.asarray(ibau.seed_masks(0, 1, args.batches, cfg)[0])
    inputs = (params, bs, cfg.outer_tx().init(params), xb, yb, masks)

    rows = []
    try:
        for name, patch in VARIANTS.items():
            for attr, fn in {**LIBRARY, **patch}.items():   # SmallVGG looks these names up at trace time
                setattr(models, attr, fn)
            compile_s, run_s = time_round(models.get_model("small_vgg", 10), cfg, inputs, args.reps)
            rows.append({"variant": name, "per_batch_s": run_s / args.batches, "compile_s": compile_s})
            print(rows[-1], flush=True)
    finally:   # leave the module as shipped, also after an error or Ctrl-C
        for attr, fn in LIBRARY.items():
            setattr(models, attr, fn)

    result = {"backend": jax.default_backend(), "cpu_count": os.cpu_count(), "jax_version": jax.__version__,
              "batches": args.batches, "reps": args.reps, "rows": rows}
    out = Path(args.out) if args.out else REPO / f"benchmarks/results/model_pieces_{result['backend']}.json"
    write_atomic(out, json.dumps(result, indent=2) + "\n")
    print("| model variant | s per batch (search + outer step, best of %d) | compile s |" % args.reps)
    print("|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['per_batch_s']:.3f} | {r['compile_s']:.1f} |")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
