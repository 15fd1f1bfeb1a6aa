"""Time one DeepInspect generator step inside a ``lax.scan`` and alone, with the generator's
upsampling as ``flax.linen.ConvTranspose`` and as ``trigger_generator.ConvTranspose2x``.

    python benchmarks/generator_step.py [--steps 5] [--reps 3]

A step is DeepInspect's: K = 10 classes x B = 32 clean images stamped with G(z, c), the small
VGG (eval mode) on the 320 images, the generator's gradient and an Adam update
(``deepinspect.generator_loss``). "scan" runs ``--steps`` steps in one ``lax.scan`` (as
``DeepInspect.run`` does, one per pass over the clean set) and reports seconds per step;
"alone" jits one step. The two layers compute the same function (tests/test_defenses_deepinspect.py).
Writes benchmarks/results/generator_step_<backend>.json and prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from ibau_jax import models
from ibau_jax.defenses import trigger_generator
from ibau_jax.defenses.deepinspect import generator_loss
from ibau_jax.results import write_atomic
from timing import best_seconds

REPO = Path(__file__).resolve().parents[1]
K, B, NOISE = 10, 32, 100


class _FlaxConvTranspose(nn.Module):
    """The layer ConvTranspose2x replaces (same parameters)."""

    features: int
    kernel_init: nn.initializers.Initializer = nn.linear.default_kernel_init

    @nn.compact
    def __call__(self, x):
        return nn.ConvTranspose(self.features, (5, 5), strides=(2, 2), kernel_init=self.kernel_init, name="ct")(x)


def step_fn(gen, model, mvars, xs, tx):
    def body(carry, kz):
        gp, opt = carry
        z = jax.random.normal(kz, (K, B, NOISE))
        (loss, _), g = jax.value_and_grad(generator_loss, argnums=1, has_aux=True)(
            gen, gp, lambda x: model.apply(mvars, x, train=False), xs, z, 0.02)
        updates, opt = tx.update(g, opt, gp)
        return (optax.apply_updates(gp, updates), opt), loss
    return body


def measure(layer, steps: int, reps: int) -> dict[str, float]:
    trigger_generator.ConvTranspose2x, saved = layer, trigger_generator.ConvTranspose2x  # looked up at call time
    try:
        gen = trigger_generator.TriggerGenerator((32, 32, 3), K)
        gp = gen.init(jax.random.PRNGKey(0), jnp.zeros((1, NOISE)), jnp.zeros((1,), jnp.int32))["params"]
        model = models.get_model("small_vgg", K)
        xs = jax.random.uniform(jax.random.PRNGKey(1), (B, 32, 32, 3))
        mvars = model.init(jax.random.PRNGKey(2), xs[:2])
        tx = optax.adam(0.01)
        body = step_fn(gen, model, mvars, xs, tx)
        state = (gp, tx.init(gp))
        keys = jax.random.split(jax.random.PRNGKey(3), steps)
        alone = best_seconds(jax.jit(body), state, keys[0], reps=reps)
        scanned = best_seconds(jax.jit(lambda s, k: jax.lax.scan(body, s, k)), state, keys, reps=reps) / steps
    finally:
        trigger_generator.ConvTranspose2x = saved
    return {"alone_s": alone, "scan_s_per_step": scanned}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows = [{"layer": name, **measure(layer, args.steps, args.reps)}
            for name, layer in (("flax ConvTranspose", _FlaxConvTranspose),
                                ("ConvTranspose2x", trigger_generator.ConvTranspose2x))]
    out = Path(args.out or REPO / "benchmarks" / "results" / f"generator_step_{jax.default_backend()}.json")
    write_atomic(out, json.dumps({"backend": jax.default_backend(), "devices": str(jax.devices()),
                                  "steps": args.steps, "classes": K, "batch": B, "rows": rows}, indent=2) + "\n")
    print("| upsampling layer | one step alone (s) | per step in a scan (s) |\n|---|---|---|")
    for r in rows:
        print(f"| {r['layer']} | {r['alone_s']:.3f} | {r['scan_s_per_step']:.3f} |")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
