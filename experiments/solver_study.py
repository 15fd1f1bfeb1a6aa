"""I-BAU solver study: how far each hypergradient solver is from the exact one, and what it does to a round.

    python experiments/solver_study.py --shared ../shared [--quick] [--out experiments/results/solver_study.json]

On the authors' BadNets checkpoint and the original CIFAR-10 split (clean set = test images
0..4999 in 50 batches of 100, clean accuracy on 5000..9999, ASR on BadNets-triggered 0..4999
relabelled to 8), with the faithful configuration (``IBAUConfig.faithful()``):

1. Setup: the round's perturbation search and L2 projection (``ibau.search_perturbation``,
   ``ibau.project_l2``) give δ; the hypergradient problem is the round's first one taken at
   outer batch 1: θ = the checkpoint, Φ(δ, θ) = ``ibau.fixed_point_map`` on inner batch 0
   (true labels, η = 0.1), L_outer = ``ibau.outer_loss`` on batch 1 with the faithful mask
   ``ibau.random_masks(PRNGKey(seed))[1]``.
2. Dense reference: J = ∂Φ/∂δ (3,072 × 3,072) column block by column block, by vmapped
   reverse-mode VJPs (the model's conv is ``custom_vjp``: no forward mode); A = I − J; the
   exact adjoint v* solves Aᵀ v = ∇_δ L_outer (LU, float64), the exact hypergradient is
   ∇_θ L_outer + (∂_θ Φ)ᵀ v*. The Jacobian is cached under ``runs/solver_study/`` block by
   block, so an interrupted run resumes there. Spectrum of A (symmetric part, eigenvalues
   of J, singular values) in float64.
3. Relative error ‖g − g*‖/‖g*‖ of the θ-hypergradient: Neumann K = 1..K_max (iterates from
   the dense J, checked against ``hypergrad.make_solve("neumann", K)`` through
   ``hypergrad.fixed_point_hypergrad`` at a few K); ``normal_cg`` / ``gmres`` / ``cg`` on the
   model at the round's caps, and the library's solvers (``bicgstab`` too) on the dense matrix
   for a sweep of ``maxiter`` (cheap; same arithmetic up to float32 rounding of the products).
   (Up to 2026-11-26 the library's ``normal_cg``, ``gmres`` and ``bicgstab`` were jaxopt's /
   jax.scipy's, which transpose the matvec and could not be traced on the model's
   ``custom_vjp`` conv; the JSON of that run records the error and the study used local
   equivalents. The library's own transpose-free solvers replaced them.) Also, for every
   outer batch at θ₀, the exact hypergradient against Neumann K=5 and K=20 (same A, one LU).
4. One whole faithful round (50 outer steps, ``ibau.make_round``) per solver setting, same
   masks: clean accuracy, ``asr_all``, ``asr_nontarget``, seconds. (A dense solve per outer step
   would cost 3,072 VJPs × 50 steps: not run; the JSON states the estimate.)

Writes the JSON atomically after every finished part (``--resume`` reuses finished rounds of
the same configuration), the plot ``docs/img/solver_study.png`` (``--plot``), and prints
markdown tables. ``--quick``: a smoke test on a reduced problem (batches of 2 images, 3
batches, K ≤ 10, 200 evaluation images; about 2 minutes on 2 cores) written under runs/;
its numbers mean nothing. ``--parts jacobian|dense|rounds`` runs pieces (they share the
Jacobian cache and, with ``--resume``, the JSON). Results: docs/solver_study.md.
``--report-only`` re-makes tables and plot from the JSON.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any


import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from ibau_jax import hypergrad
from ibau_jax.defenses import ibau

REPO = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------- settings

FULL = {
    "batch_size": 100, "portion": 0.01, "n_batches": 50, "n_eval": None, "k_max": 50,
    "neumann_check_K": [5, 20, 50], "jac_chunk": 16, "full_spectrum": True, "cg_on_model_maxiter": 20,
    "emulate_maxiter": {"normal_cg": [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000],
                        "gmres": [1, 2, 3, 5, 10, 25, 50],
                        "cg": [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000],
                        "bicgstab": [1, 2, 5, 10, 20, 50, 100, 200, 500]},
    # (label, IBAUConfig overrides): the original, and three settings of ~20 products per step
    "rounds": [("neumann K=5 (original)", {"solver": "neumann", "K": 5}),
               ("neumann K=20", {"solver": "neumann", "K": 20}),
               ("normal_cg maxiter=10", {"solver": "normal_cg", "solver_maxiter": 10}),
               ("gmres maxiter=1 (restart 20)", {"solver": "gmres", "solver_maxiter": 1})],
}
QUICK = {
    "batch_size": 2, "portion": 0.5, "n_batches": 3, "n_eval": 200, "k_max": 10,
    "neumann_check_K": [5, 10], "jac_chunk": 128, "full_spectrum": False, "cg_on_model_maxiter": 3,
    "emulate_maxiter": {"normal_cg": [1, 5], "gmres": [1], "cg": [1, 5], "bicgstab": [1, 5]},
    "rounds": [("neumann K=5 (original)", {"solver": "neumann", "K": 5}),
               ("normal_cg maxiter=3", {"solver": "normal_cg", "solver_maxiter": 3}),
               ("gmres maxiter=1 (restart 20)", {"solver": "gmres", "solver_maxiter": 1})],
}
TOL = 1e-6          # the library's default solver_tol (IBAUConfig); the emulation sweep uses EMU_TOL
EMU_TOL = 1e-7      # ~ float32 resolution: stop a converged Krylov solve instead of dividing 0 by 0


def _f(x: Any) -> float:
    return float(np.asarray(x))


def write_json(path: Path, result: dict) -> None:
    from ibau_jax.results import write_atomic

    write_atomic(path, json.dumps(result, indent=2) + "\n")


def flat(tree: Any) -> np.ndarray:
    """All leaves of a pytree as one float64 vector (order of jax.tree.leaves)."""
    return np.concatenate([np.asarray(a, np.float64).ravel() for a in jax.tree.leaves(tree)])


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


# ----------------------------------------------------------------------------- the study


class Study:
    def __init__(self, args: argparse.Namespace, s: dict):
        from ibau_jax import experiment, metrics

        self.args, self.s = args, s
        shared = Path(args.shared)
        ckpt = shared / "ibau-original/checkpoints/badnets_8_02_ckpt.pth"
        self.ckpt_sha = hashlib.sha256(ckpt.read_bytes()).hexdigest()
        # the original split, BadNets trigger, target 8 (experiment.load's defaults)
        exp = experiment.load(ckpt, data_dir=shared / "datasets/cifar10", download=False)
        self.cfg = ibau.IBAUConfig.faithful(batch_size=s["batch_size"], portion=s["portion"])
        self.xb, self.yb = map(jnp.asarray, exp.batches(s["batch_size"], s["n_batches"]))
        ne = s["n_eval"] or len(exp.acc_y)
        self.acc_x, self.acc_y = exp.acc_x[:ne], exp.acc_y[:ne]
        ne = s["n_eval"] or len(exp.clean_y)
        self.asr_x, self.asr_t, self.asr_true = exp.asr_x[:ne], exp.asr_t[:ne], exp.clean_y[:ne]
        self.model = exp.model
        self.params = jax.tree.map(jnp.asarray, exp.variables["params"])
        self.bs = jax.tree.map(jnp.asarray, exp.variables["batch_stats"])
        self.masks = ibau.random_masks(jax.random.PRNGKey(args.seed), self.xb.shape[0], self.cfg)
        self.metrics, self.ibau = metrics, ibau
        self.logits = ibau.make_logits_fn(self.model)

    # Φ and L_outer exactly as ibau.hypergradient builds them (arrays passed as arguments so
    # that XLA does not constant-fold the network over the data)
    def phi(self, bs, p, d, x_in, y_in):
        fn = lambda pp, x: self.logits(bs, pp, x)
        return self.ibau.fixed_point_map(fn, d, p, x_in, y_in, self.cfg.fp_step, self.cfg.inner_reg)

    def lout(self, bs, p, d, x, y, m):
        fn = lambda pp, xx: self.logits(bs, pp, xx)
        return self.ibau.outer_loss(fn, d, p, x, y, m)

    def evaluate(self, params) -> dict:
        return self.metrics.evaluate(self.model.apply, {"params": params, "batch_stats": self.bs},
                                     self.acc_x, self.acc_y, self.asr_x, self.asr_t, self.asr_true)

    def jacobian_key(self) -> str:
        """What J = ∂Φ/∂δ depends on (checkpoint, clean batches, configuration); δ is checked apart."""
        key = json.dumps({"ckpt": self.ckpt_sha, "cfg": repr(self.cfg), "batch_size": self.s["batch_size"],
                          "n_batches": self.s["n_batches"]}, sort_keys=True)
        return hashlib.sha256(key.encode()).hexdigest()[:16]

    def fingerprint(self) -> str:
        key = json.dumps({"s": {k: v for k, v in self.s.items()}, "seed": self.args.seed,
                          "ckpt": self.ckpt_sha, "cfg": repr(self.cfg)}, sort_keys=True, default=str)
        return hashlib.sha256(key.encode()).hexdigest()[:16]


def setup_problem(st: Study) -> dict:
    """δ by the round's search + projection, and the gradients of L_outer at (δ, θ₀)."""
    cfg = st.cfg

    @jax.jit
    def search(bs, p, xb, yb):
        fn = lambda pp, x: st.logits(bs, pp, x)
        return ibau.project_l2(ibau.search_perturbation(fn, p, xb, yb, cfg), cfg.radius)

    t0 = time.perf_counter()
    delta = jax.block_until_ready(search(st.bs, st.params, st.xb, st.yb))
    search_s = time.perf_counter() - t0
    prob = {"delta": delta, "x_in": st.xb[0], "y_in": st.yb[0], "x_out": st.xb[1], "y_out": st.yb[1],
            "mask": st.masks[1]}
    loss, (g_d, g_th) = jax.jit(lambda bs, p, d, x, y, m: jax.value_and_grad(
        lambda dd, pp: st.lout(bs, pp, dd, x, y, m), argnums=(0, 1))(d, p))(
        st.bs, st.params, delta, prob["x_out"], prob["y_out"], prob["mask"])
    prob.update(loss=float(loss), g_delta=g_d, g_theta=g_th)
    info = {"search_s": search_s, "delta_norm": _f(jax.numpy.linalg.norm(delta)),
            "perturbed_index_in_batch_1": int(np.flatnonzero(np.asarray(st.masks[1]))[0]),
            "outer_loss": float(loss), "grad_delta_norm": float(np.linalg.norm(flat(g_d))),
            "grad_theta_norm": float(np.linalg.norm(flat(g_th))),
            "n_theta": int(flat(g_th).size), "n_delta": int(np.asarray(delta).size)}
    return prob, info


