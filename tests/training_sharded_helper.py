"""Subprocess helper for tests/test_training_sharded.py (XLA_FLAGS must be set before JAX starts).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/training_sharded_helper.py OUT.npz 1 2 3 8

One training step on a batch of 20 (divisible by neither 3 nor 8) with the plain jitted
``training.train_step`` on one device (``ref``) and ``training.make_sharded_train_step`` on
meshes of each given size (``step{N}``: params + BatchNorm statistics; ``loss{N}``, ``acc{N}``);
then one epoch (batches of 20 from 50 images) with ``train_epoch`` (``epoch_ref``) and the
sharded epoch on the last mesh (``epoch{N}``). Writes everything flattened into OUT.npz.
"""
from __future__ import annotations

import sys

import numpy as np


def flat(tree) -> np.ndarray:
    import jax
    return np.concatenate([np.asarray(a, np.float64).ravel() for a in jax.tree.leaves(tree)])


def main(argv: list[str]) -> int:
    import jax
    import jax.numpy as jnp

    from ibau_jax import models, sharding, training

    out, sizes = argv[0], [int(s) for s in argv[1:]]
    # Conv, BatchNorm (batch statistics), dropout and augmentation are all exercised.
    # widths (8, 8, 16) would expose a partitioner bug in SmallVGG's NCHW flatten (wrong sharded
    # gradients; reported to the models owner), not this module's padding.
    model = models.SmallVGG(num_classes=10, widths=(4, 8, 8))
    config = training.TrainConfig(epochs=1, batch_size=20, lr=0.05, crop_pad=2)
    state = training.create_state(model, config, steps_per_epoch=2, image_shape=(16, 16, 3))
    rng = np.random.default_rng(2)
    x = rng.random((50, 16, 16, 3), dtype=np.float32)
    y = rng.integers(0, 10, 50).astype(np.int32)
    key = jax.random.PRNGKey(7)
    res = {"init": flat((state.params, state.batch_stats)), "devices": np.asarray(jax.device_count())}
    ref, m = training.train_step(state, (x[:20], y[:20]), key, crop_pad=2)
    res["ref"], res["loss_ref"], res["acc_ref"] = flat((ref.params, ref.batch_stats)), m["loss"], m["acc"]
    for n in sizes:
        mesh = sharding.make_mesh(n)
        st, m = training.make_sharded_train_step(mesh, crop_pad=2)(state, (x[:20], y[:20]), key)
        res[f"step{n}"] = flat(sharding.to_host((st.params, st.batch_stats)))
        res[f"loss{n}"], res[f"acc{n}"] = sharding.to_host((m["loss"], m["acc"]))
        res[f"mesh{n}"] = np.asarray(st.params["conv0"]["kernel"].sharding.mesh.size)
    ep, m = training.train_epoch(state, jnp.asarray(x), jnp.asarray(y), key, batch_size=20, crop_pad=2)
    res["epoch_ref"], res["epoch_loss_ref"] = flat((ep.params, ep.batch_stats)), m["loss"]
    n = sizes[-1]
    ep, m = training.make_sharded_train_epoch(sharding.make_mesh(n), 20, crop_pad=2)(state, x, y, key)
    res[f"epoch{n}"], res[f"epoch_loss{n}"] = flat(sharding.to_host((ep.params, ep.batch_stats))), sharding.to_host(m["loss"])
    np.savez(out, **res)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
