"""Bilevel-optimisation reference tests for ibau_jax.hypergrad (float64).

Solvers against a dense LU solve on random SPD / symmetric-indefinite / nonsymmetric systems;
hypergradients against CENTRAL FINITE DIFFERENCES of the outer objective (inner problems
solved exactly or by Newton to machine precision) on ridge and logistic-regression L2 tuning;
unrolled and truncated-unrolled differentiation; divergence diagnostics; jit / vmap /
grad-of-grad. Every test runs under ``jax.enable_x64`` (autouse fixture).
"""
from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ibau_jax.hypergrad import (HypergradInfo, HypergradWarning, check_info, fixed_point_hypergrad,
                                make_solve, neumann, root_hypergrad, solve_with_info,
                                unrolled_hypergrad)

F64 = jnp.float64
ITERATIVE = ("cg", "normal_cg", "gmres", "bicgstab")


@pytest.fixture(autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


def rel_err(a, b) -> float:
    a = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(a)])
    b = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(b)])
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


# --------------------------------------------------------------------------------------------
# 1. Linear solvers on random systems, against dense LU
# --------------------------------------------------------------------------------------------

def random_system(kind: str, n: int = 20, seed: int = 0):
    """(A, b, step) with A SPD (eigs in [0.5, 10]), symmetric indefinite (6 eigs in [-5, -0.5])
    or nonsymmetric (3I + 0.3·N(0,1)); ``step`` is a Richardson step (1/ρ(A), or 0.25)."""
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    if kind == "spd":
        A = Q @ np.diag(np.linspace(0.5, 10.0, n)) @ Q.T
    elif kind == "indefinite":
        A = Q @ np.diag(np.r_[np.linspace(-5.0, -0.5, 6), np.linspace(0.5, 10.0, n - 6)]) @ Q.T
    else:
        A = 3.0 * np.eye(n) + 0.3 * rng.normal(size=(n, n))
    if kind != "nonsymmetric":
        A = 0.5 * (A + A.T)
    step = 0.25 if kind == "nonsymmetric" else 1.0 / np.abs(np.linalg.eigvals(A)).max()
    return A, rng.normal(size=n), step


def run_solver(name, A, b, step, K=3000):
    Aj = jnp.asarray(A)
    solve = make_solve(name, K=K, step=step, tol=1e-12, maxiter=1000)
    # pytree unknowns: split the vector into a dict of two leaves to exercise tree handling
    split = lambda v: {"a": v[:7], "b": v[7:].reshape(-1, 1)}
    join = lambda t: jnp.concatenate([t["a"], t["b"].ravel()])
    mv = lambda t: split(Aj @ join(t))
    x, info = jax.jit(lambda bb: solve_with_info(solve, mv, bb))(split(jnp.asarray(b)))
    return np.asarray(join(x)), info


# Which solvers must be exact where: cg needs symmetry (it happens to converge on this
# indefinite system, but has no guarantee there), neumann needs ρ(I − step·A) < 1.
APPLIES = {"spd": ("dense", "neumann") + ITERATIVE,
           "indefinite": ("dense", "normal_cg", "gmres", "bicgstab"),
           "nonsymmetric": ("dense", "neumann", "normal_cg", "gmres", "bicgstab")}


@pytest.mark.parametrize("kind,name", [(k, n) for k, ns in APPLIES.items() for n in ns])
def test_solver_vs_dense(kind, name):
    A, b, step = random_system(kind)
    x_ref = np.linalg.solve(A, b)
    x, info = run_solver(name, A, b, step)
    assert rel_err(x, x_ref) <= 1e-8, (kind, name)
    assert not bool(info.diverged)
    assert float(info.residual_norm) <= 1e-9 * float(info.rhs_norm)
    assert float(info.rhs_norm) == pytest.approx(np.linalg.norm(b), rel=1e-12)
    if name in ("neumann", "dense"):
        assert int(info.iterations) == {"neumann": 3000, "dense": 0}[name]
    else:  # Krylov solvers report the iterations they ran (gmres: restart cycles)
        assert 0 < int(info.iterations) <= 500


