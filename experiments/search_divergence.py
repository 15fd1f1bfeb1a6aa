"""How far the JAX and PyTorch perturbation searches drift apart, batch by batch.

    python experiments/search_divergence.py [--shared ../shared]

Runs the original search (δ = 0; per batch one SGD step, lr 10, on −CE(f(x+δ), argmax f(x))
+ 0.001‖δ‖²) in ibau-jax and in the PyTorch reference side by side on the authors'
checkpoint, printing ‖δ_jax − δ_torch‖/‖δ_torch‖, ‖δ‖ and how many predicted labels differ.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))
import torch_ibau as ti  # noqa: E402

from ibau_jax import checkpoints, data, models  # noqa: E402
from ibau_jax.defenses import ibau  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shared", default=os.environ.get("IBAU_SHARED", str(REPO.parent / "shared")))
    shared = Path(ap.parse_args().shared)
    ckpt = shared / "ibau-original/checkpoints/badnets_8_02_ckpt.pth"
    variables, _ = checkpoints.load_torch_checkpoint(ckpt)
    logits = ibau.make_logits_fn(models.get_model("small_vgg", 10))
    params, bs = variables["params"], variables["batch_stats"]
    cfg = ibau.IBAUConfig.faithful()
    xb = data.batches(data.to_float(data.load_cifar10(shared / "datasets/cifar10", download=False).x[:5000]), 100)

    @jax.jit
    def step(d, x):
        fn = lambda p, z: logits(bs, p, z)
        d_new = ibau.search_perturbation(fn, params, x[None], jnp.zeros((1, x.shape[0]), jnp.int32), cfg,
                                         delta0=d)
        return d_new, jnp.argmax(fn(params, x), -1)

    model = ti.load_small_vgg(str(ckpt))
    dt = torch.zeros(1, 3, 32, 32, requires_grad=True)
    opt = torch.optim.SGD([dt], lr=cfg.search_lr)
    d = jnp.zeros((1, 32, 32, 3))
    print("| batch | rel. diff of δ | ‖δ‖ | label flips |\n|---|---|---|---|")
    for b, x in enumerate(xb):
        xt = torch.as_tensor(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
        with torch.no_grad():
            lt = model(xt).argmax(1)
        loss = -torch.nn.functional.cross_entropy(model(xt + dt), lt) + cfg.search_reg * dt.norm() ** 2
        opt.zero_grad()
        loss.backward()
        opt.step()
        d, lab = step(d, jnp.asarray(x))
        dn = dt.detach().numpy().transpose(0, 2, 3, 1)
        rel = np.linalg.norm(np.asarray(d) - dn) / np.linalg.norm(dn)
        print(f"| {b} | {rel:.2e} | {np.linalg.norm(dn):.1f} | {int((np.asarray(lab) != lt.numpy()).sum())} |")


if __name__ == "__main__":
    main()
