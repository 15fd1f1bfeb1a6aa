"""Subprocess helper for tests/test_sharding.py (XLA_FLAGS must be set before JAX starts).

    python tests/sharding_helper.py meshes OUT.npz 1 2 3 4 8   # single-device ref + I-BAU on N-device meshes
    python tests/sharding_helper.py multi OUT.npz --coordinator H:P --num-processes 2 --process-id I

Writes flattened final params as npz (``ref``, ``mesh{N}``, or ``multi``); in ``multi`` only
process 0 writes OUT, every process writes OUT.p{I}.npz. The batch of 8 does not divide over
3 devices: that mesh runs the padded round.
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np


def problem():
    from ibau_jax import models
    from ibau_jax.defenses import ibau

    # Small model and images so several compilations fit a CI budget; conv, BN and the
    # full second-order round are all exercised.
    model = models.SmallVGG(num_classes=10, widths=(8, 8, 16))
    variables = models.init_variables(model, seed=0, image_shape=(16, 16, 3))
    config = ibau.IBAUConfig(batch_size=8, K=3, portion=0.25, outer_lr=1e-2, rounds=1)
    rng = np.random.default_rng(0)
    xb = rng.random((3, 8, 16, 16, 3), dtype=np.float32)
    yb = rng.integers(0, 10, (3, 8)).astype(np.int32)
    masks = ibau.seed_masks(1, 1, 3, config)[0]
    return model, variables, config, xb, yb, masks


def flat(tree) -> np.ndarray:
    import jax
    return np.concatenate([np.asarray(a, np.float64).ravel() for a in jax.tree.leaves(tree)])


def run_defense(model, variables, config, xb, yb, mesh):
    """The I-BAU defense (the library's loop) with key PRNGKey(1) on the clean set xb, yb."""
    import jax

    from ibau_jax.defenses import CleanSet, ibau

    clean = CleanSet(xb.reshape(-1, *xb.shape[2:]), yb.reshape(-1), 10)
    return ibau.IBAU(config).run(model, variables, clean, jax.random.PRNGKey(1), mesh=mesh)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=("meshes", "multi"))
    ap.add_argument("out")
    ap.add_argument("sizes", nargs="*", type=int)
    ap.add_argument("--coordinator")
    ap.add_argument("--num-processes", type=int)
    ap.add_argument("--process-id", type=int)
    args = ap.parse_args(argv)
    from ibau_jax import distributed, metrics, sharding

    if args.mode == "multi":
        distributed.init_distributed(args.coordinator, args.num_processes, args.process_id)
    import jax

    from ibau_jax.defenses import ibau

    model, variables, config, xb, yb, masks = problem()
    params, bs = variables["params"], variables["batch_stats"]
    res = {}
    if args.mode == "meshes":
        t = time.perf_counter()
        opt = config.outer_tx().init(params)
        res["ref"] = flat(jax.block_until_ready(ibau.make_round(model, config)(params, bs, opt, xb, yb, masks)).params)
        print(f"ref {time.perf_counter() - t:.1f}s", flush=True)
        for n in args.sizes:
            t = time.perf_counter()
            out = run_defense(model, variables, config, xb, yb, sharding.make_mesh(n))
            res[f"mesh{n}"] = flat(out.variables["params"])
            res[f"devices{n}"] = np.asarray(out.diagnostics["devices"])
            res[f"padded{n}"] = np.asarray(out.diagnostics["padded_batch_size"])
            print(f"mesh{n} {time.perf_counter() - t:.1f}s", flush=True)
        res["init"] = flat(params)
        # Sharded evaluation: 20 images in batches of 8 (padded tail) over a 3-device mesh.
        x = np.random.default_rng(1).random((20, 16, 16, 3), dtype=np.float32)
        res["pred_ref"] = metrics.predict(model.apply, variables, x, batch_size=8)
        res["pred_mesh"] = metrics.predict(model.apply, variables, x, batch_size=8, mesh=sharding.make_mesh(3))
        np.savez(args.out, **res)
        return 0
    mesh = sharding.make_mesh()
    out = run_defense(model, variables, config, xb, yb, mesh)
    p = flat(out.variables["params"])
    info = np.asarray([jax.process_count(), mesh.size, len(jax.local_devices())])
    np.savez(f"{args.out}.p{jax.process_index()}.npz", multi=p, info=info)
    if jax.process_index() == 0:
        np.savez(args.out, multi=p, info=info)
    print(f"process {jax.process_index()}/{jax.process_count()} mesh {mesh.size} devices done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
