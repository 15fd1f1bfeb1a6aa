"""DP-SGD training as a backdoor defense (Du, Jia & Song, ICLR 2020): the clean-accuracy / ASR
trade-off over noise levels on the bundled digits data.

Setting (as ``ibau-jax demo`` trains): scikit-learn's digits upsampled to 32x32, BadNets
target 0 with 10 % of the training images poisoned, SmallVGG(10, widths=(16, 32, 64)), SGD
momentum 0.9, lr 0.02 cosine, batch 64, crop padding 2, no flip, seed 0. Rows: no DP, then
DP-SGD (``training.TrainConfig(dp_noise=σ, dp_clip=C)``, the code path of
``ibau-jax attack --dp-noise σ --dp-clip C``) at each σ. Before training, the per-example
gradient norms of the freshly initialised model on one batch are printed and recorded (the
basis for choosing C: the usual recipe is C near their median, so clipping bounds the
outliers, poisoned examples among them, without shrinking the typical gradient).

    .venv/bin/python experiments/dp_tradeoff.py                       # defaults below
    .venv/bin/python experiments/dp_tradeoff.py --epochs 12 --sigmas 0.5 1 2 --clip 85

Writes experiments/results/dp_tradeoff.json and prints a markdown table. Every DP level
reuses one compiled epoch (σ and C are traced arguments of the step); the XLA compilation
cache in a temporary folder carries it from one run to the next.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="dp-tradeoff-xla-"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ibau_jax import attacks, models, rng, training  # noqa: E402
from ibau_jax.data import digits  # noqa: E402
from ibau_jax.training import dp  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "dp_tradeoff.json"


def init_grad_norms(model, config: training.TrainConfig, x: np.ndarray, y: np.ndarray, n: int) -> np.ndarray:
    """Per-example gradient norms (n,) of the freshly initialised model on its first n images,
    BatchNorm statistics of those n held fixed (the DP step's definition)."""
    state = training.create_state(model, config, 1, tuple(x.shape[1:]))
    xb, yb = jnp.asarray(x[:n]), jnp.asarray(y[:n])
    key = jax.random.PRNGKey(0)
    stats, _ = dp.batch_statistics(state.apply_fn, state.params, state.batch_stats, xb, key, {})
    loss = dp.frozen_bn_per_example_loss(state.apply_fn, stats)
    _, grads = jax.jit(lambda p: dp.per_example_grads(loss, p, xb, yb, jax.random.split(key, n)))(state.params)
    return np.asarray(dp.per_example_norms(grads))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=5, help="per run (the demo trains 12; 5 keeps the study < 8 min)")
    p.add_argument("--sigmas", type=float, nargs="+", default=[0.1, 0.3, 1.0])
    p.add_argument("--clip", type=float, default=50.0,
                   help="C; the per-example gradient norms at init have median ~85 (printed first), so "
                        "C = 50 clips most of them early and few once the loss is low")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args(argv)

    t_start = time.perf_counter()
    d = digits.load_digits_32(args.seed, 300, 300)
    streams = rng.streams(args.seed)
    attack = attacks.make_attack("badnets", num_classes=10, target=0, seed=streams.seed_of("trigger"))
    poisoned = attacks.poison_dataset(d.train_x, d.train_y, attack, 0.1, streams.seed_of("poison"))
    asr_x, asr_t, _ = attacks.asr_test_set(d.test_x, d.test_y, attack)
    eval_sets = training.EvalSets(d.test_x, d.test_y, asr_x, asr_t, d.test_y)
    model = models.SmallVGG(10, widths=(16, 32, 64))
    base = training.TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, crop_pad=2,
                                flip=False, seed=args.seed, eval_every=args.epochs)

    norms = init_grad_norms(model, base, poisoned.x, poisoned.y, args.batch_size)
    q = {f"q{int(100 * k)}": round(float(np.quantile(norms, k)), 4) for k in (0.1, 0.5, 0.9)}
    print(f"per-example gradient norms at init ({args.batch_size} images): {q}", flush=True)

    rows = []
    for sigma in [None, *args.sigmas]:
        config = dataclasses.replace(base, dp_noise=sigma, dp_clip=None if sigma is None else args.clip)
        t0 = time.perf_counter()
        state, history = training.train(model, poisoned.x, poisoned.y, config, eval_sets=eval_sets, quiet=True,
                                        log=lambda s: None)
        seconds = time.perf_counter() - t0
        m = history[-1]
        row = {"dp_noise": sigma, "dp_clip": config.dp_clip, "clean_acc": m["clean_acc"], "asr_all": m["asr_all"],
               "asr_nontarget": m["asr_nontarget"], "robust_acc": m["robust_acc"], "train_loss": m["loss"],
               "seconds": round(seconds, 1), "epoch_seconds": [h["seconds"] for h in history]}
        rows.append(row)
        print(f"σ {'-' if sigma is None else sigma:>4}  clean_acc {row['clean_acc']:.4f}  asr_all {row['asr_all']:.4f}"
              f"  asr_nontarget {row['asr_nontarget']:.4f}  ({seconds:.1f} s incl. compile)", flush=True)

    table = ["| σ (noise) | C (clip) | clean acc | ASR (all) | ASR (non-target) | seconds |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        table.append(f"| {'no DP' if r['dp_noise'] is None else r['dp_noise']} | {r['dp_clip'] or '–'} | "
                     f"{r['clean_acc']:.4f} | {r['asr_all']:.4f} | {r['asr_nontarget']:.4f} | {r['seconds']:.1f} |")
    print("\n".join(table))
    result = {"setting": {"data": "digits 32x32 (train %d / test %d)" % (len(d.train_y), len(d.test_y)),
                          "attack": "badnets", "target": 0, "poison_ratio": 0.1, "model": "SmallVGG(10, (16, 32, 64))",
                          "train": dataclasses.asdict(base), "jax_backend": jax.default_backend(),
                          "command": "python experiments/dp_tradeoff.py " + " ".join(argv or sys.argv[1:])},
              "init_grad_norms": q, "rows": rows, "table": "\n".join(table),
              "seconds": round(time.perf_counter() - t_start, 1)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out} ({result['seconds']:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