@pytest.mark.parametrize("K", [20, 3000])
def test_neumann_flagged_on_indefinite(K):
    A, b, step = random_system("indefinite")
    x, info = run_solver("neumann", A, b, step, K=K)
    assert bool(info.diverged)
    assert not np.isfinite(float(info.residual_norm)) or float(info.residual_norm) > float(info.rhs_norm)
    with pytest.warns(HypergradWarning, match="diverged"):
        assert not check_info(info)


def test_cg_fails_and_is_flagged_on_nonsymmetric():
    A, b, step = random_system("nonsymmetric")
    x, info = run_solver("cg", A, b, step)
    assert rel_err(x, np.linalg.solve(A, b)) > 1e-2
    assert bool(info.diverged)
    with pytest.warns(HypergradWarning):
        check_info(info)


def test_short_neumann_not_converged_warns_with_rtol():
    A, b, step = random_system("spd")
    _, info = run_solver("neumann", A, b, step, K=5)     # contraction: not diverged, not converged
    assert not bool(info.diverged)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_info(info)                          # no rtol: fine
    with pytest.warns(HypergradWarning, match="not converged"):
        assert not check_info(info, rtol=1e-6)


# --------------------------------------------------------------------------------------------
# 2. Hypergradients against central finite differences
# --------------------------------------------------------------------------------------------

class RidgeL2:
    """Per-feature ridge: w*(θ) = argmin ½‖Xw − y‖² + ½ Σ_j e^{θ_j} w_j²; θ = {'log_lam': (d,),
    'shift': ()} with outer L = ½‖X_v w − y_v‖² / n_v + 0.01·shift² + shift·Σw (a direct θ term
    that also enters ∂_x L)."""

    def __init__(self, seed=0, n=40, d=6, n_val=25):
        rng = np.random.default_rng(seed)
        self.X, self.Xv = rng.normal(size=(n, d)), rng.normal(size=(n_val, d))
        w0 = rng.normal(size=d)
        self.y = self.X @ w0 + 0.5 * rng.normal(size=n)
        self.yv = self.Xv @ w0 + 0.5 * rng.normal(size=n_val)
        self.theta = {"log_lam": jnp.asarray(rng.normal(size=d) * 0.5, F64),
                      "shift": jnp.asarray(0.3, F64)}

    def solve_inner(self, th):
        X = jnp.asarray(self.X)
        return jnp.linalg.solve(X.T @ X + jnp.diag(jnp.exp(th["log_lam"])), X.T @ jnp.asarray(self.y))

    def F(self, w, th):                                   # ∇_w inner
        X = jnp.asarray(self.X)
        return X.T @ (X @ w - jnp.asarray(self.y)) + jnp.exp(th["log_lam"]) * w

    def outer(self, w, th):
        r = jnp.asarray(self.Xv) @ w - jnp.asarray(self.yv)
        return 0.5 * jnp.sum(r ** 2) / r.shape[0] + 0.01 * th["shift"] ** 2 + th["shift"] * jnp.sum(w)

    def lipschitz(self, th):
        return float(np.linalg.eigvalsh(self.X.T @ self.X).max() + np.exp(np.asarray(th["log_lam"])).max())


class LogregL2:
    """Logistic regression, w*(θ) = argmin mean log(1 + e^{−y xᵀw}) + ½ e^{θ} ‖w‖²; θ scalar;
    outer = validation log-loss. Inner solved by Newton to machine precision."""

    def __init__(self, seed=1, n=80, d=5, n_val=60):
        rng = np.random.default_rng(seed)
        w0 = rng.normal(size=d)
        def data(m):
            X = rng.normal(size=(m, d))
            y = np.where(X @ w0 + 0.8 * rng.normal(size=m) > 0, 1.0, -1.0)
            return jnp.asarray(X), jnp.asarray(y)
        self.X, self.y = data(n)
        self.Xv, self.yv = data(n_val)
        self.theta = jnp.asarray(np.log(0.05), F64)
        self.d = d

    def inner(self, w, th):
        return jnp.mean(jax.nn.softplus(-self.y * (self.X @ w))) + 0.5 * jnp.exp(th) * jnp.sum(w ** 2)

    def F(self, w, th):
        return jax.grad(self.inner)(w, th)

    def solve_inner(self, th, iters=30):
        def newton(w, _):
            return w - jnp.linalg.solve(jax.hessian(self.inner)(w, th), self.F(w, th)), None
        w, _ = jax.lax.scan(newton, jnp.zeros(self.d, F64), None, length=iters)
        return w

    def outer(self, w, th):
        return jnp.mean(jax.nn.softplus(-self.yv * (self.Xv @ w)))

    def lipschitz(self, th):
        return float(0.25 * np.linalg.eigvalsh(np.asarray(self.X.T @ self.X)).max() / self.X.shape[0]
                     + np.exp(float(th)))


