"""Time the small VGG's weight-gradient convolutions on CPU, whole batch vs batch chunks.

    python benchmarks/conv_wgrad.py [--batch 100] [--reps 10]

For each conv layer of the small VGG (batch 100) it times ``conv.conv3x3_wgrad`` computed
as one canonical conv over the whole batch and as the sum of convs over chunks of c images
(c = 1, 2, 4, 10, 25), each jitted alone, and the forward conv for scale. Writes
benchmarks/results/conv_wgrad_<backend>.json and prints a markdown table (milliseconds).
Why it matters: docs/performance.md.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp

from ibau_jax.models import conv
from ibau_jax.results import write_atomic
from timing import best_seconds

REPO = Path(__file__).resolve().parents[1]
LAYERS = [(32, 3, 32), (32, 32, 32), (16, 32, 64), (16, 64, 64), (8, 64, 128), (8, 128, 128)]  # (H=W, Ci, Co)
CHUNKS = (1, 2, 4, 10, 25)


def wgrad_chunked(chunk: int):
    def f(x, dy):
        return sum(conv.wgrad_conv(x[i:i + chunk], dy[i:i + chunk]) for i in range(0, x.shape[0], chunk))
    return f


def ms(fn, *args, reps: int) -> float:
    return best_seconds(jax.jit(fn), *args, reps=reps) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    key = jax.random.PRNGKey(0)
    rows = []
    for hw, ci, co in LAYERS:
        x = jax.random.normal(key, (args.batch, hw, hw, ci))
        dy = jax.random.normal(key, (args.batch, hw, hw, co))
        w = jax.random.normal(key, (3, 3, ci, co))
        row = {"layer": f"{hw}x{hw} {ci}->{co}", "forward_ms": ms(conv.conv3x3, x, w, reps=args.reps),
               "wgrad_whole_batch_ms": ms(conv.wgrad_conv, x, dy, reps=args.reps),
               "wgrad_library_ms": ms(conv.conv3x3_wgrad, x, dy, reps=args.reps)}
        for c in CHUNKS:
            row[f"wgrad_chunk{c}_ms"] = ms(wgrad_chunked(c), x, dy, reps=args.reps)
        rows.append(row)
        print(row, flush=True)
    total = {k: sum(r[k] for r in rows) for k in rows[0] if k != "layer"}
    result = {"backend": jax.default_backend(), "cpu_count": os.cpu_count(), "batch": args.batch,
              "wgrad_chunk_in_library": conv.WGRAD_CHUNK, "rows": rows, "total": total}
    out = Path(args.out) if args.out else REPO / f"benchmarks/results/conv_wgrad_{result['backend']}.json"
    write_atomic(out, json.dumps(result, indent=2) + "\n")
    cols = ["forward_ms", "wgrad_whole_batch_ms"] + [f"wgrad_chunk{c}_ms" for c in CHUNKS] + ["wgrad_library_ms"]
    print("| layer | " + " | ".join(c.replace("_ms", "") for c in cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for r in rows + [{"layer": "total", **total}]:
        print(f"| {r['layer']} | " + " | ".join(f"{r[c]:.1f}" for c in cols) + " |")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
