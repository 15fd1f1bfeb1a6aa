"""Round time and peak memory against the number of devices of the data-parallel mesh.

    python benchmarks/devices.py [--shared ../shared] [--devices 1 2 4 8] [--batches 3] [--batch-size 80]

Each device count runs in a fresh process. Without accelerators the devices are forced CPU
host devices (``XLA_FLAGS=--xla_force_host_platform_device_count=N``) that share this
machine's cores, so on CPU the figures show the overhead of partitioning, not a speed-up;
on a multi-GPU host pass ``--real`` to use the real devices. Peak memory: the process's
maximum resident set size, and the device allocator's peak where the backend reports it.
Writes benchmarks/results/devices_<backend>.json and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, sys, time
import jax, numpy as np
from ibau_jax import checkpoints, data, models, sharding
from ibau_jax.defenses import ibau
shared, n, batches, bs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
variables, _ = checkpoints.load_torch_checkpoint(shared + "/ibau-original/checkpoints/badnets_8_02_ckpt.pth")
test = data.load_cifar10(shared + "/datasets/cifar10", download=False)
x = data.to_float(test.x[: batches * bs])
xb, yb = data.batches(x, bs), data.batches(test.y[: batches * bs], bs)
cfg = ibau.IBAUConfig.faithful(batch_size=bs)
model = models.get_model("small_vgg", 10)
mesh = sharding.make_mesh(n)
masks = ibau.random_masks(jax.random.PRNGKey(0), batches, cfg)
rf = ibau.make_round(model, cfg, mesh=mesh)
p, b = variables["params"], variables["batch_stats"]
s = cfg.outer_tx().init(p)
t0 = time.perf_counter(); jax.block_until_ready(rf(p, b, s, xb, yb, masks)); first = time.perf_counter() - t0
t0 = time.perf_counter(); jax.block_until_ready(rf(p, b, s, xb, yb, masks)); run = time.perf_counter() - t0
stats = jax.devices()[0].memory_stats() or {}
print(json.dumps({"devices": mesh.size, "backend": jax.default_backend(), "first_call_s": first, "round_s": run,
                  "per_step_s": run / batches, "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "device_peak_bytes": stats.get("peak_bytes_in_use")}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shared", default=os.environ.get("IBAU_SHARED", str(REPO.parent / "shared")))
    ap.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--batches", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=80)
    ap.add_argument("--real", action="store_true", help="use the real devices (no forced CPU devices)")
    args = ap.parse_args()
    from ibau_jax.results import write_atomic

    rows = []
    for n in args.devices:
        env = dict(os.environ)
        if not args.real:
            env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n}"
        out = subprocess.run([sys.executable, "-c", CHILD, args.shared, str(n), str(args.batches),
                              str(args.batch_size)], env=env, check=True, capture_output=True, text=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"{n} devices: {rows[-1]['round_s']:.1f} s", flush=True)
    backend = rows[0]["backend"]
    dest = REPO / f"benchmarks/results/devices_{backend}{'' if args.real else '_forced'}.json"
    write_atomic(dest, json.dumps({"batches": args.batches, "batch_size": args.batch_size, "forced_host_devices":
                                   not args.real, "cpu_count": os.cpu_count(), "rows": rows}, indent=2) + "\n")
    print("| devices | first call s (incl. compile) | round s | per step s | max RSS MiB | device peak MiB |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        peak = f"{r['device_peak_bytes'] / 2**20:.0f}" if r["device_peak_bytes"] else "n/a"
        print(f"| {r['devices']} | {r['first_call_s']:.1f} | {r['round_s']:.1f} | {r['per_step_s']:.2f} | "
              f"{r['max_rss_mib']:.0f} | {peak} |")
    print(f"wrote {dest}")


if __name__ == "__main__":
    main()