def central_fd(f, theta, h=1e-5):
    """Central differences of a scalar f over every coordinate of pytree θ (float64)."""
    flat, unravel = jax.flatten_util.ravel_pytree(theta)
    f_flat = jax.jit(lambda v: f(unravel(v)))
    g = np.zeros(flat.shape[0])
    for i in range(flat.shape[0]):
        e = jnp.zeros_like(flat).at[i].set(h)
        g[i] = (float(f_flat(flat + e)) - float(f_flat(flat - e))) / (2 * h)
    return unravel(jnp.asarray(g))


PROBLEMS = {"ridge": RidgeL2, "logreg": LogregL2}
_FD_CACHE: dict = {}


def fd_reference(pname):
    if pname not in _FD_CACHE:
        p = PROBLEMS[pname]()
        _FD_CACHE[pname] = central_fd(lambda th: p.outer(p.solve_inner(th), th), p.theta)
    return _FD_CACHE[pname]


@pytest.mark.parametrize("pname", list(PROBLEMS))
@pytest.mark.parametrize("name", ("dense", "neumann") + ITERATIVE)
def test_hypergrad_vs_central_fd(pname, name):
    p = PROBLEMS[pname]()
    th = p.theta
    w = p.solve_inner(th)
    assert float(jnp.linalg.norm(p.F(w, th))) < 1e-12        # inner solved to precision
    ref = fd_reference(pname)
    if name == "neumann":
        # fixed-point form T = w − η∇inner, η = 1/L: J = I − ηH has spectrum in [0, 1)
        eta = 1.0 / p.lipschitz(th)
        T = lambda w_, th_: w_ - eta * p.F(w_, th_)
        f = jax.jit(lambda w_, th_: fixed_point_hypergrad(T, p.outer, w_, th_, neumann(4000, 1.0),
                                                          return_info=True))
    else:
        solve = make_solve(name, tol=1e-13, maxiter=1000)
        f = jax.jit(lambda w_, th_: root_hypergrad(p.F, p.outer, w_, th_, solve, return_info=True))
    value, g, info = f(w, th)
    assert jax.tree.structure(g) == jax.tree.structure(th)
    assert rel_err(g, ref) <= 1e-6, (pname, name, g, ref)
    assert not bool(info.diverged) and float(info.residual_norm) <= 1e-9 * float(info.rhs_norm)
    assert float(value) == pytest.approx(float(p.outer(w, th)), rel=1e-14)


def test_default_return_unchanged():
    p = RidgeL2()
    w = p.solve_inner(p.theta)
    out = jax.jit(lambda w_, t_: root_hypergrad(p.F, p.outer, w_, t_, make_solve("dense")))(w, p.theta)
    assert len(out) == 2
    out_i = jax.jit(lambda w_, t_: root_hypergrad(p.F, p.outer, w_, t_, make_solve("dense"),
                                                  return_info=True))(w, p.theta)
    assert len(out_i) == 3 and isinstance(out_i[2], HypergradInfo)
    assert rel_err(out[1], out_i[1]) == 0.0


# --------------------------------------------------------------------------------------------
# 3. Unrolled differentiation
# --------------------------------------------------------------------------------------------

