"""Subprocess helper for tests/test_defenses_sau.py (XLA_FLAGS must be set before JAX starts).

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python tests/sau_sharding_helper.py OUT.npz

Runs SAU (2 rounds, 20 clean images in batches of 8: the last batch of 4 is padded) without a
mesh and on meshes of 4 and 3 devices (3 also pads each batch of 8 to 9), and I-BAU
(tests/sharding_helper.py's problem) without a mesh and on 4 devices. Writes the flattened
final params: ``sau_init``, ``sau_ref``, ``sau_mesh4``, ``sau_mesh3``, ``ibau_init``,
``ibau_ref``, ``ibau_mesh4``, and ``sau_padded3`` (the padded batch size on 3 devices).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))


def main(out: str) -> int:
    import jax

    from ibau_jax import models, sharding
    from ibau_jax.defenses import CleanSet, sau
    from sharding_helper import flat, problem, run_defense

    assert jax.device_count() >= 4, "run with XLA_FLAGS=--xla_force_host_platform_device_count=4"
    res = {}
    # SAU: a tiny VGG on 8x8 images; lr 1e-2 so two rounds move the weights visibly.
    model = models.SmallVGG(num_classes=10, widths=(4, 4, 8))
    variables = jax.device_get(models.init_variables(model, seed=0, image_shape=(8, 8, 3)))
    rng = np.random.default_rng(0)
    clean = CleanSet(rng.random((20, 8, 8, 3), dtype=np.float32), rng.integers(0, 10, 20), 10)
    config = sau.SAUConfig(rounds=2, batch_size=8, lr=1e-2)
    res["sau_init"] = flat(variables["params"])
    for name, mesh in (("sau_ref", None), ("sau_mesh4", sharding.make_mesh(4)), ("sau_mesh3", sharding.make_mesh(3))):
        t = time.perf_counter()
        r = sau.SAU(config).run(model, variables, clean, jax.random.PRNGKey(2), mesh=mesh)
        res[name] = flat(r.variables["params"])
        if name == "sau_mesh3":
            res["sau_padded3"] = np.asarray(r.diagnostics["padded_batch_size"])
        print(f"{name} {time.perf_counter() - t:.1f}s", flush=True)

    # I-BAU: the one-device round vs the defense on a 4-device mesh.
    model, variables, config, xb, yb, masks = problem()
    params, bs = variables["params"], variables["batch_stats"]
    from ibau_jax.defenses import ibau
    t = time.perf_counter()
    opt = config.outer_tx().init(params)
    res["ibau_ref"] = flat(ibau.make_round(model, config)(params, bs, opt, xb, yb, masks).params)
    res["ibau_mesh4"] = flat(run_defense(model, variables, config, xb, yb, sharding.make_mesh(4)).variables["params"])
    res["ibau_init"] = flat(params)
    print(f"ibau {time.perf_counter() - t:.1f}s", flush=True)
    np.savez(out, **res)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