def dense_jacobian(st: Study, prob: dict, cache: Path) -> tuple[np.ndarray, float]:
    """J = ∂Φ/∂δ (n × n, float32; row i = Jᵀ e_i, i.e. row i of J) by vmapped VJPs, cached."""
    from tqdm import tqdm

    from ibau_jax.checkpoints import atomic_write

    delta = prob["delta"]
    n = int(np.asarray(delta).size)
    chunk = st.s["jac_chunk"]
    nchunks = -(-n // chunk)
    dkey = hashlib.sha256(np.asarray(delta).tobytes()).hexdigest()
    rows = np.zeros((n, n), np.float32)
    done = 0
    elapsed_before = 0.0
    if cache.exists():
        z = np.load(cache, allow_pickle=False)
        if str(z["delta_sha"]) == dkey and z["rows"].shape == rows.shape:
            done = int(z["done"])
            rows[:done] = z["rows"][:done]
            elapsed_before = float(z["seconds"])
            print(f"jacobian: resuming from {cache} ({done}/{n} columns, {elapsed_before:.0f} s spent)")
        else:
            print(f"jacobian: cache {cache} is for another δ; recomputing")

    # one linearization of Φ in δ (its residuals are the VJP's leaves), then vmapped VJPs per block
    lin = jax.jit(lambda bs, p, d, x, y: jax.vjp(lambda dd: st.phi(bs, p, dd, x, y), d)[1])
    vjp_fn = lin(st.bs, st.params, delta, prob["x_in"], prob["y_in"])
    block = jax.jit(lambda f, e: jax.vmap(lambda c: f(c)[0])(e))

    def save(upto: int, seconds: float) -> None:
        def w(f):
            np.savez(f, rows=rows, done=np.int64(upto), delta_sha=np.str_(dkey), seconds=np.float64(seconds))
        atomic_write(cache, w)

    t0 = time.perf_counter()
    bar = tqdm(total=n, initial=done, unit="col", desc="dense ∂Φ/∂δ", dynamic_ncols=True, mininterval=5)
    last_save = time.perf_counter()
    for start in range(done - done % chunk, nchunks * chunk, chunk):
        idx = np.arange(start, start + chunk)
        eye = np.zeros((chunk, n), np.float32)
        eye[np.arange(chunk)[idx < n], idx[idx < n]] = 1.0
        out = np.asarray(block(vjp_fn, jnp.asarray(eye.reshape((chunk,) + delta.shape))))
        stop = min(start + chunk, n)
        rows[start:stop] = out.reshape(chunk, n)[: stop - start]
        bar.update(stop - max(start, done))
        done = stop
        if time.perf_counter() - last_save > 60 or done == n:
            save(done, elapsed_before + time.perf_counter() - t0)
            last_save = time.perf_counter()
    bar.close()
    return rows, elapsed_before + time.perf_counter() - t0


def counted(matvec, counter: list):
    """matvec that counts its (non-transposed) calls on the host."""
    def mv(u):
        jax.debug.callback(lambda: counter.__setitem__(0, counter[0] + 1))
        return matvec(u)
    return mv


def library_traces_on_model(st: Study, prob: dict, name: str) -> str:
    """Whether ``hypergrad.make_solve(name)`` can even be traced (lowered) on the model."""
    sol = hypergrad.make_solve(name, tol=TOL, maxiter=1)

    def f(bs, p, d, xi, yi, xo, yo, m):
        return hypergrad.fixed_point_hypergrad(lambda dd, pp: st.phi(bs, pp, dd, xi, yi),
                                               lambda dd, pp: st.lout(bs, pp, dd, xo, yo, m), d, p, sol)
    try:
        jax.jit(f).lower(st.bs, st.params, prob["delta"], prob["x_in"], prob["y_in"], prob["x_out"],
                         prob["y_out"], prob["mask"])
        return "ok"
    except NotImplementedError as e:
        return f"NotImplementedError: {str(e).splitlines()[0]}"


def library_hypergrad(st: Study, prob: dict, solve, operands: tuple = ()) -> tuple[np.ndarray, dict]:
    """θ-hypergradient through hypergrad.fixed_point_hypergrad with ``solve(matvec, b, *operands)``
    (operands: arrays passed into the compiled function), plus diagnostics."""
    counter = [0]

    def f(bs, p, d, xi, yi, xo, yo, m, ops):
        csolve = lambda matvec, b: solve(counted(matvec, counter), b, *ops)
        return hypergrad.fixed_point_hypergrad(lambda dd, pp: st.phi(bs, pp, dd, xi, yi),
                                               lambda dd, pp: st.lout(bs, pp, dd, xo, yo, m),
                                               d, p, csolve, return_info=True)

    args = (st.bs, st.params, prob["delta"], prob["x_in"], prob["y_in"], prob["x_out"], prob["y_out"], prob["mask"],
            tuple(operands))
    t0 = time.perf_counter()
    compiled = jax.jit(f).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    _, g, info = jax.block_until_ready(compiled(*args))
    run_s = time.perf_counter() - t0
    return flat(g), {"rel_residual": _f(info.residual_norm) / _f(info.rhs_norm),
                     "diverged_flag": bool(info.diverged), "matvecs": counter[0],
                     "compile_s": compile_s, "run_s": run_s}


def theta_implicit(st: Study, prob: dict, vs: np.ndarray, chunk: int = 8) -> np.ndarray:
    """Rows (float32): the implicit term (∂_θ Φ)ᵀ v of the hypergradient for each adjoint v
    (rows of vs, float64 → float32), flattened in ``jax.tree.leaves`` order."""
    from tqdm import tqdm

    lin = jax.jit(lambda bs, p, d, x, y: jax.vjp(lambda pp: st.phi(bs, pp, d, x, y), p)[1])
    vjp_fn = lin(st.bs, st.params, prob["delta"], prob["x_in"], prob["y_in"])
    apply = jax.jit(lambda f, V: jax.vmap(lambda v: ravel_pytree(f(v)[0])[0])(V))
    shape = prob["delta"].shape
    out = []
    for start in tqdm(range(0, len(vs), chunk), desc="(∂θΦ)ᵀv", unit="block", mininterval=10, dynamic_ncols=True):
        V = np.zeros((chunk,) + shape, np.float32)
        part = vs[start:start + chunk]
        V[: len(part)] = part.reshape((len(part),) + shape)
        out.append(np.asarray(apply(vjp_fn, jnp.asarray(V)))[: len(part)])
    return np.concatenate(out)


def theta_hypergrads(st: Study, prob: dict, vs: np.ndarray) -> np.ndarray:
    """Rows (float64): ∇_θ L_outer + (∂_θ Φ)ᵀ v for each adjoint v (rows of vs)."""
    return flat(prob["g_theta"])[None] + theta_implicit(st, prob, vs)


def per_batch_survey(st: Study, prob: dict, J: np.ndarray, result: dict) -> None:
    """At θ₀, for every outer batch b (its own mask; Φ on batch 0 as in the round): the exact
    hypergradient (dense LU, same A for all b) against Neumann K=5 and K=20."""
    n_b = st.xb.shape[0]
    t0 = time.perf_counter()

    @jax.jit
    def grads(bs, p, d, xb, yb, masks):
        def one(batch):
            x, y, m = batch
            loss, (gd, gt) = jax.value_and_grad(lambda dd, pp: st.lout(bs, pp, dd, x, y, m), argnums=(0, 1))(d, p)
            return loss, gd.reshape(-1), ravel_pytree(gt)[0]
        return jax.lax.map(one, (xb, yb, masks))

    loss, Gd, Gt = map(np.asarray, grads(st.bs, st.params, prob["delta"], st.xb, st.yb, st.masks))
    Gd, Gt = Gd.astype(np.float64), Gt.astype(np.float64)
    A = np.eye(J.shape[0]) - J
    V = {"exact": np.linalg.solve(A.T, Gd.T).T}
    v = Gd.copy()
    for K in range(1, 21):               # rows: v_{K+1}ᵀ = v_Kᵀ J + gᵀ
        if K in (5, 20):
            V[f"neumann K={K}"] = v.copy()
        v = v @ J + Gd
    names = list(V)
    imp = theta_implicit(st, prob, np.concatenate([V[k] for k in names])).astype(np.float64)
    imp = {k: imp[i * n_b:(i + 1) * n_b] for i, k in enumerate(names)}
    rows = []
    for b in range(n_b):
        g_star = Gt[b] + imp["exact"][b]
        row = {"batch": b, "outer_loss": float(loss[b]), "grad_delta_norm": float(np.linalg.norm(Gd[b])),
               "implicit_over_hypergrad": float(np.linalg.norm(imp["exact"][b]) / np.linalg.norm(g_star))}
        for k in names[1:]:
            row[f"{k} rel_err"] = rel(Gt[b] + imp[k][b], g_star)
            row[f"{k} implicit_rel_err"] = rel(imp[k][b], imp["exact"][b])
        rows.append(row)
    summ = {}
    for key in rows[0]:
        if key == "batch":
            continue
        vals = np.array([r[key] for r in rows])
        summ[key] = {"median": float(np.median(vals)), "mean": float(np.mean(vals)),
                     "min": float(vals.min()), "max": float(vals.max())}
    result["per_batch"] = {"rows": rows, "summary": summ, "seconds": time.perf_counter() - t0}
    print(f"per-batch survey ({n_b} outer batches): {time.perf_counter() - t0:.0f} s")


def jacobian_cache(st: Study) -> Path:
    return Path(st.args.cache_dir) / f"jacobian_{st.jacobian_key()}.npz"


def dense_part(st: Study, prob: dict, result: dict, save) -> None:
    s = st.s
    n = result["setup"]["n_delta"]
    cache = jacobian_cache(st)
    J32, jac_s = dense_jacobian(st, prob, cache)
    dense = {"jacobian_s": jac_s, "jacobian_cache": str(cache)}
    print(f"jacobian: {jac_s:.0f} s ({jac_s / n * 1e3:.0f} ms per column)")

    # ---- exact solve (float64 LU) and a float32 LU for comparison
    t0 = time.perf_counter()
    J = J32.astype(np.float64)
    A = np.eye(n) - J
    g = flat(prob["g_delta"])                      # ∇_δ L_outer, float64 copy of the float32 gradient
    v_star = np.linalg.solve(A.T, g)
    dense["solve64_s"] = time.perf_counter() - t0
    v32 = np.linalg.solve((np.eye(n, dtype=np.float32) - J32).T, g.astype(np.float32)).astype(np.float64)
    dense["adjoint_rel_diff_lu32_vs_lu64"] = rel(v32, v_star)
    dense["rel_residual_lu64"] = rel(A.T @ v_star, g)

    # ---- spectrum (float64)
    t0 = time.perf_counter()
    asym = np.linalg.norm(J - J.T) / np.linalg.norm(J)
    A_sym = (A + A.T) / 2                               # = η·(inner Hessian): J is symmetric up to rounding
    lam, U = np.linalg.eigh(A_sym)
    if s["full_spectrum"]:
        mu = np.linalg.eigvals(J)                        # J = ∂Φ/∂δ itself (nonsymmetric solver)
        sv = np.linalg.svd(A, compute_uv=False)
    else:                                                # quick: from the symmetric part only
        mu = 1.0 - lam
        sv = np.sort(np.abs(lam))[::-1]
    eta = st.cfg.fp_step
    dense["spectrum"] = {
        "seconds": time.perf_counter() - t0,
        "J_asymmetry_rel_fro": float(asym),
        "A_sym_eig_min": float(lam[0]), "A_sym_eig_max": float(lam[-1]),
        "A_sym_n_negative": int((lam < 0).sum()),
        "A_sym_eig_min_abs": float(np.abs(lam).min()),
        "A_sym_eig_smallest10": lam[:10].tolist(), "A_sym_eig_largest5": lam[-5:].tolist(),
        "A_sym_eig_quantiles_1_10_50_90_99": np.quantile(lam, [.01, .1, .5, .9, .99]).tolist(),
        "inner_hessian_eig_min": float(lam[0] / eta), "inner_hessian_eig_max": float(lam[-1] / eta),
        "J_spectral_radius": float(np.abs(mu).max()),
        "J_n_eig_abs_gt_1": int((np.abs(mu) > 1).sum()),
        "J_max_abs_imag": float(np.abs(mu.imag).max()),
        "A_sigma_max": float(sv[0]), "A_sigma_min": float(sv[-1]), "A_cond": float(sv[0] / sv[-1]),
        "neumann_diverges": bool(np.abs(mu).max() > 1),
        "A_sym_eig_smallest_abs5": np.sort(np.abs(lam))[:5].tolist(),
        "n_eig_abs_below_1e-3": int((np.abs(lam) < 1e-3).sum()), "n_eig_abs_below_1e-2": int((np.abs(lam) < 1e-2).sum()),
    }
    # where the exact adjoint lives: v* = Σ (u_iᵀ g / λ_i) u_i for the symmetric part
    coef = (U.T @ g) / lam
    order = np.argsort(np.abs(lam))
    share = np.cumsum(coef[order] ** 2) / np.sum(coef ** 2)
    dense["spectrum"]["adjoint_energy_in_smallest_abs_eig_1_10_100"] = [float(share[0]), float(share[9]), float(share[99])]
    v_sym = np.linalg.solve(A_sym, g)                   # the same solve with J symmetrised (a rounding-size change)
    dense["adjoint_rel_diff_symmetrised_J"] = rel(v_sym, v_star)
    sp = dense["spectrum"]
    print(f"spectrum: A_sym eig [{sp['A_sym_eig_min']:.3g}, {sp['A_sym_eig_max']:.3g}], "
          f"{sp['A_sym_n_negative']} negative; ρ(∂Φ/∂δ) = {sp['J_spectral_radius']:.6g}; cond(A) = {sp['A_cond']:.3g}")

    # ---- Neumann iterates v_1 = g, v_{K+1} = Jᵀ v_K + g (float64, from the dense J)
    vs, v = [], g.copy()
    for K in range(1, s["k_max"] + 1):
        vs.append(v)
        v = J.T @ v + g
    vs = np.stack(vs)

    # ---- the same library solvers on the dense matrix (cheap): a maxiter sweep
    AT32 = jnp.asarray((np.eye(n, dtype=np.float32) - J32).T)
    b = -jnp.asarray(g, jnp.float32)                     # root_vjp's right-hand side: −∂_δ L
    emu_rows, emu_vs = [], []
    for name, its in s["emulate_maxiter"].items():
        for m in its:
            counter = [0]
            solve = hypergrad.make_solve(name, tol=EMU_TOL, maxiter=m)
            t0 = time.perf_counter()
            u = np.asarray(jax.block_until_ready(solve(counted(lambda x: AT32 @ x, counter), b)), np.float64)
            vv = -u
            emu_rows.append({"solver": name, "maxiter": m, "matvecs": counter[0],
                             "adjoint_rel_err": rel(vv, v_star), "rel_residual": rel(A.T @ vv, g),
                             "finite": bool(np.isfinite(vv).all()), "seconds": time.perf_counter() - t0})
            emu_vs.append(np.nan_to_num(vv))

    print(f"krylov sweep on the dense matrix: {sum(r['seconds'] for r in emu_rows):.0f} s")
    # ---- θ-hypergradients of all those adjoints: one batched VJP pass
    t0 = time.perf_counter()
    G = theta_hypergrads(st, prob, np.concatenate([v_star[None], v32[None], vs, np.stack(emu_vs), v_sym[None]]))
    dense["hypergrad_rel_diff_symmetrised_J"] = rel(G[-1], G[0])
    dense["theta_vjp_s"] = time.perf_counter() - t0
    print(f"θ-hypergradients of {len(G)} adjoints: {dense['theta_vjp_s']:.0f} s")
    g_star = G[0]
    dense["exact_hypergrad_norm"] = float(np.linalg.norm(g_star))
    dense["hypergrad_rel_diff_lu32_vs_lu64"] = rel(G[1], g_star)
    dense["hypergrad_rel_err_of_grad_theta_only"] = rel(flat(prob["g_theta"]), g_star)  # v = 0
    dense["implicit_norm"] = float(np.linalg.norm(g_star - flat(prob["g_theta"])))
    dense["implicit_over_hypergrad"] = dense["implicit_norm"] / dense["exact_hypergrad_norm"]
    to_imp = dense["exact_hypergrad_norm"] / max(dense["implicit_norm"], 1e-300)   # error w.r.t. the implicit part
    result["dense"] = dense
    result["neumann"] = [{"K": K, "matvecs": K - 1, "hypergrad_rel_err": rel(G[2 + i], g_star),
                          "implicit_rel_err": rel(G[2 + i], g_star) * to_imp,
                          "implicit_over_grad_theta": rel(G[2 + i], flat(prob["g_theta"])),
                          "adjoint_rel_err": rel(vs[i], v_star), "rel_residual": rel(A.T @ vs[i], g),
                          "adjoint_norm": float(np.linalg.norm(vs[i]))}
                         for i, K in enumerate(range(1, s["k_max"] + 1))]
    off = 2 + len(vs)
    for i, r in enumerate(emu_rows):
        r["hypergrad_rel_err"] = rel(G[off + i], g_star) if r["finite"] else float("nan")
        r["implicit_rel_err"] = r["hypergrad_rel_err"] * to_imp
        r["implicit_over_grad_theta"] = rel(G[off + i], flat(prob["g_theta"]))
    result["krylov_dense_matvec"] = emu_rows
    save()

    # ---- the library on the model (the products a round uses): the exact dense check,
    # Neumann at a few K (checks the iterates above), and the round's Krylov settings
    lib = []

    def dense_from_matrix(matvec, bb, at):   # LU with our matrix; the library's residual checks it
        return jnp.linalg.solve(at, bb.reshape(-1)).reshape(bb.shape)

    gd, info = library_hypergrad(st, prob, dense_from_matrix, (AT32,))
    lib.append({"solver": "dense (our J, float32 LU)", "hypergrad_rel_err": rel(gd, g_star), **info})
    for K in s["neumann_check_K"]:
        sol = hypergrad.make_solve("neumann", K=K)
        gk, info = library_hypergrad(st, prob, lambda mv, bb: sol(mv, bb))
        lib.append({"solver": f"neumann K={K}", "K": K, "hypergrad_rel_err": rel(gk, g_star),
                    "rel_diff_to_dense_iterate": rel(gk, G[2 + K - 1]), **info})
    # the round's own hypergradient function at K=5 (ibau.hypergradient), for identity
    fn_round = jax.jit(lambda bs, p, d, xi, yi, xo, yo, m: st.ibau.hypergradient(
        lambda pp, x: st.logits(bs, pp, x), p, d, xi, yi, xo, yo, m, st.cfg))
    g5_round = flat(fn_round(st.bs, st.params, prob["delta"], prob["x_in"], prob["y_in"], prob["x_out"],
                             prob["y_out"], prob["mask"])[1])
    lib.append({"solver": "ibau.hypergradient (faithful, K=5)", "hypergrad_rel_err": rel(g5_round, g_star)})
    for label, over in s["rounds"]:
        if over["solver"] == "neumann":
            continue
        cfg = ibau.IBAUConfig.faithful(batch_size=s["batch_size"], portion=s["portion"], **over)
        sol = cfg.make_solve()
        gk, info = library_hypergrad(st, prob, lambda mv, bb, sol=sol: sol(mv, bb))
        lib.append({"solver": label, "tol": cfg.solver_tol, "maxiter": cfg.solver_maxiter,
                    "hypergrad_rel_err": rel(gk, g_star), **info})
    # cg needs no transpose (A is symmetric up to rounding here, but indefinite): same budget
    cg_m = s["cg_on_model_maxiter"]
    sol = hypergrad.make_solve("cg", tol=TOL, maxiter=cg_m)
    gk, info = library_hypergrad(st, prob, lambda mv, bb: sol(mv, bb))
    lib.append({"solver": f"cg maxiter={cg_m}", "tol": TOL, "maxiter": cg_m,
                "hypergrad_rel_err": rel(gk, g_star), **info})
    for r in lib:
        r["implicit_rel_err"] = r["hypergrad_rel_err"] * to_imp
        r["implicit_over_grad_theta"] = rel(G[off + i], flat(prob["g_theta"]))
    result["library_on_model"] = lib
    result["library_solvers_trace_on_model"] = {n: library_traces_on_model(st, prob, n)
                                                for n in ("cg", "normal_cg", "gmres", "bicgstab")}
    print("hypergrad.make_solve(...) on the model:", result["library_solvers_trace_on_model"])
    save()
    per_batch_survey(st, prob, J, result)
    # what a whole round with the dense solve would cost
    result["dense_round"] = {
        "run": False,
        "estimated_s": s["n_batches"] * jac_s,
        "why": f"a dense solve needs {n} VJPs of Φ per outer step ({jac_s:.0f} s here), "
               f"× {s['n_batches']} steps ≈ {s['n_batches'] * jac_s / 3600:.1f} h per round: not run",
    }
    save()


def rounds_part(st: Study, prob: dict, result: dict, save) -> None:
    from tqdm import tqdm

    s = st.s
    done = {r["label"] for r in result.get("rounds", [])}
    result.setdefault("rounds", [])
    for label, over in s["rounds"]:
        if label in done:
            print(f"round {label}: already in the JSON (--resume), skipped")
            continue
        cfg = ibau.IBAUConfig.faithful(batch_size=s["batch_size"], portion=s["portion"], **over)
        bar = tqdm(total=st.xb.shape[0], unit="step", desc=label, dynamic_ncols=True)
        round_fn = st.ibau.make_round(st.model, cfg, on_step=lambda loss: bar.update(1))
        opt_state = cfg.outer_tx().init(st.params)
        inputs = (st.params, st.bs, opt_state, st.xb, st.yb, st.masks)
        t0 = time.perf_counter()
        compiled = round_fn.lower(*inputs).compile()
        compile_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = jax.block_until_ready(compiled(*inputs))
        run_s = time.perf_counter() - t0
        bar.close()
        finite = all(bool(np.isfinite(np.asarray(a)).all()) for a in jax.tree.leaves(out.params))
        m = st.evaluate(out.params) if finite else {"clean_acc": float("nan"), "asr_all": float("nan"),
                                                     "asr_nontarget": float("nan")}
        row = {"label": label, "solver": cfg.solver, "K": cfg.K if cfg.solver == "neumann" else None,
               "maxiter": None if cfg.solver == "neumann" else cfg.solver_maxiter,
               "tol": None if cfg.solver == "neumann" else cfg.solver_tol,
               **m, "compile_s": compile_s, "run_s": run_s, "finite": finite,
               "mean_outer_loss": float(np.mean(np.asarray(out.losses))),
               "delta_rel_diff_to_study": rel(flat(out.delta), flat(prob["delta"]))}
        result["rounds"].append(row)
        print(f"round {label}: clean {m['clean_acc']:.4f}  asr_all {m['asr_all']:.4f}  "
              f"asr_nontarget {m['asr_nontarget']:.4f}  ({run_s:.0f} s + compile {compile_s:.0f} s)")
        save()


# ----------------------------------------------------------------------------- report

def tables(result: dict) -> str:
    out = []
    if "dense" in result:
        d, sp = result["dense"], result["dense"]["spectrum"]
        out += ["### Spectrum of A = I − ∂Φ/∂δ (3,072 × 3,072, float64)", "",
                "| quantity | value |", "|---|---|",
                f"| ‖J − Jᵀ‖_F / ‖J‖_F (J = ∂Φ/∂δ = I − η·∇²_δ L_inner) | {sp['J_asymmetry_rel_fro']:.2e} |",
                f"| eigenvalues of the symmetric part of A: min, max | {sp['A_sym_eig_min']:.4g}, {sp['A_sym_eig_max']:.4g} |",
                f"| … of which negative | {sp['A_sym_n_negative']} of {result['setup']['n_delta']} |",
                f"| inner Hessian ∇²_δ L_inner (= A_sym / η): min, max eigenvalue | "
                f"{sp['inner_hessian_eig_min']:.4g}, {sp['inner_hessian_eig_max']:.4g} |",
                f"| spectral radius of ∂Φ/∂δ; eigenvalues with modulus > 1 | {sp['J_spectral_radius']:.6g}; {sp['J_n_eig_abs_gt_1']} |",
                f"| Neumann series converges? | {'no (ρ > 1)' if sp['neumann_diverges'] else 'yes (ρ < 1)'} |",
                f"| singular values of A: max, min; condition number | {sp['A_sigma_max']:.4g}, {sp['A_sigma_min']:.3g}; {sp['A_cond']:.3g} |",
                f"| dense Jacobian (3,072 VJPs) / float64 LU + spectrum | {d['jacobian_s']:.0f} s / {d['solve64_s']:.1f} s + {sp['seconds']:.0f} s |",
                f"| float32 vs float64 LU: adjoint, hypergradient rel. diff | {d['adjoint_rel_diff_lu32_vs_lu64']:.2e}, {d['hypergrad_rel_diff_lu32_vs_lu64']:.2e} |",
                f"| smallest \\|eigenvalues\\| of A_sym; how many below 1e-3 / 1e-2 | "
                f"{', '.join(f'{x:.2g}' for x in sp.get('A_sym_eig_smallest_abs5', []))}; "
                f"{sp.get('n_eig_abs_below_1e-3', '')} / {sp.get('n_eig_abs_below_1e-2', '')} |",
                f"| share of ‖v*‖² in the 1 / 10 / 100 eigenvectors of smallest \\|eigenvalue\\| | "
                f"{', '.join(f'{x:.3g}' for x in sp.get('adjoint_energy_in_smallest_abs_eig_1_10_100', []))} |",
                f"| exact solve with J symmetrised (a change of rounding size): adjoint, hypergradient rel. diff | "
                f"{d.get('adjoint_rel_diff_symmetrised_J', float('nan')):.3g}, {d.get('hypergrad_rel_diff_symmetrised_J', float('nan')):.3g} |",
                ""]
        su = result["setup"]
        out += ["### Hypergradient at θ₀ (outer batch 1) against the exact dense solve", "",
                f"‖∇_δ L_outer‖ = {su['grad_delta_norm']:.3g}, ‖∇_θ L_outer‖ = {su['grad_theta_norm']:.3g}, "
                f"exact ‖g*‖ = {d['exact_hypergrad_norm']:.3g}, of which the implicit term (∂_θΦ)ᵀv* has norm "
                f"{d['implicit_norm']:.3g} ({d['implicit_over_hypergrad']:.3g} of ‖g*‖). "
                "Errors: ‖g − g*‖/‖g*‖ (hypergradient) and ‖g − g*‖/‖(∂_θΦ)ᵀv*‖ (implicit term).", "",
                "| method | products with (I − ∂Φ/∂δ)ᵀ | rel. error of hypergradient | rel. error of implicit term | rel. error of adjoint v | rel. residual | ‖implicit term‖ / ‖∇_θ L_outer‖ |",
                "|---|---|---|---|---|---|---|",
                f"| ∇_θ L_outer only (v = 0) | 0 | {d['hypergrad_rel_err_of_grad_theta_only']:.3g} | 1 | 1 | 1 | 0 |",
                f"| exact (dense LU, float64) | {result['setup']['n_delta']} | 0 | 0 | 0 | {d['rel_residual_lu64']:.2g} | "
                f"{d['implicit_norm'] / su['grad_theta_norm']:.3g} |"]
        ks = sorted({1, 2, 3, 4, 5, 10, 15, 20, 30, 40, 50} & {r["K"] for r in result["neumann"]})
        for r in result["neumann"]:
            if r["K"] in ks:
                out.append(f"| neumann K={r['K']}{' (original)' if r['K'] == 5 else ''} | {r['matvecs']} | "
                           f"{r['hypergrad_rel_err']:.3g} | {r['implicit_rel_err']:.3g} | {r['adjoint_rel_err']:.3g} | "
                           f"{r['rel_residual']:.3g} | {r.get('implicit_over_grad_theta', float('nan')):.3g} |")
        for r in result["krylov_dense_matvec"]:
            mult = " (+ as many with the transpose)" if r["solver"] == "normal_cg" else ""
            out.append(f"| {r['solver']} maxiter={r['maxiter']} (dense matrix) | {r['matvecs']}{mult} | "
                       f"{r['hypergrad_rel_err']:.3g} | {r['implicit_rel_err']:.3g} | {r['adjoint_rel_err']:.3g} | "
                       f"{r['rel_residual']:.3g} | {r.get('implicit_over_grad_theta', float('nan')):.3g} |")
        out.append("")
    if "library_on_model" in result:
        out += ["### The library on the model (VJPs through the network, as in a round)", "",
                "| solve | products (forward) | rel. error of hypergradient | rel. error of implicit term | rel. residual (library) | run s | compile s |",
                "|---|---|---|---|---|---|---|"]
        for r in result["library_on_model"]:
            res = f"{r['rel_residual']:.3g}" if "rel_residual" in r else ""
            extra = f" (≡ dense iterate to {r['rel_diff_to_dense_iterate']:.1e})" if "rel_diff_to_dense_iterate" in r else ""
            out.append(f"| {r['solver']}{extra} | {r.get('matvecs', '')} | {r['hypergrad_rel_err']:.3g} | "
                       f"{r['implicit_rel_err']:.3g} | {res} | "
                       f"{r.get('run_s', float('nan')):.1f} | {r.get('compile_s', float('nan')):.1f} |")
        out.append("")
        tr = result.get("library_solvers_trace_on_model", {})
        if tr:
            out += ["`hypergrad.make_solve(name)` traced on the model: " +
                    "; ".join(f"{k}: {v}" for k, v in tr.items()), ""]
    if "per_batch" in result:
        sm = result["per_batch"]["summary"]
        out += [f"### Every outer batch at θ₀ ({len(result['per_batch']['rows'])} batches, exact vs Neumann)", "",
                "| quantity | median | mean | min | max |", "|---|---|---|---|---|"]
        for k, v in sm.items():
            out.append(f"| {k} | {v['median']:.3g} | {v['mean']:.3g} | {v['min']:.3g} | {v['max']:.3g} |")
        rows = result["per_batch"]["rows"]
        nz = [r for r in rows if r["grad_delta_norm"] > 0]
        out += ["", f"{len(rows) - len(nz)} of {len(rows)} batches have ∇_δ L_outer = 0 exactly in float32 (the "
                "perturbed image's softmax saturates at its true label), so their implicit term is 0; over the "
                f"other {len(nz)}:", "", "| quantity | median | min | max |", "|---|---|---|---|"]
        for k in [k for k in rows[0] if k not in ("batch", "outer_loss", "grad_delta_norm")]:
            vals = np.array([r[k] for r in nz])
            out.append(f"| {k} | {np.median(vals):.3g} | {vals.min():.3g} | {vals.max():.3g} |")
        out.append("")
    if result.get("rounds"):
        b = result.get("before", {})
        out += [f"### One faithful round ({result['settings']['n_batches']} outer steps), seed {result['seed']}", "",
                "| solver | clean acc | asr_all | asr_nontarget | round s | compile s | δ rel. diff to study's δ |",
                "|---|---|---|---|---|---|---|"]
        if b:
            out.append(f"| (before: the checkpoint) | {b['clean_acc']:.4f} | {b['asr_all']:.4f} | {b['asr_nontarget']:.4f} | | | |")
        for r in result["rounds"]:
            out.append(f"| {r['label']} | {r['clean_acc']:.4f} | {r['asr_all']:.4f} | {r['asr_nontarget']:.4f} | "
                       f"{r['run_s']:.0f} | {r['compile_s']:.0f} | {r['delta_rel_diff_to_study']:.1e} |")
        if "dense_round" in result:
            out.append(f"| dense (exact) | not run: {result['dense_round']['why']} | | | | | |")
        out.append("")
    return "\n".join(out)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if "neumann" not in result:
        return
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    ks = [r["K"] for r in result["neumann"]]
    ax.semilogy(ks, [r["hypergrad_rel_err"] for r in result["neumann"]], "o-", ms=3, label="neumann K")
    ax.semilogy(ks, [r["implicit_rel_err"] for r in result["neumann"]], "--", color="C0", alpha=.6,
                label="neumann K, relative to the implicit term")
    ax.axvline(5, color="grey", lw=.8, ls=":")
    ax.annotate("K=5 (original)", (5, 1), xycoords=("data", "axes fraction"), xytext=(3, -12),
                textcoords="offset points", fontsize=8, color="grey")
    colors = {"normal_cg": "C1", "gmres": "C2", "cg": "C3", "bicgstab": "C4"}
    for r in result.get("library_on_model", []):
        name = r["solver"].split()[0]
        if name in ("normal_cg", "gmres"):
            ax.axhline(r["hypergrad_rel_err"], color=colors[name], ls="-",
                       label=f"{r['solver']} (products: {r['matvecs']}{' + transposes' if name == 'normal_cg' else ''})")
    v0 = result["dense"]["hypergrad_rel_err_of_grad_theta_only"]
    for a in (ax, ax2):
        a.axhline(v0, color="k", lw=.8, ls="--", label=f"v = 0 (∇θ L_outer only): {v0:.3g}")
    ax.set_xlabel("K (Neumann steps)")
    ax.set_ylabel("relative error of the θ-hypergradient g")
    ax.set_title("solid: ‖g − g*‖/‖g*‖; dashed: ‖g − g*‖/‖(∂θΦ)ᵀv*‖", fontsize=9)
    fig.suptitle("I-BAU hypergradient at θ₀ (authors' checkpoint, outer batch 1) against the exact dense solve",
                 fontsize=11)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(0.0, 0.93))
    ax.grid(True, which="both", alpha=.3)
    ax2.semilogy([r["matvecs"] for r in result["neumann"]], [r["hypergrad_rel_err"] for r in result["neumann"]],
                 "o-", ms=3, label="neumann")
    for name, c in colors.items():
        rows = [r for r in result["krylov_dense_matvec"] if r["solver"] == name and r["finite"]]
        if rows:
            ax2.semilogy([r["matvecs"] for r in rows], [r["hypergrad_rel_err"] for r in rows], "s-", ms=3,
                         color=c, label=name + (" (forward products)" if name == "normal_cg" else ""))
    ax2.set_xscale("symlog", linthresh=10)
    ax2.set_xlabel("products with (I − ∂Φ/∂δ)ᵀ per solve")
    ax2.set_ylabel("‖g − g*‖ / ‖g*‖")
    ax2.set_title("library solvers on the dense matrix (maxiter sweep); y zoomed to 0.5–5", fontsize=10)
    ax2.set_ylim(0.5, 5)
    ax2.legend(fontsize=8)
    ax2.grid(True, which="both", alpha=.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, dpi=110)
    plt.close(fig)
    from ibau_jax.checkpoints import atomic_write

    atomic_write(path, lambda f: f.write(buf.getvalue()))


