"""Wall time of one vmapped sweep over S seeds against S separate `unlearn` runs, end to end.

    python benchmarks/sweep_vs_separate.py [--shared ../shared] [--seeds 4] [--limit-batches 5]

Each side is timed as a user runs it: fresh processes, so data loading and compilation are
included (S compilations for the separate runs, one for the sweep). Writes
benchmarks/results/sweep_vs_separate.json and prints a table; the two sides' accuracies
are printed too (tests/test_sweep.py checks the parameters agree).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ibau_jax.results import write_atomic

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shared", default=os.environ.get("IBAU_SHARED", str(REPO.parent / "shared")))
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--limit-batches", type=int, default=5)
    args = ap.parse_args()
    sh = Path(args.shared)
    common = ["--checkpoint", str(sh / "ibau-original/checkpoints/badnets_8_02_ckpt.pth"),
              "--data-dir", str(sh / "datasets/cifar10"), "--no-download", "--attack", "badnets",
              "--target", "8", "--rounds", "1", "--limit-batches", str(args.limit_batches)]
    cli = [sys.executable, "-m", "ibau_jax.cli"]
    tmp = Path(tempfile.mkdtemp())

    t0 = time.perf_counter()
    separate = []
    for s in range(args.seeds):
        out = tmp / f"seed{s}.json"
        subprocess.run(cli + ["unlearn", *common, "--seed", str(s), "--out", str(out), "--quiet"],
                       check=True, stdout=subprocess.DEVNULL)
        separate.append(json.loads(out.read_text())["rounds"][0])
    separate_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    out = tmp / "sweep.json"
    subprocess.run(cli + ["sweep", *common, "--seed", "0", "--num-seeds", str(args.seeds),
                          "--chunk", str(args.seeds), "--out", str(out)], check=True, stdout=subprocess.DEVNULL)
    sweep_s = time.perf_counter() - t0
    rec = json.loads(out.read_text())["records"][0]

    result = {"seeds": args.seeds, "batches": args.limit_batches, "separate_s": separate_s, "sweep_s": sweep_s,
              "ratio_sweep_over_separate": sweep_s / separate_s, "cpu_count": os.cpu_count(),
              "separate_asr_all": [r["asr_all"] for r in separate], "sweep_record": rec}
    dest = REPO / "benchmarks/results/sweep_vs_separate.json"
    write_atomic(dest, json.dumps(result, indent=2) + "\n")
    print(f"| {args.seeds} seeds, {args.limit_batches} batches | wall s |\n|---|---|")
    print(f"| {args.seeds} separate `unlearn` runs | {separate_s:.1f} |")
    print(f"| one `sweep --num-seeds {args.seeds}` | {sweep_s:.1f} |")
    print(f"\nratio sweep / separate: {sweep_s / separate_s:.2f}; wrote {dest}")


if __name__ == "__main__":
    main()
