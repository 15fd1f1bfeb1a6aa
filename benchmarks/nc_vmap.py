"""Neural Cleanse's trigger search: all classes in one vmapped program against a Python loop
over the classes (each class one call of the same compiled single-class program).

    python benchmarks/nc_vmap.py [--epochs 3] [--samples-per-epoch 64] [--repeats 2]

Setting: the digits demo's model size (SmallVGG(10, widths=(16, 32, 64)), random init,
32×32×3 inputs), 10 classes, 256 random images, batch 32, the search run for ``--epochs``
epochs (early stop cannot trigger that soon). Both sides are compiled first (compile times
reported apart) and timed ``--repeats`` times (best kept); their masks are compared. Writes
benchmarks/results/nc_vmap.json and prints a table with the ratio loop / vmap.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from ibau_jax import models
from ibau_jax.defenses import trigger_inversion as ti

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--samples-per-epoch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "nc_vmap.json"))
    args = ap.parse_args()

    k = 10
    model = models.SmallVGG(k, widths=(16, 32, 64))
    variables = jax.device_get(models.init_variables(model, seed=0, image_shape=(32, 32, 3)))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.random((256, 32, 32, 3), dtype=np.float32))
    y = jnp.asarray(rng.integers(0, k, 256).astype(np.int32))
    cfg = ti.SearchConfig(epochs=args.epochs, samples_per_epoch=args.samples_per_epoch, class_chunk=k)
    search = jax.jit(ti.make_search(lambda v, z: model.apply(v, z, train=False), cfg))
    key = jax.random.PRNGKey(0)
    ab = [ti.init_tanh(jax.random.fold_in(key, c), (32, 32, 3)) for c in range(k)]
    a0, b0 = jnp.stack([a for a, _ in ab]), jnp.stack([b for _, b in ab])
    targets = jnp.arange(k, dtype=jnp.int32)

    def timed(fn, *a):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn(*a))
        return time.perf_counter() - t0, out

    c_vmap, vmapped = timed(lambda *a: search.lower(*a).compile(), variables, targets, a0, b0, x, y, key)
    c_one, single = timed(lambda *a: search.lower(*a).compile(), variables, targets[:1], a0[:1], b0[:1], x, y, key)
    t_vmap, t_loop = [], []
    for _ in range(args.repeats):
        dt, (st_v, _) = timed(vmapped, variables, targets, a0, b0, x, y, key)
        t_vmap.append(dt)
        t0 = time.perf_counter()
        masks = [jax.block_until_ready(single(variables, targets[c:c + 1], a0[c:c + 1], b0[c:c + 1], x, y, key))[0]
                 .mask_best[0] for c in range(k)]
        t_loop.append(time.perf_counter() - t0)
    diff = float(np.max(np.abs(np.stack([np.asarray(m) for m in masks]) - np.asarray(st_v.mask_best))))
    steps = args.epochs * cfg.batches_per_epoch
    res = {"classes": k, "epochs": args.epochs, "batches_per_epoch": cfg.batches_per_epoch,
           "batch_size": cfg.batch_size, "model": "SmallVGG(10, widths=(16, 32, 64)), 32x32x3",
           "vmap_s": round(min(t_vmap), 3), "loop_s": round(min(t_loop), 3),
           "ratio_loop_over_vmap": round(min(t_loop) / min(t_vmap), 3),
           "compile_vmap_s": round(c_vmap, 2), "compile_single_s": round(c_one, 2),
           "max_mask_difference": diff, "cpu_count": os.cpu_count(), "backend": jax.default_backend(),
           "load_average_1min": round(os.getloadavg()[0], 2)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(f"{k} classes x {steps} Adam steps of batch {cfg.batch_size} ({jax.default_backend()}, "
          f"load average {res['load_average_1min']})")
    print(f"{'program':<28}{'run s':>10}{'compile s':>12}")
    print(f"{'vmap, all classes':<28}{res['vmap_s']:>10.2f}{res['compile_vmap_s']:>12.2f}")
    print(f"{'loop of single-class calls':<28}{res['loop_s']:>10.2f}{res['compile_single_s']:>12.2f}")
    print(f"ratio loop / vmap: {res['ratio_loop_over_vmap']:.2f}x   (max |mask difference| {diff:.1e})")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
