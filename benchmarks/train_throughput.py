"""Training throughput (images/s) of the small VGG: JAX train step vs an equivalent PyTorch loop.

    python benchmarks/train_throughput.py [--batch-size 128] [--steps 10] [--epochs 2]
                                          [--torch-steps 20] [--torch-threads 0] [--skip-torch]
                                          [--torch-device cpu|cuda]

What is timed, on CIFAR-sized random data (x uniform in [0, 1], shape (B, 32, 32, 3); 10 classes):

* ``jax step``: ``ibau_jax.training.train_step`` (jitted; BN in train mode, dropout, SGD momentum
  0.9 with the trainer's cosine schedule and decoupled weight decay 5e-4 on kernels), called
  ``--steps`` times from Python, the new state fed back each call;
* ``jax scan epoch``: ``ibau_jax.training.train_epoch``, i.e. ``--steps`` train steps inside one
  ``lax.scan`` (what the trainer runs), timed over ``--epochs`` epochs;
* ``torch``: ``experiments/torch_ibau.SmallVGG`` in ``model.train()``, ``torch.optim.SGD``
  (momentum 0.9, weight decay 5e-4), cross-entropy, zero_grad/backward/step, ``--torch-steps`` steps.

Augmentation is off on both sides (``crop_pad=0, flip=False``) so the work is the same. Warm-up
(one step / one epoch / two torch steps) is excluded; JAX compile time (``lower().compile()``) is
reported separately. Writes ``benchmarks/results/train_throughput_<backend>.json`` and prints a
markdown table with images/s and the JAX/PyTorch ratio.

What bounds the ratio on CPU: most of a step is convolution (forward, input gradient and
kernel gradient of six 3x3 convs). PyTorch runs those through oneDNN's kernels; XLA:CPU runs
its canonical NHWC/HWIO convolution as YNNPACK calls (110–220 GFLOP/s for these shapes in a
profile of the I-BAU round, docs/performance.md). With the chunked kernel gradient and the select-based max pooling and
``exp`` ELU of ``ibau_jax.models``, the scan epoch reached 0.97× PyTorch's images/s on the
idle 2-core CPU (2026-12-03, docs/results.md); before them it was 0.45×. Compare ratios from
one run only: when the cores are oversubscribed, PyTorch's thread pool degrades more than XLA's.

``--torch-device cuda`` runs the PyTorch loop on the GPU (for the GPU comparison; JAX uses its
default backend).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))

from ibau_jax import models, training  # noqa: E402
from ibau_jax.results import write_atomic  # noqa: E402


def block(tree):
    return jax.tree.map(lambda a: a.block_until_ready(), tree)


def bench_jax(x: np.ndarray, y: np.ndarray, batch: int, steps: int, epochs: int) -> dict:
    model = models.get_model("small_vgg", 10)
    config = training.TrainConfig(batch_size=batch, crop_pad=0, flip=False)
    state = training.create_state(model, config, steps_per_epoch=steps)
    xb, yb = jnp.asarray(x[:batch]), jnp.asarray(y[:batch])
    key = jax.random.PRNGKey(0)

    # --- plain jitted step
    t0 = time.perf_counter()
    step = training.train_step.lower(state, (xb, yb), key, crop_pad=0, flip=False).compile()
    step_compile = time.perf_counter() - t0
    state, m = step(state, (xb, yb), key)          # warm-up
    block(m)
    keys = jax.random.split(key, steps)
    t0 = time.perf_counter()
    for k in keys:
        state, m = step(state, (xb, yb), k)
    block((state.params, m))
    step_s = (time.perf_counter() - t0) / steps

    # --- an epoch of `steps` steps inside lax.scan (the trainer's path)
    xs, ys = jnp.asarray(x[: steps * batch]), jnp.asarray(y[: steps * batch])
    t0 = time.perf_counter()
    epoch = training.train_epoch.lower(state, xs, ys, key, batch_size=batch, crop_pad=0, flip=False).compile()
    epoch_compile = time.perf_counter() - t0
    state, m = epoch(state, xs, ys, key)           # warm-up
    block(m)
    t0 = time.perf_counter()
    for k in jax.random.split(key, epochs):
        state, m = epoch(state, xs, ys, k)
    block((state.params, m))
    epoch_s = (time.perf_counter() - t0) / epochs
    assert np.isfinite(float(m["loss"])), "JAX training diverged"
    return {
        "step": {"compile_s": step_compile, "s_per_step": step_s, "images_per_s": batch / step_s, "steps": steps},
        "scan_epoch": {"compile_s": epoch_compile, "s_per_epoch": epoch_s, "s_per_step": epoch_s / steps,
                       "images_per_s": steps * batch / epoch_s, "steps_per_epoch": steps, "epochs": epochs},
    }


def bench_torch(x: np.ndarray, y: np.ndarray, batch: int, steps: int, threads: int, device: str = "cpu") -> dict:
    import torch
    import torch_ibau

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = torch_ibau.SmallVGG(10).float().to(device)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    xb = torch.from_numpy(np.ascontiguousarray(x[:batch].transpose(0, 3, 1, 2))).to(device)
    yb = torch.from_numpy(y[:batch].astype(np.int64)).to(device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def one():
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(xb), yb)
        loss.backward()
        opt.step()
        return loss

    for _ in range(2):                              # warm-up
        one()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = one().detach()
    sync()
    s = (time.perf_counter() - t0) / steps
    assert np.isfinite(float(loss)), "PyTorch training diverged"
    return {"threads": torch.get_num_threads(), "device": device, "version": torch.__version__, "s_per_step": s,
            "images_per_s": batch / s, "steps": steps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10, help="timed jitted steps = steps per scan epoch")
    ap.add_argument("--epochs", type=int, default=2, help="timed scan epochs")
    ap.add_argument("--torch-steps", type=int, default=20)
    ap.add_argument("--torch-threads", type=int, default=0, help="0 = torch's default")
    ap.add_argument("--skip-torch", action="store_true")
    ap.add_argument("--torch-device", default="cpu", help="cpu, or cuda on a GPU machine")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    load_before = os.getloadavg()
    rng = np.random.default_rng(0)
    n = args.steps * args.batch_size
    x = rng.random((n, 32, 32, 3), dtype=np.float32)
    y = rng.integers(0, 10, n).astype(np.int32)

    result = {
        "model": "small_vgg", "batch_size": args.batch_size, "image_shape": [32, 32, 3], "classes": 10,
        "optimizer": "sgd momentum 0.9, wd 5e-4", "augmentation": False,
        "device": jax.devices()[0].device_kind, "backend": jax.default_backend(), "cpu_count": os.cpu_count(),
        "platform": platform.platform(), "jax_version": jax.__version__,
        "jax": bench_jax(x, y, args.batch_size, args.steps, args.epochs),
    }
    if not args.skip_torch:
        result["torch"] = bench_torch(x, y, args.batch_size, args.torch_steps, args.torch_threads,
                                      args.torch_device)
        t = result["torch"]["images_per_s"]
        result["ratio_jax_over_torch"] = {"step": result["jax"]["step"]["images_per_s"] / t,
                                          "scan_epoch": result["jax"]["scan_epoch"]["images_per_s"] / t}

    result["loadavg_1m"] = {"before": load_before[0], "after": os.getloadavg()[0]}
    backend = result["backend"]
    out_path = Path(args.out) if args.out else REPO / f"benchmarks/results/train_throughput_{backend}.json"
    write_atomic(out_path, json.dumps(result, indent=2) + "\n")

    j = result["jax"]
    tp = result.get("torch")
    ratio = lambda ips: f"{ips / tp['images_per_s']:.2f}" if tp else "-"
    print(f"small VGG train step, batch {args.batch_size}, device {result['device']} ({backend}, "
          f"{result['cpu_count']} cpus)")
    print("| implementation | s/step | images/s | JAX/PyTorch | compile s |")
    print("|---|---|---|---|---|")
    print(f"| JAX jitted step | {j['step']['s_per_step']:.3f} | {j['step']['images_per_s']:.0f} | "
          f"{ratio(j['step']['images_per_s'])} | {j['step']['compile_s']:.1f} |")
    print(f"| JAX scan epoch ({args.steps} steps) | {j['scan_epoch']['s_per_step']:.3f} | "
          f"{j['scan_epoch']['images_per_s']:.0f} | {ratio(j['scan_epoch']['images_per_s'])} | "
          f"{j['scan_epoch']['compile_s']:.1f} |")
    if tp:
        print(f"| PyTorch {tp['version']} ({tp['threads']} threads) | {tp['s_per_step']:.3f} | "
              f"{tp['images_per_s']:.0f} | 1.00 | - |")
    print(f"load average (1 min) before/after: {load_before[0]:.2f} / {result['loadavg_1m']['after']:.2f}")
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
