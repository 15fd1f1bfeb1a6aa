"""Subprocess helper for tests/test_parallel.py (XLA_FLAGS must be set before JAX starts).

    python tests/parallel_helper.py meshes OUT.npz 1 2 4 8     # single-device ref + sharded rounds
    python tests/parallel_helper.py badbatch                   # prints the divisibility error
    python tests/parallel_helper.py multi OUT.npz --coordinator H:P --num-processes 2 --process-id I

Writes flattened final params as npz (``ref``, ``mesh{N}``, or ``multi``); in ``multi`` only
process 0 writes OUT, every process writes OUT.p{I}.npz.
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np


def problem():
    import jax

    from ibau_jax import models
    from ibau_jax.defenses import ibau

    # Small model and images so four compilations fit a CI budget; conv, BN and the
    # full second-order round are all exercised.
    model = models.SmallVGG(num_classes=10, widths=(8, 8, 16))
    variables = models.init_variables(model, seed=0, image_shape=(16, 16, 3))
    config = ibau.IBAUConfig(batch_size=8, K=3, portion=0.25, outer_lr=1e-2)
    rng = np.random.default_rng(0)
    xb = rng.random((3, 8, 16, 16, 3), dtype=np.float32)
    yb = rng.integers(0, 10, (3, 8)).astype(np.int32)
    masks = np.asarray(ibau.random_masks(jax.random.PRNGKey(1), 3, config))
    return model, variables, config, xb, yb, masks


def flat(tree) -> np.ndarray:
    import jax
    return np.concatenate([np.asarray(a, np.float64).ravel() for a in jax.tree.leaves(tree)])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=("meshes", "badbatch", "multi"))
    ap.add_argument("out", nargs="?")
    ap.add_argument("sizes", nargs="*", type=int)
    from ibau_jax import parallel
    parallel.add_distributed_args(ap)
    args = ap.parse_args(argv)
    if args.mode == "multi":
        parallel.init_distributed(args.coordinator, args.num_processes, args.process_id)
    import jax

    from ibau_jax import models
    from ibau_jax.defenses import ibau
    if args.mode == "badbatch":
        try:
            parallel.make_sharded_round(models.SmallVGG(), ibau.IBAUConfig(batch_size=6), parallel.make_mesh(4))
        except ValueError as e:
            print("ValueError:", e)
            return 0
        return 1
    model, variables, config, xb, yb, masks = problem()
    params, bs = variables["params"], variables["batch_stats"]
    opt = config.outer_tx().init(params)
    res = {}
    if args.mode == "meshes":
        t = time.perf_counter()
        res["ref"] = flat(jax.block_until_ready(ibau.make_round(model, config)(params, bs, opt, xb, yb, masks)).params)
        print(f"ref {time.perf_counter() - t:.1f}s", flush=True)
        for n in args.sizes:
            t = time.perf_counter()
            mesh = parallel.make_mesh(n)
            out = parallel.make_sharded_round(model, config, mesh)(params, bs, opt, xb, yb, masks)
            res[f"mesh{n}"] = flat(parallel.to_host(out.params))
            print(f"mesh{n} {time.perf_counter() - t:.1f}s devices={out.losses.sharding.mesh.size}", flush=True)
        res["init"] = flat(params)
        # A training step (train mode: BatchNorm batch statistics, dropout, augmentation) on
        # 1..N devices against the plain jitted step; batch of 16 images.
        from ibau_jax import train
        tcfg = train.TrainConfig(epochs=1, batch_size=16, lr=0.05)
        state = train.create_state(model, tcfg, steps_per_epoch=1, image_shape=(16, 16, 3))
        tx_ = np.random.default_rng(2).random((16, 16, 16, 3), dtype=np.float32)
        ty_ = np.random.default_rng(3).integers(0, 10, 16).astype(np.int32)
        key = jax.random.PRNGKey(7)
        ref_state, _ = jax.jit(train.train_step)(state, (tx_, ty_), key)
        res["train_ref"] = flat((ref_state.params, ref_state.batch_stats))
        res["train_init"] = flat((state.params, state.batch_stats))
        for n in args.sizes:
            st, _ = parallel.make_sharded_train_step(parallel.make_mesh(n))(state, (tx_, ty_), key)
            res[f"train{n}"] = flat(parallel.to_host((st.params, st.batch_stats)))
        # Sharded evaluation: 20 images in batches of 8 (padded tail) over the last mesh.
        from ibau_jax import metrics
        x = np.random.default_rng(1).random((20, 16, 16, 3), dtype=np.float32)
        res["pred_ref"] = metrics.predict(model.apply, variables, x, batch_size=8)
        res["pred_mesh"] = parallel.predict(model.apply, variables, x, mesh, batch_size=8)
        np.savez(args.out, **res)
        return 0
    mesh = parallel.make_mesh()
    out = parallel.make_sharded_round(model, config, mesh)(params, bs, opt, xb, yb, masks)
    p = flat(parallel.to_host(out.params))
    info = np.asarray([jax.process_count(), mesh.size, len(jax.local_devices())])
    np.savez(f"{args.out}.p{jax.process_index()}.npz", multi=p, info=info)
    if jax.process_index() == 0:
        np.savez(args.out, multi=p, info=info)
    print(f"process {jax.process_index()}/{jax.process_count()} mesh {mesh.size} devices done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
