"""Where a faithful I-BAU round spends its time, op by op, from JAX's profiler (CPU).

    python benchmarks/profile_round.py [--shared ../shared] [--batches 6]

Compiles a faithful round over the first ``--batches`` batches (``ibau.make_round``),
runs it once to warm up, then once under ``jax.profiler.trace`` and reads the trace that
jaxlib writes (``*.trace.json.gz``; no TensorBoard or xprof needed). It reports

- time per op category (XLA fusion kinds with their numeric suffix removed; on CPU the
  convolutions are ``ynn_fusion`` ops, YNNPACK calls), and
- for every convolution shape: calls, time and achieved GFLOP/s
  (2 · output elements · window size · contracted input features per call).

Op times are summed over the threads that ran them (independent ops run concurrently),
so their total exceeds the wall time. Writes benchmarks/results/profile_round_<backend>.json
and prints two markdown tables. Why it matters: docs/performance.md.
"""
from __future__ import annotations

import argparse
import collections
import gzip
import json
import math
import os
import re
import tempfile
import time
from pathlib import Path

import jax

from ibau_jax import models
from ibau_jax.defenses import ibau
from ibau_jax.results import write_atomic
from model_pieces import faithful_round_inputs  # benchmarks/ is on sys.path when run as a script

REPO = Path(__file__).resolve().parents[1]


def conv_table(hlo: str) -> dict[str, dict]:
    """{fusion op name: {'shape': description, 'flops': per call}} for each convolution fusion."""
    shapes = dict(re.findall(r"%(\S+) = f32\[([\d,]+)\]", hlo))
    convs = {}
    for m in re.finditer(r"^%(fused_computation[\.\d]*) \(.*?\n(.*?)^}", hlo, re.S | re.M):
        c = re.search(r"= f32\[([\d,]+)\]\S* convolution\(%(\S+), %(\S+)\), window=\{size=(\d+)x(\d+)[^}]*\}, "
                      r"dim_labels=([^,\s]+)", m.group(2))
        if c:
            convs[m.group(1)] = c
    out = {}
    for op, comp in re.findall(r"%(\S+) = [^\n]*? calls=%(fused_computation[\.\d]*)", hlo):
        c = convs.get(comp)
        if c is None:
            continue
        o = [int(v) for v in c.group(1).split(",")]
        lhs = [int(v) for v in shapes[c.group(2)].split(",")]
        rhs = [int(v) for v in shapes[c.group(3)].split(",")]
        labels = c.group(6)
        f_in = lhs[labels.split("_")[0].index("f")]
        window = int(c.group(4)) * int(c.group(5))
        out[op] = {"shape": f"{lhs} * {rhs} -> {o} ({labels})", "flops": 2 * math.prod(o) * window * f_in}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shared", default=os.environ.get("IBAU_SHARED", str(REPO.parent / "shared")))
    ap.add_argument("--batches", type=int, default=6)
    ap.add_argument("--top", type=int, default=15, help="rows of each table")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    cfg = ibau.IBAUConfig.faithful()
    inputs = faithful_round_inputs(Path(args.shared), args.batches, cfg)
    compiled = ibau.make_round(models.get_model("small_vgg", 10), cfg).lower(*inputs).compile()
    jax.block_until_ready(compiled(*inputs))  # warm-up: first-run allocations stay out of the profile
    with tempfile.TemporaryDirectory() as logdir:
        t0 = time.perf_counter()
        with jax.profiler.trace(logdir):
            jax.block_until_ready(compiled(*inputs))
        wall = time.perf_counter() - t0
        trace_file, = Path(logdir).glob("plugins/profile/*/*.trace.json.gz")
        with gzip.open(trace_file) as f:
            events = json.load(f)["traceEvents"]

    convs = conv_table(compiled.as_text())
    by_kind: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    by_conv: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0, 0.0])
    for e in events:
        name = e.get("name", "")
        # complete events of compiled ops only (runtime bookkeeping and Python frames have these shapes)
        if e.get("ph") != "X" or name.startswith(("$", "end:")) or "::" in name or " " in name:
            continue
        kind = re.sub(r"\.\d+$", "", name)
        by_kind[kind][0] += e["dur"] / 1e6
        by_kind[kind][1] += 1
        if name in convs:
            row = by_conv[convs[name]["shape"]]
            row[0] += e["dur"] / 1e6
            row[1] += 1
            row[2] += convs[name]["flops"]
    op_total = sum(v[0] for v in by_kind.values())
    conv_total = sum(v[0] for v in by_conv.values())
    result = {
        "backend": jax.default_backend(), "jax_version": jax.__version__, "batches": args.batches,
        "wall_s": wall, "op_seconds_total": op_total, "conv_seconds_total": conv_total,
        "conv_gflops_per_op_second": sum(v[2] for v in by_conv.values()) / max(conv_total, 1e-12) / 1e9,
        "kinds": {k: {"seconds": v[0], "calls": v[1]} for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1][0])},
        "convolutions": {k: {"seconds": v[0], "calls": v[1], "gflops_per_s": v[2] / v[0] / 1e9}
                         for k, v in sorted(by_conv.items(), key=lambda kv: -kv[1][0])},
    }
    out_path = Path(args.out) if args.out else REPO / f"benchmarks/results/profile_round_{result['backend']}.json"
    write_atomic(out_path, json.dumps(result, indent=2) + "\n")

    print(f"{args.batches} batches: wall {wall:.2f} s, op time {op_total:.2f} s (summed over threads), "
          f"convolutions {conv_total:.2f} s ({100 * conv_total / op_total:.0f} %) at "
          f"{result['conv_gflops_per_op_second']:.0f} GFLOP/s\n")
    print("| op kind | s | % of op time | calls |\n|---|---|---|---|")
    for k, v in list(result["kinds"].items())[: args.top]:
        print(f"| {k} | {v['seconds']:.3f} | {100 * v['seconds'] / op_total:.1f} | {v['calls']} |")
    print("\n| convolution (lhs * rhs -> out) | s | % of conv time | calls | GFLOP/s |\n|---|---|---|---|---|")
    for k, v in list(result["convolutions"].items())[: args.top]:
        print(f"| {k} | {v['seconds']:.3f} | {100 * v['seconds'] / conv_total:.1f} | {v['calls']} | "
              f"{v['gflops_per_s']:.0f} |")
    print(f"\nwrote {out_path}")


if __name__ == "__main__":
    main()