def test_unrolled_approaches_implicit_and_truncation_is_biased():
    p = RidgeL2()
    th = p.theta
    eta = 0.1 / p.lipschitz(th)          # slow inner GD, so T matters over a wide range
    step = lambda w, th_: w - eta * p.F(w, th_)
    w = p.solve_inner(th)
    _, g_imp = root_hypergrad(p.F, p.outer, w, th, make_solve("dense"))
    x0 = jnp.zeros_like(w)

    @functools.partial(jax.jit, static_argnums=(0, 1))
    def unrolled(T, truncate):
        return unrolled_hypergrad(step, p.outer, x0, th, T, truncate)

    Ts = [30, 100, 300, 1000, 3000]         # (below ~30 steps the error is transient, not monotone)
    errs = [rel_err(unrolled(T, None)[1], g_imp) for T in Ts]
    assert all(b <= a * 1.05 for a, b in zip(errs, errs[1:])), errs      # monotone-ish
    assert errs[0] > 1e-2 and errs[-1] <= 1e-6, errs

    # truncated backprop through the last k of 3000 steps: biased, less so as k grows
    terr = [rel_err(unrolled(3000, k)[1], g_imp) for k in (0, 5, 50)]
    assert terr[0] > terr[1] > terr[2] > 1e-4, terr
    # truncate = T is the full unroll; truncate = 0 keeps only the direct ∂_θ L
    full = unrolled_hypergrad(step, p.outer, x0, th, 50)
    assert rel_err(unrolled_hypergrad(step, p.outer, x0, th, 50, 50)[1], full[1]) <= 1e-14
    x_T = unrolled_hypergrad(step, lambda x, t: jnp.sum(x), x0, th, 0)[0]
    assert float(x_T) == 0.0
    direct = jax.grad(p.outer, argnums=1)(unrolled_hypergrad(step, lambda x, t: (0.0 * jnp.sum(x), x),
                                                             x0, th, 50, has_aux=True)[0][1], th)
    assert rel_err(unrolled_hypergrad(step, p.outer, x0, th, 50, 0)[1], direct) <= 1e-14
    with pytest.raises(ValueError):
        unrolled_hypergrad(step, p.outer, x0, th, 5, truncate=6)


def test_truncated_unroll_at_fixed_point_equals_neumann():
    # At the fixed point, backprop through the last k steps = k-term Neumann series.
    p = RidgeL2()
    th = p.theta
    eta = 1.0 / p.lipschitz(th)
    step = lambda w, th_: w - eta * p.F(w, th_)
    w = p.solve_inner(th)
    for k in (1, 5, 20):
        _, g_tr = unrolled_hypergrad(step, p.outer, w, th, k)
        _, g_neu = fixed_point_hypergrad(step, p.outer, w, th, neumann(k))
        assert rel_err(g_tr, g_neu) <= 1e-12, k


# --------------------------------------------------------------------------------------------
# 4. Divergence diagnostics on an indefinite bilevel problem
# --------------------------------------------------------------------------------------------

def test_indefinite_fixed_point_flagged():
    """T(x, θ) = x − η(Ax − Bθ) with A symmetric indefinite: x* = A⁻¹Bθ is a saddle."""
    rng = np.random.default_rng(3)
    n, m = 8, 3
    Q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    A = Q @ np.diag([-3.0, -1.0, -0.5, 0.5, 1.0, 2.0, 3.0, 4.0]) @ Q.T
    A = jnp.asarray(0.5 * (A + A.T))
    B, C = jnp.asarray(rng.normal(size=(n, m))), jnp.asarray(rng.normal(size=(n,)))
    eta = 0.2
    T = lambda x, th: x - eta * (A @ x - B @ th)
    outer = lambda x, th: jnp.sum(C * x) + 0.5 * jnp.sum(x ** 2)
    th = jnp.asarray(rng.normal(size=m))
    x = jnp.linalg.solve(A, B @ th)
    ref = jax.grad(lambda t: outer(jnp.linalg.solve(A, B @ t), t))(th)

    for K in (5, 30):
        _, g, info = jax.jit(lambda x_, t_: fixed_point_hypergrad(T, outer, x_, t_, neumann(K),
                                                                  return_info=True))(x, th)
        assert bool(info.diverged) and int(info.iterations) == K
        with pytest.warns(HypergradWarning, match="diverged"):
            check_info(info)
    for name in ("gmres", "normal_cg", "dense"):
        s = make_solve(name, tol=1e-13, maxiter=500)
        _, g, info = jax.jit(lambda x_, t_: fixed_point_hypergrad(T, outer, x_, t_, s,
                                                                  return_info=True))(x, th)
        assert rel_err(g, ref) <= 1e-9 and not bool(info.diverged)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert check_info(info, rtol=1e-9)


