"""Data hyper-cleaning on CIFAR-10 features (Franceschi et al. 2017 setting, linear model).

A 10-class linear softmax classifier is trained on n examples of which a fraction has its
label replaced by a random other class. Inner: W*(s) = argmin Σ_i σ(s_i)·CE_i(W)/n + ½μ‖W‖²;
outer: clean-validation CE(W*(s)) over per-example logits s (n hyperparameters). For each
linear solver: hypergradient error vs ``dense`` at the start, time, and after ``--steps``
Adam steps on s: validation / test loss, test accuracy and the AUC of σ(s) at separating
clean (positive) from corrupted examples.

    .venv/bin/python experiments/bilevel/hyper_cleaning.py [--out runs/bilevel/hyper_cleaning.json]
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

from ibau_jax.hypergrad import make_solve, root_hypergrad  # noqa: E402

SOLVERS = [("dense", {}), ("cg", {}), ("normal_cg", {}), ("gmres", {}), ("bicgstab", {}),
           ("neumann", {"K": 5}), ("neumann", {"K": 50})]
C = 10


def auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve (Mann–Whitney U, ties counted half)."""
    pos, neg = scores[positive], scores[~positive]
    return float(((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum())
                 / (len(pos) * len(neg)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-train", type=int, default=1000)
    ap.add_argument("--n-val", type=int, default=500)
    ap.add_argument("--n-test", type=int, default=1000)
    ap.add_argument("--d", type=int, default=32)
    ap.add_argument("--noise", type=float, default=0.3)
    ap.add_argument("--mu", type=float, default=1e-2)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--lr", type=float, default=0.3)
    ap.add_argument("--out", default=str(REPO / "runs" / "bilevel" / "hyper_cleaning.json"))
    a = ap.parse_args()
    jax.config.update("jax_enable_x64", True)

    n, nv = a.n_train, a.n_val
    feats, labels = cifar_features(n + nv + a.n_test, a.d)
    feats = np.concatenate([feats, np.ones((len(feats), 1))], 1)        # bias feature
    rng = np.random.default_rng(0)
    corrupt = rng.random(n) < a.noise
    y_tr = labels[:n].copy()
    y_tr[corrupt] = (y_tr[corrupt] + rng.integers(1, C, corrupt.sum())) % C   # a different class
    X, Xv, Xt = (jnp.asarray(feats[:n]), jnp.asarray(feats[n:n + nv]), jnp.asarray(feats[n + nv:]))
    Y, Yv, Yt = (jax.nn.one_hot(y_tr, C), jax.nn.one_hot(labels[n:n + nv], C),
                 jax.nn.one_hot(labels[n + nv:], C))
    P = X.shape[1] * C

    ce = lambda W, A, B: -jnp.sum(B * jax.nn.log_softmax(A @ W.reshape(-1, C)), -1)
    inner = lambda w, s: jnp.mean(jax.nn.sigmoid(s) * ce(w, X, Y)) + 0.5 * a.mu * jnp.sum(w ** 2)
    outer = lambda w, s: jnp.mean(ce(w, Xv, Yv))
    F = jax.grad(inner)
    lip = 0.5 * float(np.linalg.eigvalsh(np.asarray(X.T @ X) / n).max()) + a.mu  # ≥ ‖∇²inner‖

    def solve_inner(s, w, iters=3):
        def newton(w, _):
            return w - jnp.linalg.solve(jax.hessian(inner)(w, s), F(w, s)), None
        return jax.lax.scan(newton, w, None, length=iters)[0]

    def make_hg(name, opts):
        solve = make_solve(name, K=opts.get("K", 5), step=1.0 / lip, tol=1e-8, maxiter=500)
        return jax.jit(lambda w, s: root_hypergrad(F, outer, w, s, solve, return_info=True))

    s0 = jnp.zeros(n)                       # σ(0) = ½ for everyone
    w0 = jax.jit(lambda s: solve_inner(s, jnp.zeros(P), 25))(s0)
    _, g_ref, _ = make_hg("dense", {})(w0, s0)
    opt = optax.adam(a.lr)
    acc = lambda w: float(jnp.mean(jnp.argmax(Xt @ w.reshape(-1, C), -1) == labels[n + nv:]))
    rows = [{"solver": "(start, all weights ½)", "hypergrad rel. err": 0.0, "rel. residual": 0.0,
             "ms / hypergrad": 0.0, "val loss": float(outer(w0, s0)),
             "test loss": float(jnp.mean(ce(w0, Xt, Yt))), "test acc": acc(w0), "AUC clean/corrupt": 0.5}]
    for name, opts in SOLVERS:
        hg = make_hg(name, opts)
        _, g0, info = hg(w0, s0)
        t = time_call(hg, w0, s0)
        s_f, w_f = hypergrad_descent(hg, solve_inner, opt, a.steps)(s0, w0)
        rows.append({"solver": name + "".join(f" {k}={v}" for k, v in opts.items()),
                     "hypergrad rel. err": rel_err(g0, g_ref),
                     "rel. residual": float(info.residual_norm / info.rhs_norm),
                     "ms / hypergrad": 1e3 * t, "val loss": float(outer(w_f, s_f)),
                     "test loss": float(jnp.mean(ce(w_f, Xt, Yt))), "test acc": acc(w_f),
                     "AUC clean/corrupt": auc(np.asarray(s_f), ~corrupt)})
    cols = list(rows[0])
    print(f"n={n} ({int(corrupt.sum())} corrupted), {P} inner parameters, {a.steps} Adam steps\n")
    print(markdown(rows, cols), flush=True)
    write_json(a.out, {"args": vars(a), "device": str(jax.devices()[0]), "rows": rows})
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
