"""L2-regulariser tuning by hypergradient descent on CIFAR-10 features (ridge and logistic).

Inner: w*(λ) = argmin  ℓ_train(w) + ½λ‖w‖²  (ridge: mean squared error on ±1 labels, solved
exactly by Cholesky; logistic: mean log-loss, solved by warm-started Newton). Outer: the
same loss on a validation split, over θ = log λ (scalar). For each linear solver: the
hypergradient's relative error against ``dense`` at the start, its time, the relative
residual, and the validation / test loss after ``--steps`` Adam steps on θ.

    .venv/bin/python experiments/bilevel/l2_tuning.py [--out runs/bilevel/l2_tuning.json]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, cifar_features, hypergrad_descent, markdown, rel_err, time_call, write_json  # noqa: E402

from ibau_jax.hypergrad import make_solve, root_hypergrad, unrolled_hypergrad  # noqa: E402

SOLVERS = [("dense", {}), ("cg", {}), ("normal_cg", {}), ("gmres", {}), ("bicgstab", {}),
           ("neumann", {"K": 5}), ("neumann", {"K": 100}), ("unrolled", {"T": 100})]


def make_problem(kind: str, X, y, Xv, yv):
    """(inner-loss, outer-loss, inner solver w(θ, w_init), smoothness bound L(θ) of ∇inner)."""
    n, d = X.shape
    lmax = float(np.linalg.eigvalsh(np.asarray(X.T @ X) / n).max())
    if kind == "ridge":
        loss = lambda w, A, b: 0.5 * jnp.mean((A @ w - b) ** 2)
        # Computed eagerly: inside jit XLA would constant-fold the 256×256 product slowly.
        gram, xty = X.T @ X / n, X.T @ y / n
        def solve_inner(th, w_init):
            return jnp.linalg.solve(gram + jnp.exp(th) * jnp.eye(d), xty)
        curv = lmax
    else:
        loss = lambda w, A, b: jnp.mean(jax.nn.softplus(-b * (A @ w)))
        def solve_inner(th, w_init, iters=4):
            def newton(w, _):
                p = jax.nn.sigmoid(y * (X @ w))
                g = -(X.T @ (y * (1 - p))) / n + jnp.exp(th) * w
                H = (X.T * (p * (1 - p))) @ X / n + jnp.exp(th) * jnp.eye(d)
                return w - jnp.linalg.solve(H, g), None
            return jax.lax.scan(newton, w_init, None, length=iters)[0]
        curv = 0.25 * lmax
    inner = lambda w, th: loss(w, X, y) + 0.5 * jnp.exp(th) * jnp.sum(w ** 2)
    outer = lambda w, th: loss(w, Xv, yv)
    return inner, outer, solve_inner, (lambda th: curv + jnp.exp(th)), loss


def hypergrad_fn(name: str, opts: dict, inner, outer, lip):
    F = jax.grad(inner)

    def hg(w, th):
        step = 1.0 / lip(th)                     # Richardson / GD step 1/L: J = I − H/L ⪰ 0
        if name == "unrolled":                   # T GD steps from 0, full backprop
            v, g = unrolled_hypergrad(lambda x, t: x - step * F(x, t), outer, jnp.zeros_like(w),
                                      th, opts["T"])
            return v, g, jnp.nan
        solve = make_solve(name, K=opts.get("K", 5), step=step, tol=1e-8, maxiter=500)
        v, g, info = root_hypergrad(F, outer, w, th, solve, return_info=True)
        return v, g, info.residual_norm / info.rhs_norm
    return jax.jit(hg)


def run(kind: str, steps: int, lr: float, n_train: int, n_val: int, d: int) -> list[dict]:
    feats, labels = cifar_features(n_train + 2 * n_val, d, classes=(0, 8))   # airplane vs ship
    y_all = jnp.asarray(np.where(labels == 1, 1.0, -1.0))
    F_all = jnp.asarray(feats)
    X, y = F_all[:n_train], y_all[:n_train]
    Xv, yv = F_all[n_train:n_train + n_val], y_all[n_train:n_train + n_val]
    Xt, yt = F_all[n_train + n_val:], y_all[n_train + n_val:]
    inner, outer, solve_inner, lip, loss = make_problem(kind, X, y, Xv, yv)
    th0 = jnp.asarray(np.log(1e-3))
    w0 = solve_inner(th0, jnp.zeros(d))
    if kind == "logreg":
        w0 = solve_inner(th0, w0, iters=30)     # polish to machine precision for the reference
    _, g_ref, _ = hypergrad_fn("dense", {}, inner, outer, lip)(w0, th0)

    opt = optax.adam(lr)
    rows = []
    for name, opts in SOLVERS:
        hg = hypergrad_fn(name, opts, inner, outer, lip)
        _, g0, rres = hg(w0, th0)
        t = time_call(hg, w0, th0)

        th_f, w_f = hypergrad_descent(hg, solve_inner, opt, steps)(th0, w0)
        label = name + "".join(f" {k}={v}" for k, v in opts.items())
        rows.append({"problem": kind, "solver": label, "hypergrad rel. err": rel_err(g0, g_ref),
                     "rel. residual": float(rres), "ms / hypergrad": 1e3 * t,
                     "final λ": float(jnp.exp(th_f)), "val loss": float(loss(w_f, Xv, yv)),
                     "test loss": float(loss(w_f, Xt, yt))})
    rows.insert(0, {"problem": kind, "solver": "(start, λ=1e-3)", "hypergrad rel. err": 0.0,
                    "rel. residual": 0.0, "ms / hypergrad": 0.0, "final λ": 1e-3,
                    "val loss": float(loss(w0, Xv, yv)), "test loss": float(loss(w0, Xt, yt))})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--lr", type=float, default=0.3)
    ap.add_argument("--n-train", type=int, default=600)
    ap.add_argument("--n-val", type=int, default=700)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--out", default=str(REPO / "runs" / "bilevel" / "l2_tuning.json"))
    a = ap.parse_args()
    jax.config.update("jax_enable_x64", True)
    cols = ["problem", "solver", "hypergrad rel. err", "rel. residual", "ms / hypergrad",
            "final λ", "val loss", "test loss"]
    allrows = []
    for kind in ("ridge", "logreg"):
        rows = run(kind, a.steps, a.lr, a.n_train, a.n_val, a.d)
        print(markdown(rows, cols), "\n", flush=True)
        allrows += rows
    write_json(a.out, {"args": vars(a), "device": str(jax.devices()[0]), "rows": allrows})
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