# --------------------------------------------------------------------------------------------
# 5. jit, vmap, grad-of-grad
# --------------------------------------------------------------------------------------------

def test_vmap_over_batch_of_outer_variables():
    p = RidgeL2()
    base = p.theta
    batch = {"log_lam": base["log_lam"][None] + jnp.linspace(-1, 1, 4)[:, None],
             "shift": jnp.linspace(-0.5, 0.5, 4)}

    def hyper(th, name):
        w = p.solve_inner(th)
        return root_hypergrad(p.F, p.outer, w, th, make_solve(name, tol=1e-13, maxiter=500),
                              return_info=True)

    ref_fn = jax.jit(lambda th: hyper(th, "dense")[1])
    refs = [ref_fn(jax.tree.map(lambda a: a[i], batch)) for i in range(4)]
    for name in ("dense", "gmres", "cg"):
        v, g, info = jax.jit(jax.vmap(lambda th: hyper(th, name)))(batch)
        assert v.shape == (4,) and g["log_lam"].shape == (4, 6) and info.residual_norm.shape == (4,)
        assert not np.asarray(info.diverged).any()
        for i in range(4):
            assert rel_err(jax.tree.map(lambda a: a[i], g), refs[i]) <= 1e-9, name
    # vmapped unrolled and vmapped neumann-with-info too
    eta = 1.0 / (p.lipschitz(base) * np.e)
    step = lambda w, th_: w - eta * p.F(w, th_)
    _, gu = jax.jit(jax.vmap(lambda th: unrolled_hypergrad(step, p.outer, jnp.zeros(6), th, 20)))(batch)
    _, gu0 = unrolled_hypergrad(step, p.outer, jnp.zeros(6), jax.tree.map(lambda a: a[0], batch), 20)
    assert rel_err(jax.tree.map(lambda a: a[0], gu), gu0) <= 1e-12
    info = jax.jit(jax.vmap(lambda th: fixed_point_hypergrad(step, p.outer, p.solve_inner(th), th, neumann(3),
                                                     return_info=True)[2]))(batch)
    assert info.iterations.shape == (4,) and (np.asarray(info.iterations) == 3).all()


@pytest.mark.parametrize("name", ["dense", "cg", "gmres", "neumann"])
def test_grad_of_grad(name):
    """d/dλ of the hypergradient (w*(λ) by a differentiable solve) against central FD of the
    closed-form hypergradient, scalar ridge λ."""
    p = RidgeL2()
    X, y = jnp.asarray(p.X), jnp.asarray(p.y)
    Xv, yv = jnp.asarray(p.Xv), jnp.asarray(p.yv)
    d = X.shape[1]
    H = lambda lam: X.T @ X + lam * jnp.eye(d)
    w_star = lambda lam: jnp.linalg.solve(H(lam), X.T @ y)
    F = lambda w, lam: X.T @ (X @ w - y) + lam * w
    outer = lambda w, lam: 0.5 * jnp.sum((Xv @ w - yv) ** 2)

    def closed(lam):                                   # dL/dλ = −gᵀ H⁻¹ w*
        w = w_star(lam)
        return -(Xv.T @ (Xv @ w - yv)) @ jnp.linalg.solve(H(lam), w)

    lam0 = 0.7
    if name == "neumann":
        eta = 1.0 / float(jnp.linalg.eigvalsh(H(lam0)).max())
        hyper = lambda lam: fixed_point_hypergrad(lambda w, l: w - eta * F(w, l), outer,
                                                  w_star(lam), lam, neumann(3000))[1]
    else:
        s = make_solve(name, tol=1e-14, maxiter=500)
        hyper = lambda lam: root_hypergrad(F, outer, w_star(lam), lam, s)[1]
    lam = jnp.asarray(lam0, F64)
    assert abs(float(hyper(lam)) - float(closed(lam))) <= 1e-9 * abs(float(closed(lam)))
    d2 = float(jax.jit(jax.grad(hyper))(lam))
    h = 1e-5
    fd = (float(closed(lam + h)) - float(closed(lam - h))) / (2 * h)
    assert abs(d2 - fd) <= 1e-6 * abs(fd), (name, d2, fd)
