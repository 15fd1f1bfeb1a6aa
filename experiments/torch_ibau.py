"""Independent PyTorch implementation of I-BAU (Zeng et al., ICLR 2022).

Written from ``shared/ALGORITHM.md``; used as the parity reference for the JAX
implementation (``tests/``) and as the PyTorch baseline in benchmarks. Two organisations
of the same computation: ``structure='lean'`` (one outer backward pass, no multiplication
of the zero vector) and ``structure='original'`` (the authors' code's organisation, whose
extra work is what benchmarks/round_time.py times as the original's cost).

Conventions at the public boundary: numpy in / numpy out, images NHWC float
in [0, 1] (transposed internally to NCHW), perturbation ``delta`` of shape
(1, H, W, C).  Every function works for any ``nn.Module`` that maps an NCHW
batch to logits, in float32 or float64 (inputs are cast to the model's dtype).

The math (η = ``eta``, λ = ``reg``):

    L_inner(δ, θ) = mean_i −CE(f_θ(x_inner_i + δ), y_inner_i) + λ‖δ‖₂²
    Φ(δ, θ)       = δ − η ∇_δ L_inner(δ, θ)
    L_outer(δ, θ) = mean_i CE(f_θ(x_outer_i + m_i δ), y_outer_i),  m_i ∈ {0, 1}
    v_0 = 0,  v_{k+1} = (∂Φ/∂δ)ᵀ v_k + ∇_δ L_outer            (k = 0..K−1)
    hypergradient = ∇_θ L_outer + (∂Φ/∂θ)ᵀ v_K

Run as a script to perform I-BAU rounds on one of the authors' CIFAR-10 checkpoints (default
BadNets; the split and triggered images of the other two come from ``ibau_jax.experiment.load``,
the round itself is all PyTorch):

    python experiments/torch_ibau.py --shared ../shared --rounds 1 --seed 0 --out r.json
    python experiments/torch_ibau.py --checkpoint l2_inv --rounds 1 --seed 0 --out r.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------


class SmallVGG(nn.Module):
    """The authors' "small VGG16": NCHW (N, 3, 32, 32) -> logits (N, num_classes).

    ``features`` indices: 0..5 [conv32, BN, ELU]x2, 6 maxpool, 7 dropout(0.3),
    8..13 [conv64, BN, ELU]x2, 14 maxpool, 15 dropout(0.4),
    16..21 [conv128, BN, ELU]x2, 22 maxpool, 23 dropout(0.4);
    ``classifier`` = Linear(128·4·4 = 2048, num_classes) on the NCHW flatten.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = in_channels
        for c_out, p_drop in ((32, 0.3), (64, 0.4), (128, 0.4)):
            for _ in range(2):
                layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ELU()]
                c_in = c_out
            layers += [nn.MaxPool2d(2, 2), nn.Dropout(p_drop)]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(2048, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.features(x)
        return self.classifier(out.view(out.size(0), -1))


def small_vgg(num_classes: int = 10) -> nn.Module:
    """A freshly initialised small VGG, float32, CPU, eval mode."""
    return SmallVGG(num_classes).float().eval()


def load_small_vgg(path, num_classes: int = 10) -> nn.Module:
    """Small VGG with the state_dict stored under key 'net' of the checkpoint at ``path``."""
    model = small_vgg(num_classes)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(ckpt["net"])
    return model.float().eval()


# ----------------------------------------------------------------------------
# numpy <-> torch helpers
# ----------------------------------------------------------------------------


def _dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _nchw(model: nn.Module, x_nhwc) -> torch.Tensor:
    """numpy/tensor NHWC -> contiguous NCHW tensor in the model's dtype, on the model's device."""
    x = torch.as_tensor(np.asarray(x_nhwc)).to(device=_device(model), dtype=_dtype(model))
    return x.permute(0, 3, 1, 2).contiguous()


def _nhwc_np(t: torch.Tensor) -> np.ndarray:
    return t.detach().permute(0, 2, 3, 1).contiguous().cpu().numpy()


def _labels(y, device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.as_tensor(np.asarray(y)).long().to(device)


def _trainable(model: nn.Module) -> tuple[list[str], list[torch.Tensor]]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [n for n, _ in named], [p for _, p in named]


def logits(model: nn.Module, x_nhwc, batch_size: int = 500) -> np.ndarray:
    """f(x) for x NHWC (N, H, W, C) -> (N, num_classes) numpy, no grad."""
    x = _nchw(model, x_nhwc)
    with torch.no_grad():
        return torch.cat([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]).cpu().numpy()


def evaluate(model: nn.Module, x_nhwc, y, batch_size: int = 500) -> float:
    """Top-1 accuracy of ``model`` on (x NHWC in [0,1], y int labels)."""
    pred = logits(model, x_nhwc, batch_size).argmax(axis=1)
    return float(np.mean(pred == np.asarray(y)))


def badnets(x_nhwc: np.ndarray) -> np.ndarray:
    """BadNets trigger: a copy of x (N, 32, 32, C) with rows/cols 27..30 set to 1, all channels."""
    out = np.array(x_nhwc, copy=True)
    out[:, 27:31, 27:31, :] = 1.0
    return out


# ----------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------


def inner_loss(model: nn.Module, delta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, reg: float) -> torch.Tensor:
    """L_inner(δ, θ) = mean_i −CE(f(x_i + δ), y_i) + reg·‖δ‖₂².  x NCHW, δ (1, C, H, W)."""
    return -F.cross_entropy(model(x + delta), y) + reg * delta.pow(2).sum()


def outer_loss(model: nn.Module, delta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """L_outer(δ, θ) = mean_i CE(f(x_i + m_i δ), y_i).  mask m: (N, 1, 1, 1) of 0/1."""
    return F.cross_entropy(model(x + mask * delta), y)


def _mask(n: int, perturbed_idx, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    m = torch.zeros(n, 1, 1, 1, dtype=dtype)
    m[torch.as_tensor(np.asarray(perturbed_idx, dtype=np.int64)).reshape(-1)] = 1.0
    return m.to(device)


# ----------------------------------------------------------------------------
# Hypergradient (K-step fixed point, Grazzi et al. 2020)
# ----------------------------------------------------------------------------


def _hypergradient(model, params, delta, x_o, y_o, mask, x_i, y_i, K, eta, reg) -> list[torch.Tensor]:
    """Torch core of :func:`hypergradient`.  All tensors NCHW; returns grads aligned with ``params``."""
    delta = delta.detach().requires_grad_(True)

    # ∇_θ L_outer and ∇_δ L_outer at (δ, θ).
    lo = outer_loss(model, delta, x_o, y_o, mask)
    g_outer = torch.autograd.grad(lo, params + [delta], allow_unused=True)
    g_theta = [torch.zeros_like(p) if g is None else g for p, g in zip(params, g_outer[:-1])]
    g_delta = torch.zeros_like(delta) if g_outer[-1] is None else g_outer[-1]

    phi = _fixed_point_map(model, delta, x_i, y_i, eta, reg)

    # v_{k+1} = (∂Φ/∂δ)ᵀ v_k + ∇_δ L_outer, v_0 = 0  (vector-Jacobian products through Φ);
    # v_1 = ∇_δ L_outer exactly, so the VJP of the zero vector is skipped.
    v = g_delta
    for _ in range(K - 1):
        v = torch.autograd.grad(phi, delta, grad_outputs=v, retain_graph=True)[0] + g_delta

    return _plus_implicit_term(phi, params, v, g_theta)


def _fixed_point_map(model, delta, x_i, y_i, eta, reg) -> torch.Tensor:
    """Φ(δ, θ) = δ − η ∇_δ L_inner, kept differentiable in δ and θ (δ must require grad)."""
    g_inner = torch.autograd.grad(inner_loss(model, delta, x_i, y_i, reg), delta, create_graph=True)[0]
    return delta - eta * g_inner


def _plus_implicit_term(phi, params, v, g_theta) -> list[torch.Tensor]:
    """∇_θ L_outer + (∂Φ/∂θ)ᵀ v_K, aligned with ``params``."""
    implicit = torch.autograd.grad(phi, params, grad_outputs=v, allow_unused=True)
    return [g + (0.0 if h is None else h.detach()) for g, h in zip(g_theta, implicit)]


def _hypergradient_original(model, params, delta, x_o, y_o, mask, x_i, y_i, K, eta, reg,
                            tol: float = 1e-10) -> list[torch.Tensor]:
    """The same K-step hypergradient, computed with the original code's structure.

    Same math as :func:`_hypergradient`, but organised as the authors' hypergrad module is
    (ALGORITHM.md; issue 2 describes its costs), so that benchmarks can time it:
    ∇_δ L_outer and ∇_θ L_outer come from two separate backward passes over a retained
    graph; the iteration starts from v_0 = 0, so its first VJP multiplies a zero vector;
    after every iteration the norm ‖v_k − v_{k−1}‖ is read on the host and the loop stops
    early below ``tol`` (1e-10, in practice never).
    """
    delta = delta.detach().requires_grad_(True)
    lo = outer_loss(model, delta, x_o, y_o, mask)
    g_delta = torch.autograd.grad(lo, delta, retain_graph=True, allow_unused=True)[0]
    g_delta = torch.zeros_like(delta) if g_delta is None else g_delta
    g_theta = torch.autograd.grad(lo, params, retain_graph=True, allow_unused=True)
    g_theta = [torch.zeros_like(p) if g is None else g for p, g in zip(params, g_theta)]

    phi = _fixed_point_map(model, delta, x_i, y_i, eta, reg)
    v = torch.zeros_like(delta)
    for _ in range(K):
        v_prev = v
        v = torch.autograd.grad(phi, delta, grad_outputs=v, retain_graph=True)[0] + g_delta
        if float(torch.norm(v - v_prev)) < tol:  # a host synchronisation per iteration
            break
    return _plus_implicit_term(phi, params, v, g_theta)


def hypergradient(model: nn.Module, delta_nhwc, x_outer, y_outer, perturbed_idx, x_inner, y_inner,
                  K: int = 5, eta: float = 0.1, reg: float = 1e-3, structure: str = "lean") -> dict[str, np.ndarray]:
    """K-step fixed-point hypergradient of L_outer wrt the model's trainable parameters.

    delta_nhwc (1, H, W, C); x_outer/x_inner (N, H, W, C); y_* (N,) int; perturbed_idx:
    indices i of the outer batch with m_i = 1.  Returns {state_dict name: array} in
    PyTorch layout (conv OIHW, linear (out, in)).  Does not modify the model.
    ``structure``: 'lean' (one outer backward pass) or 'original' (the authors' structure,
    :func:`_hypergradient_original`); the two agree to rounding.
    """
    _, hg = _structure(structure)
    names, params = _trainable(model)
    x_o, x_i = _nchw(model, x_outer), _nchw(model, x_inner)
    dev = _device(model)
    mask = _mask(x_o.shape[0], perturbed_idx, x_o.dtype, dev)
    grads = hg(model, params, _nchw(model, delta_nhwc), x_o, _labels(y_outer, dev), mask,
               x_i, _labels(y_inner, dev), K, eta, reg)
    return {n: g.detach().cpu().numpy().copy() for n, g in zip(names, grads)}


# ----------------------------------------------------------------------------
# One I-BAU round
# ----------------------------------------------------------------------------


def _zero_perturbation(x_nchw: torch.Tensor) -> torch.Tensor:
    """δ = 0 of shape (1, C, H, W) for batches like ``x_nchw``, requiring grad."""
    return torch.zeros((1,) + tuple(x_nchw.shape[1:]), dtype=x_nchw.dtype, device=x_nchw.device,
                       requires_grad=True)


def _perturbation_search(model, x_batches_nchw, lr, reg) -> torch.Tensor:
    """δ = 0; per batch: y = argmax f(x); one SGD step (lr) on −CE(f(x+δ), y) + reg‖δ‖₂²."""
    delta = _zero_perturbation(x_batches_nchw[0])
    opt = torch.optim.SGD([delta], lr=lr)
    for x in x_batches_nchw:
        with torch.no_grad():
            y_pred = model(x).argmax(dim=1)
        loss = -F.cross_entropy(model(x + delta), y_pred) + reg * delta.pow(2).sum()
        delta.grad = torch.autograd.grad(loss, delta)[0]  # θ.grad untouched
        opt.step()
    return delta.detach()


def _perturbation_search_original(model, x_batches_nchw, lr, reg) -> torch.Tensor:
    """:func:`_perturbation_search` with the original code's structure (same δ, more work):
    the label forward pass records an autograd graph, and ``loss.backward()`` computes the
    gradients of every model parameter too (accumulated in ``.grad``, cleared here after)."""
    delta = _zero_perturbation(x_batches_nchw[0])
    opt = torch.optim.SGD([delta], lr=lr)
    for x in x_batches_nchw:
        y_pred = torch.argmax(model(x), dim=1).long()
        loss = -F.cross_entropy(model(x + delta), y_pred) + reg * torch.pow(torch.norm(delta), 2)
        opt.zero_grad()
        loss.backward(retain_graph=True)
        opt.step()
    for p in model.parameters():
        p.grad = None
    return delta.detach()


# structure -> (perturbation search, hypergradient): two organisations of the same computation
_STRUCTURES = {"lean": (_perturbation_search, _hypergradient),
               "original": (_perturbation_search_original, _hypergradient_original)}
STRUCTURES = tuple(_STRUCTURES)


def _structure(structure: str):
    if structure not in _STRUCTURES:
        raise ValueError(f"unknown structure {structure!r}; choose one of {', '.join(STRUCTURES)}")
    return _STRUCTURES[structure]


def perturbation_search(model: nn.Module, x_clean_batches, lr: float = 10.0, reg: float = 1e-3) -> np.ndarray:
    """Inner max, one SGD pass over the batches (each (N, H, W, C)).  Returns δ (1, H, W, C)."""
    delta = _perturbation_search(model, [_nchw(model, x) for x in x_clean_batches], lr, reg)
    return _nhwc_np(delta)


def project_l2(delta, radius: float = 10.0):
    """δ · min(1, radius / ‖δ‖₂)  (whole-tensor L2 norm; numpy or torch)."""
    norm = float((delta ** 2).sum() ** 0.5)
    return delta * min(1.0, radius / norm) if norm > 0 else delta


def make_optimizer(model: nn.Module, lr: float = 1e-3) -> torch.optim.Optimizer:
    """The outer optimizer of the original: Adam(model.parameters(), lr), PyTorch defaults otherwise."""
    return torch.optim.Adam(model.parameters(), lr=lr)


def unlearn_round(model: nn.Module, x_clean_batches, y_clean_batches, perturbed_idx_per_batch,
                  K: int = 5, eta: float = 0.1, reg: float = 1e-3, outer_lr: float = 1e-3,
                  search_lr: float = 10.0, radius: float | None = 10.0, optimizer=None,
                  progress: bool = False, adam_state=None, structure: str = "lean"):
    """One I-BAU round, modifying ``model`` in place.

    1. δ ← perturbation_search (SGD lr ``search_lr``, predicted labels);
    2. δ ← project_l2(δ, radius) unless radius is None;
    3. for each batch b: one Adam(``outer_lr``) step on θ with the hypergradient whose inner
       batch is batch 0 with its TRUE labels and outer batch is b, perturbed at
       ``perturbed_idx_per_batch[b]``; δ stays fixed.

    ``optimizer`` (or its alias ``adam_state``): a torch optimizer over model.parameters(),
    e.g. ``make_optimizer(model)``; pass the same one every round to keep Adam's moments
    across rounds, as the original does.  None: a fresh Adam(``outer_lr``) for this round.
    ``structure``: 'lean' (default) or 'original': the same round organised as the original
    code is (:func:`_perturbation_search_original`, :func:`_hypergradient_original`), to time
    the original's cost on the same data; results agree to rounding.
    Returns (delta NHWC (1, H, W, C) numpy, timings) with timings = {'search_s': float,
    'unlearn_s': float, 'step_s': [seconds per hypergradient+Adam step]}.
    """
    search, hg = _structure(structure)
    optimizer = optimizer if optimizer is not None else adam_state
    if optimizer is None:
        optimizer = make_optimizer(model, outer_lr)
    model.eval()
    xs = [_nchw(model, x) for x in x_clean_batches]
    ys = [_labels(y, _device(model)) for y in y_clean_batches]
    sync = torch.cuda.synchronize if _device(model).type == "cuda" else (lambda: None)  # honest timings
    _, params = _trainable(model)

    t0 = time.perf_counter()
    delta = search(model, xs, search_lr, reg)
    if radius is not None:
        delta = project_l2(delta, radius)
    sync()
    t_search = time.perf_counter() - t0

    steps = range(len(xs))
    if progress:
        from tqdm import tqdm
        steps = tqdm(steps, desc="unlearn", leave=False)
    step_times = []
    t1 = time.perf_counter()
    for b in steps:
        ts = time.perf_counter()
        mask = _mask(xs[b].shape[0], perturbed_idx_per_batch[b], xs[b].dtype, xs[b].device)
        grads = hg(model, params, delta, xs[b], ys[b], mask, xs[0], ys[0], K, eta, reg)
        optimizer.zero_grad(set_to_none=True)
        for p, g in zip(params, grads):
            p.grad = g.detach()
        optimizer.step()
        sync()
        step_times.append(time.perf_counter() - ts)
    t_unlearn = time.perf_counter() - t1

    timings = {"search_s": t_search, "unlearn_s": t_unlearn, "step_s": step_times}
    return _nhwc_np(delta), timings


# ----------------------------------------------------------------------------
# Script
# ----------------------------------------------------------------------------


# the authors' CIFAR-10 checkpoints in ../shared/ibau-original/checkpoints: file, target class
CHECKPOINTS = {"badnets": ("badnets_8_02_ckpt.pth", 8), "trojan_sq": ("trojan_sq_2_02_ckpt.pth", 2),
               "l2_inv": ("l2_inv_0_02_ckpt.pth", 0)}


def _write_json_atomic(path: str, obj) -> None:
    path = os.path.abspath(path)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp_", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description="PyTorch I-BAU baseline on the authors' CIFAR-10 checkpoints")
    ap.add_argument("--shared", default=os.environ.get("IBAU_SHARED", "../shared"))
    ap.add_argument("--checkpoint", choices=sorted(CHECKPOINTS), default="badnets")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit-batches", type=int, default=None, help="use only the first B of the 50 batches")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--K", type=int, default=5)
    ap.add_argument("--no-projection", action="store_true", help="skip the L2 projection (as defense.py)")
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--structure", choices=STRUCTURES, default="lean",
                    help="'original': organise the round as the authors' code does (for timing)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    shared = Path(args.shared)
    file, target = CHECKPOINTS[args.checkpoint]
    model = load_small_vgg(shared / "ibau-original" / "checkpoints" / file)
    if args.checkpoint == "badnets":
        data = np.load(shared / "datasets" / "cifar10" / "test.npz")
        x = data["x"].astype(np.float32) / 255.0
        y = data["y"].astype(np.int64)
        x_clean, y_clean = x[:5000], y[:5000]
        x_acc, y_acc = x[5000:], y[5000:]
        x_asr, y_asr = badnets(x_clean), np.full(5000, 8, dtype=np.int64)
    else:  # the same original split; the trigger applied by ibau-jax's attack (a data step only)
        from ibau_jax import experiment
        e = experiment.load(shared / "ibau-original" / "checkpoints" / file, data_dir=shared / "datasets" / "cifar10",
                            attack=args.checkpoint, target=target, trigger_dir=shared / "ibau-original" / "triggers",
                            download=False)
        x_clean, y_clean, x_acc, y_acc = e.clean_x, e.clean_y.astype(np.int64), e.acc_x, e.acc_y.astype(np.int64)
        x_asr, y_asr = e.asr_x, e.asr_t.astype(np.int64)
    nb = 50 if args.limit_batches is None else min(50, args.limit_batches)
    xb = [x_clean[100 * i:100 * (i + 1)] for i in range(nb)]
    yb = [y_clean[100 * i:100 * (i + 1)] for i in range(nb)]
    rng = np.random.default_rng(args.seed)

    def measure():
        return {"acc": evaluate(model, x_acc, y_acc), "asr": evaluate(model, x_asr, y_asr)}

    before = measure()
    print(f"before: acc {before['acc']:.4f}  asr {before['asr']:.4f}", flush=True)
    result = {"framework": "torch", "torch_version": torch.__version__, "threads": torch.get_num_threads(),
              "checkpoint": args.checkpoint, "seed": args.seed, "batches": nb, "K": args.K, "structure": args.structure, "projection": not args.no_projection,
              "before": before, "rounds": []}
    optimizer = make_optimizer(model, 1e-3)  # one Adam for all rounds, as in the original
    for r in range(args.rounds):
        idx = [rng.integers(0, 100, size=1) for _ in range(nb)]
        delta, tm = unlearn_round(model, xb, yb, idx, K=args.K, radius=None if args.no_projection else 10.0,
                                  optimizer=optimizer, progress=args.progress, structure=args.structure)
        after = measure()
        steps = tm["step_s"]
        rec = {"round": r, "acc": after["acc"], "asr": after["asr"], "search_s": tm["search_s"],
               "unlearn_s": tm["unlearn_s"], "round_s": tm["search_s"] + tm["unlearn_s"],
               "step_s_mean": float(np.mean(steps)), "step_s_median": float(np.median(steps)),
               "step_s": [float(t) for t in steps],
               "delta_l2": float(np.sqrt((delta.astype(np.float64) ** 2).sum())),
               "perturbed_idx": [int(i[0]) for i in idx]}
        result["rounds"].append(rec)
        print(f"round {r}: acc {after['acc']:.4f}  asr {after['asr']:.4f}  round {rec['round_s']:.1f}s "
              f"(search {tm['search_s']:.1f}s, unlearn {tm['unlearn_s']:.1f}s, "
              f"{rec['step_s_median']:.3f}s/step median)", flush=True)
        _write_json_atomic(args.out, result)
    _write_json_atomic(args.out, result)
    return result


if __name__ == "__main__":
    main()