# ----------------------------------------------------------------------------- main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shared", default=os.environ.get("IBAU_SHARED", str(REPO.parent / "shared")))
    ap.add_argument("--quick", action="store_true", help="reduced smoke test (numbers mean nothing)")
    ap.add_argument("--out", default=None,
                    help="JSON (default experiments/results/solver_study.json; --quick: runs/solver_study/quick.json)")
    ap.add_argument("--plot", default=None, help="PNG (default docs/img/solver_study.png; quick: next to the JSON)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--parts", default="dense,rounds", help="comma list of dense, rounds; or 'jacobian' alone: only fill the cache")
    ap.add_argument("--resume", action="store_true", help="keep finished parts/rounds of the same configuration")
    ap.add_argument("--cache-dir", default=str(REPO / "runs/solver_study"), help="dense Jacobian cache")
    ap.add_argument("--report-only", action="store_true", help="tables and plot from the JSON, no computation")
    args = ap.parse_args()
    out = Path(args.out) if args.out else (REPO / "runs/solver_study/quick.json" if args.quick
                                           else REPO / "experiments/results/solver_study.json")
    png = Path(args.plot) if args.plot else (out.with_suffix(".png") if args.quick else REPO / "docs/img/solver_study.png")

    if args.report_only:
        result = json.loads(out.read_text())
        plot(result, png)
        print(tables(result))
        print(f"wrote {png}")
        return

    t_start = time.perf_counter()
    s = QUICK if args.quick else FULL
    st = Study(args, s)
    if set(args.parts.split(",")) == {"jacobian"}:   # only fill the Jacobian cache; a run then resumes from it
        prob, _ = setup_problem(st)
        _, sec = dense_jacobian(st, prob, jacobian_cache(st))
        print(f"jacobian cached in {jacobian_cache(st)}: {sec:.0f} s")
        return
    result = None
    if args.resume and out.exists():
        old = json.loads(out.read_text())
        if old.get("fingerprint") == st.fingerprint():
            result = old
            print(f"resuming {out}")
        else:
            print(f"{out} holds another configuration; starting over")
    if result is None:
        result = {"command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]), "quick": args.quick,
                  "seed": args.seed, "fingerprint": st.fingerprint(),
                  "settings": {k: v for k, v in s.items()}, "ibau_config": repr(st.cfg),
                  "machine": {"backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
                              "cpu_count": os.cpu_count(), "platform": platform.platform(),
                              "jax": jax.__version__}}
    result.setdefault("wall_s", {})
    result.setdefault("runs", []).append({"command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
                                          "started": time.strftime("%Y-%m-%d %H:%M:%S")})

    def save() -> None:
        result["runs"][-1]["wall_s"] = time.perf_counter() - t_start
        if out.exists():   # keep rounds that another run of the same configuration (--parts) wrote meanwhile
            try:
                disk = json.loads(out.read_text())
            except (OSError, ValueError):
                disk = {}
            if disk.get("fingerprint") == result["fingerprint"]:
                have = {r["label"] for r in result.get("rounds", [])}
                extra = [r for r in disk.get("rounds", []) if r["label"] not in have]
                if extra:
                    order = [label for label, _ in s["rounds"]]
                    result["rounds"] = sorted(result.get("rounds", []) + extra,
                                              key=lambda r: order.index(r["label"]) if r["label"] in order else 99)
                # every other run's record as that run last wrote it (on disk), this run's from memory
                this = result["runs"][-1]
                runs = {(r["command"], r["started"]): r for r in result["runs"][:-1]}
                runs.update({(r["command"], r["started"]): r for r in disk.get("runs", [])})
                runs[(this["command"], this["started"])] = this
                result["runs"] = sorted(runs.values(), key=lambda r: r["started"])
                for k, v in disk.get("wall_s", {}).items():
                    result["wall_s"].setdefault(k, v)
        write_json(out, result)

    if "before" not in result:
        result["before"] = st.evaluate(st.params)
    prob, info = setup_problem(st)
    result["setup"] = info
    print(f"setup: ‖δ‖ = {info['delta_norm']:.4f}, search {info['search_s']:.0f} s (incl. compile)")
    save()
    parts = set(args.parts.split(","))
    if "dense" in parts:
        t0 = time.perf_counter()
        dense_part(st, prob, result, save)
        result["wall_s"]["dense_part"] = time.perf_counter() - t0
        save()
        plot(result, png)
        print(tables({k: v for k, v in result.items() if k != "rounds"}))
    if "rounds" in parts:
        t0 = time.perf_counter()
        rounds_part(st, prob, result, save)
        result["wall_s"]["rounds_part"] = time.perf_counter() - t0
    save()
    plot(result, png)
    print(tables(result))
    print(f"wrote {out} and {png}; {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
