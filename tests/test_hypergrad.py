"""Numerical tests of ibau_jax.hypergrad against independent references (float64).

References are built without the code under test: closed forms (ridge regression), numpy
dense solves with hand-written Jacobians, explicit numpy fixed-point iterations, and
unrolled differentiation with ``jax.grad``. Every test runs under ``jax.enable_x64``
(scoped per test by an autouse fixture, so the rest of the pytest process stays float32).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ibau_jax.hypergrad import (SOLVERS, dense_solve, fixed_point_hypergrad, make_solve, neumann,
                                root_hypergrad)

F64 = jnp.float64


@pytest.fixture(autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


def rel_err(a, b) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def tree_rel_err(a, b) -> float:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    fa = np.concatenate([np.ravel(np.asarray(x)) for x in la])
    fb = np.concatenate([np.ravel(np.asarray(x)) for x in lb])
    return rel_err(fa, fb)


def fp_hg(T, outer, x, th, solve, **kw):
    """fixed_point_hypergrad under jit (one compile instead of op-by-op dispatch: faster)."""
    return jax.jit(lambda x_, th_: fixed_point_hypergrad(T, outer, x_, th_, solve, **kw))(x, th)


def root_hg(F, outer, x, th, solve, **kw):
    return jax.jit(lambda x_, th_: root_hypergrad(F, outer, x_, th_, solve, **kw))(x, th)


# --------------------------------------------------------------------------------------------
# 1. Ridge regression: regularisation hypergradient against the closed form
# --------------------------------------------------------------------------------------------

class Ridge:
    """inner w*(λ, s) = argmin ½‖Xw−y‖² + ½λ‖w‖² − sᵀw;  outer L = ½‖X_val w − y_val‖²."""

    def __init__(self, seed=0, n=30, d=5, n_val=12):
        rng = np.random.default_rng(seed)
        self.X = rng.normal(size=(n, d))
        self.y = rng.normal(size=n)
        self.Xv = rng.normal(size=(n_val, d))
        self.yv = rng.normal(size=n_val)
        self.d = d
        self.lam = 0.7
        self.s = rng.normal(size=d) * 0.3

    def A(self, lam):
        return self.X.T @ self.X + lam * np.eye(self.d)

    def w_star(self, lam, s=None):
        s = np.zeros(self.d) if s is None else s
        return np.linalg.solve(self.A(lam), self.X.T @ self.y + s)

    def closed_form_dlam(self, lam):
        w = self.w_star(lam)
        dw = -np.linalg.solve(self.A(lam), w)
        g = self.Xv.T @ (self.Xv @ w - self.yv)
        return g @ dw

    # jax side
    def F(self, w, lam):
        X, y = jnp.asarray(self.X), jnp.asarray(self.y)
        return X.T @ (X @ w - y) + lam * w

    def outer(self, w, lam):
        r = jnp.asarray(self.Xv) @ w - jnp.asarray(self.yv)
        return 0.5 * jnp.sum(r ** 2)


def test_ridge_closed_form_self_check():
    # The closed form itself, against central finite differences of λ ↦ L(w*(λ)).
    p = Ridge()
    L = lambda lam: 0.5 * np.sum((p.Xv @ p.w_star(lam) - p.yv) ** 2)
    h = 1e-5
    fd = (L(p.lam + h) - L(p.lam - h)) / (2 * h)
    assert abs(fd - p.closed_form_dlam(p.lam)) <= 1e-7 * abs(fd)


@pytest.mark.parametrize("name,tol", [("dense", 1e-8), ("cg", 1e-6), ("normal_cg", 1e-6),
                                      ("gmres", 1e-6), ("bicgstab", 1e-6)])
def test_ridge_root_hypergrad_vs_closed_form(name, tol):
    p = Ridge()
    lam = jnp.asarray(p.lam, dtype=F64)
    w = jnp.asarray(p.w_star(p.lam), dtype=F64)
    solve = make_solve(name, tol=1e-13, maxiter=500)
    value, g = root_hg(p.F, p.outer, w, lam, solve)
    ref = p.closed_form_dlam(p.lam)
    assert g.dtype == F64 and g.shape == ()
    assert rel_err(g, ref) <= tol, (name, float(g), ref)
    assert float(value) == pytest.approx(0.5 * np.sum((p.Xv @ p.w_star(p.lam) - p.yv) ** 2), rel=1e-12)


def test_ridge_fixed_point_neumann_converges_to_closed_form():
    p = Ridge()
    eigs = np.linalg.eigvalsh(p.A(p.lam))
    eta = 1.0 / eigs.max()                       # J = I − ηA has spectrum in [0, 1 − λmin/λmax]
    rho = 1.0 - eigs.min() / eigs.max()
    assert rho < 0.95
    T = lambda w, lam: w - eta * p.F(w, lam)
    lam = jnp.asarray(p.lam, dtype=F64)
    w = jnp.asarray(p.w_star(p.lam), dtype=F64)
    ref = p.closed_form_dlam(p.lam)

    K = int(np.ceil(np.log(1e-14) / np.log(rho))) + 10
    _, g = fp_hg(T, p.outer, w, lam, neumann(K))
    assert rel_err(g, ref) <= 1e-8
    _, g_dense = fp_hg(T, p.outer, w, lam, dense_solve)
    assert rel_err(g_dense, ref) <= 1e-8
    # and a short truncation is visibly not converged (the check above can fail)
    _, g3 = fp_hg(T, p.outer, w, lam, neumann(3))
    assert rel_err(g3, ref) > 1e-3


@pytest.mark.parametrize("name", ["dense", "normal_cg", "gmres", "neumann"])
def test_ridge_pytree_theta(name):
    """θ = {'lam': scalar, 's': vector} with a direct θ term in the outer loss."""
    p = Ridge(seed=1)
    s = p.s
    w_np = p.w_star(p.lam, s)
    A = p.A(p.lam)
    g = p.Xv.T @ (p.Xv @ w_np - p.yv)
    Ainv_g = np.linalg.solve(A, g)               # A symmetric
    ref = {"lam": -(Ainv_g @ w_np) + 2.0 * 0.25 * p.lam,   # + d/dλ of 0.25 λ²
           "s": Ainv_g + np.cos(s)}                       # + d/ds of Σ sin(s)

    eigs = np.linalg.eigvalsh(A)
    eta = 1.0 / eigs.max()

    def T(w, th):
        X, y = jnp.asarray(p.X), jnp.asarray(p.y)
        grad = X.T @ (X @ w - y) + th["lam"] * w - th["s"]
        return w - eta * grad

    def outer(w, th):
        r = jnp.asarray(p.Xv) @ w - jnp.asarray(p.yv)
        return 0.5 * jnp.sum(r ** 2) + 0.25 * th["lam"] ** 2 + jnp.sum(jnp.sin(th["s"]))

    theta = {"lam": jnp.asarray(p.lam, dtype=F64), "s": jnp.asarray(s, dtype=F64)}
    w = jnp.asarray(w_np, dtype=F64)
    solve = make_solve(name, K=2000, tol=1e-13, maxiter=500)
    _, hg = fp_hg(T, outer, w, theta, solve)
    assert set(hg) == {"lam", "s"} and hg["s"].shape == s.shape
    assert tree_rel_err(hg, ref) <= 1e-6, (name, hg, ref)

    # root form on the same pytree, with the gradient (not η·gradient) as optimality function
    F = lambda w_, th: (w_ - T(w_, th)) / eta
    _, hg_root = root_hg(F, outer, w, theta, make_solve("dense"))
    assert tree_rel_err(hg_root, ref) <= 1e-8


def test_has_aux():
    p = Ridge()
    lam = jnp.asarray(p.lam, dtype=F64)
    w = jnp.asarray(p.w_star(p.lam), dtype=F64)
    outer_aux = lambda w_, th: (p.outer(w_, th), {"norm": jnp.sum(w_ ** 2)})
    (value, aux), g = root_hg(p.F, outer_aux, w, lam, dense_solve, has_aux=True)
    assert rel_err(g, p.closed_form_dlam(p.lam)) <= 1e-8
    assert float(aux["norm"]) == pytest.approx(float(np.sum(p.w_star(p.lam) ** 2)), rel=1e-12)
    assert float(value) == pytest.approx(float(p.outer(w, lam)), rel=1e-12)


# --------------------------------------------------------------------------------------------
# 2. Indefinite inner Hessian: exact solvers work, Neumann diverges
# --------------------------------------------------------------------------------------------

class Indefinite:
    """T(x, θ) = x − η(Ax − Bθ), A symmetric indefinite nonsingular; I − J = ηA."""

    def __init__(self, seed=2, n=6, m=3):
        rng = np.random.default_rng(seed)
        Q, _ = np.linalg.qr(rng.normal(size=(n, n)))
        self.eigs = np.array([-3.0, -1.5, -0.5, 0.7, 2.0, 4.0])[:n]
        self.A = Q @ np.diag(self.eigs) @ Q.T
        self.A = 0.5 * (self.A + self.A.T)
        self.B = rng.normal(size=(n, m))
        self.C = rng.normal(size=(4, n))
        self.dvec = rng.normal(size=4)
        self.eta = 0.5
        self.theta = rng.normal(size=m)
        self.n, self.m = n, m

    def T(self, x, th):
        return x - self.eta * (jnp.asarray(self.A) @ x - jnp.asarray(self.B) @ th)

    def outer(self, x, th):
        r = jnp.asarray(self.C) @ x - jnp.asarray(self.dvec)
        return 0.5 * jnp.sum(r ** 2) + jnp.sum(jnp.sin(th))

    def x_star(self):
        return np.linalg.solve(self.A, self.B @ self.theta)

    def reference(self):
        x = self.x_star()
        gx = self.C.T @ (self.C @ x - self.dvec)
        gth = np.cos(self.theta)
        J = np.eye(self.n) - self.eta * self.A
        dT_dth = self.eta * self.B
        return gth + dT_dth.T @ np.linalg.solve(np.eye(self.n) - J.T, gx)


def test_indefinite_problem_is_indefinite():
    p = Indefinite()
    ev = np.linalg.eigvalsh(np.eye(p.n) - (np.eye(p.n) - p.eta * p.A))
    assert ev.min() < 0 < ev.max()
    rho = np.abs(np.linalg.eigvalsh(np.eye(p.n) - p.eta * p.A)).max()
    assert rho > 1.0
    # scipy-free cross-check of the reference: x*(θ) = A⁻¹Bθ in closed form.
    x = p.x_star()
    gx = p.C.T @ (p.C @ x - p.dvec)
    closed = np.cos(p.theta) + p.B.T @ np.linalg.solve(p.A.T, gx)
    assert rel_err(p.reference(), closed) <= 1e-12


@pytest.mark.parametrize("name", ["dense", "normal_cg", "gmres"])
def test_indefinite_exact_solvers(name):
    p = Indefinite()
    x = jnp.asarray(p.x_star(), dtype=F64)
    th = jnp.asarray(p.theta, dtype=F64)
    np.testing.assert_allclose(np.asarray(p.T(x, th)), np.asarray(x), atol=1e-12)
    _, g = fp_hg(p.T, p.outer, x, th, make_solve(name, tol=1e-13, maxiter=500))
    assert rel_err(g, p.reference()) <= 1e-6, (name, g, p.reference())


def test_indefinite_neumann_does_not_converge():
    p = Indefinite()
    x = jnp.asarray(p.x_star(), dtype=F64)
    th = jnp.asarray(p.theta, dtype=F64)
    ref = p.reference()
    for K in (50, 200):
        _, g = fp_hg(p.T, p.outer, x, th, neumann(K))
        g = np.asarray(g)
        assert (not np.all(np.isfinite(g))) or rel_err(g, ref) > 1e3, (K, g)


# --------------------------------------------------------------------------------------------
# 3. Nonlinear T: neumann(K) == K explicit fixed-point iterations with numpy Jacobians
# --------------------------------------------------------------------------------------------

class Softplus:
    """T(x, θ) = x − η(∇_x f(x, θ) + P x) with f(x, θ) = Σ_j θ_j softplus((Wx)_j) and
    P = I + skew (so J = ∂T/∂x is NOT symmetric and a Jᵀ/J mix-up is detected);
    L(x, θ) = Σ log cosh(x − c) + 0.1 Σ θ³/3.  Jacobians written out by hand in numpy."""

    def __init__(self, seed=3, n=5, m=4, eta=0.3):
        rng = np.random.default_rng(seed)
        self.W = rng.normal(size=(m, n)) * 0.8
        self.c = rng.normal(size=n)
        self.theta = rng.uniform(0.5, 1.5, size=m)
        R = rng.normal(size=(n, n))
        self.P = np.eye(n) + 0.4 * (R - R.T)
        self.eta = eta
        self.n, self.m = n, m

    # jax
    def T(self, x, th):
        W = jnp.asarray(self.W)
        return x - self.eta * (W.T @ (th * jax.nn.sigmoid(W @ x)) + jnp.asarray(self.P) @ x)

    def outer(self, x, th):
        return jnp.sum(jnp.log(jnp.cosh(x - jnp.asarray(self.c)))) + 0.1 * jnp.sum(th ** 3) / 3

    def x_star_jax(self, th, iters=400):
        x0 = jnp.zeros(self.n, dtype=F64)
        return jax.lax.fori_loop(0, iters, lambda _, x: self.T(x, th), x0)

    # numpy
    def T_np(self, x, th):
        s = 1.0 / (1.0 + np.exp(-(self.W @ x)))
        return x - self.eta * (self.W.T @ (th * s) + self.P @ x)

    def x_star_np(self, th=None, iters=2000):
        th = self.theta if th is None else th
        x = np.zeros(self.n)
        for _ in range(iters):
            x = self.T_np(x, th)
        return x

    def jacobians(self, x, th):
        z = self.W @ x
        s = 1.0 / (1.0 + np.exp(-z))
        ds = s * (1 - s)
        J = np.eye(self.n) - self.eta * (self.W.T @ np.diag(th * ds) @ self.W + self.P)
        dT_dth = -self.eta * self.W.T @ np.diag(s)
        return J, dT_dth

    def outer_grads(self, x, th):
        return np.tanh(x - self.c), 0.1 * th ** 2

    def exact(self, x, th):
        J, dT = self.jacobians(x, th)
        gx, gth = self.outer_grads(x, th)
        return gth + dT.T @ np.linalg.solve(np.eye(self.n) - J.T, gx)

    def k_step(self, x, th, K, step=1.0):
        """Original I-BAU iteration (step 1): v_{k+1} = Jᵀ v_k + g, written out explicitly."""
        J, dT = self.jacobians(x, th)
        gx, gth = self.outer_grads(x, th)
        A = np.eye(self.n) - J.T
        v = np.zeros(self.n)
        for _ in range(K):
            v = v + step * (gx - A @ v)
        return gth + dT.T @ v


def test_softplus_setup_is_a_contraction_with_slow_neumann():
    p = Softplus()
    x = p.x_star_np()
    np.testing.assert_allclose(p.T_np(x, p.theta), x, atol=1e-14)
    J, dT = p.jacobians(x, p.theta)
    # hand-written Jacobians agree with jax autodiff
    np.testing.assert_allclose(np.asarray(jax.jacobian(p.T, 0)(jnp.asarray(x), jnp.asarray(p.theta))), J,
                               rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(np.asarray(jax.jacobian(p.T, 1)(jnp.asarray(x), jnp.asarray(p.theta))), dT,
                               rtol=1e-12, atol=1e-14)
    assert np.abs(J - J.T).max() > 0.1
    rho = np.abs(np.linalg.eigvals(J)).max()
    assert 0.3 < rho < 0.95, rho


@pytest.mark.parametrize("K", [1, 2, 3, 5])
def test_neumann_equals_k_explicit_iterations(K):
    p = Softplus()
    x_np = p.x_star_np()
    x = jnp.asarray(x_np, dtype=F64)
    th = jnp.asarray(p.theta, dtype=F64)
    _, g = fp_hg(p.T, p.outer, x, th, neumann(K))
    ref_K = p.k_step(x_np, p.theta, K)
    # with step 1 the Richardson loop is exactly the Neumann partial sum Σ_{k<K} (Jᵀ)^k g
    J, dT = p.jacobians(x_np, p.theta)
    gx, gth = p.outer_grads(x_np, p.theta)
    v = sum(np.linalg.matrix_power(J.T, k) @ gx for k in range(K))
    assert rel_err(ref_K, gth + dT.T @ v) <= 1e-12
    assert rel_err(g, ref_K) <= 1e-10, (K, g, ref_K)
    # truncation is real: the K-step result is not the exact hypergradient
    assert rel_err(ref_K, p.exact(x_np, p.theta)) > 1e-3
    assert rel_err(g, p.exact(x_np, p.theta)) > 1e-3


@pytest.mark.parametrize("K,step", [(4, 0.5), (6, 1.3)])
def test_neumann_step_size(K, step):
    p = Softplus()
    x_np = p.x_star_np()
    x = jnp.asarray(x_np, dtype=F64)
    th = jnp.asarray(p.theta, dtype=F64)
    _, g = fp_hg(p.T, p.outer, x, th, make_solve("neumann", K=K, step=step))
    ref = p.k_step(x_np, p.theta, K, step=step)
    assert rel_err(g, ref) <= 1e-10
    assert rel_err(ref, p.k_step(x_np, p.theta, K, step=1.0)) > 1e-4


def test_neumann_on_explicit_matrix():
    rng = np.random.default_rng(7)
    M = np.eye(6) + 0.2 * rng.normal(size=(6, 6))
    b = rng.normal(size=6)
    # K up to and past any unrolling threshold (both code paths of neumann)
    for K, step in [(1, 1.0), (2, 0.7), (7, 0.9), (16, 1.0), (17, 1.0), (25, 0.8)]:
        x = np.zeros(6)
        for _ in range(K):
            x = x + step * (b - M @ x)
        got = neumann(K, step)(lambda v: jnp.asarray(M) @ v, jnp.asarray(b, dtype=F64))
        assert rel_err(got, x) <= 1e-13


# --------------------------------------------------------------------------------------------
# 4. Against unrolled differentiation
# --------------------------------------------------------------------------------------------

def _unrolled_grad(p: Softplus, x0, th, t):
    def loss(th_):
        x = jax.lax.fori_loop(0, t, lambda _, x: p.T(x, th_), x0)
        return p.outer(x, th_)
    return jax.jit(jax.grad(loss))(th)


def test_unrolled_from_fixed_point_converges_to_implicit():
    p = Softplus()
    x_np = p.x_star_np()
    x = jnp.asarray(x_np, dtype=F64)
    th = jnp.asarray(p.theta, dtype=F64)
    _, g_dense = fp_hg(p.T, p.outer, x, th, dense_solve)
    exact = p.exact(x_np, p.theta)
    assert rel_err(g_dense, exact) <= 1e-10

    errs = []
    for t in (1, 4, 20, 150):
        g_unr = _unrolled_grad(p, x, th, t)
        errs.append(rel_err(g_unr, g_dense))
        # started at x*, t unrolled steps are exactly t Neumann steps (reverse mode = Richardson)
        _, g_neu = fp_hg(p.T, p.outer, x, th, neumann(t))
        assert rel_err(g_unr, g_neu) <= 1e-10
    assert errs[0] > 1e-2
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] <= 1e-6, errs


def test_unrolled_from_far_start_converges_to_implicit():
    p = Softplus()
    x_np = p.x_star_np()
    th = jnp.asarray(p.theta, dtype=F64)
    _, g_dense = fp_hg(p.T, p.outer, jnp.asarray(x_np, dtype=F64), th, dense_solve)
    x0 = jnp.asarray(x_np + 5.0 * np.random.default_rng(0).normal(size=p.n), dtype=F64)
    e_short = rel_err(_unrolled_grad(p, x0, th, 3), g_dense)
    e_long = rel_err(_unrolled_grad(p, x0, th, 300), g_dense)
    assert e_short > 1e-2
    assert e_long <= 1e-6, e_long


# --------------------------------------------------------------------------------------------
# 5. Errors
# --------------------------------------------------------------------------------------------

def test_make_solve_unknown_name():
    with pytest.raises(ValueError) as ei:
        make_solve("nope")
    msg = str(ei.value)
    assert "nope" in msg
    for name in SOLVERS:
        assert name in msg


@pytest.mark.parametrize("K", [0, -1])
def test_neumann_rejects_nonpositive_K(K):
    with pytest.raises(ValueError, match="K"):
        neumann(K)
    with pytest.raises(ValueError):
        make_solve("neumann", K=K)


def test_make_solve_returns_working_solvers_for_all_names():
    rng = np.random.default_rng(11)
    M = np.eye(4) * 2.0 + 0.1 * rng.normal(size=(4, 4))
    M = 0.5 * (M + M.T)                       # SPD, so even cg applies
    b = rng.normal(size=4)
    exact = np.linalg.solve(M, b)
    mv = lambda v: jnp.asarray(M) @ v
    for name in SOLVERS:
        solve = make_solve(name, K=200, step=0.4, tol=1e-13, maxiter=200)
        got = jax.jit(lambda bb: solve(mv, bb))(jnp.asarray(b, dtype=F64))
        assert rel_err(got, exact) <= 1e-8, name


# --------------------------------------------------------------------------------------------
# 6. jit and vmap
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["dense", "neumann", "gmres"])
def test_jit_matches_eager(name):
    p = Softplus()
    th = jnp.asarray(p.theta, dtype=F64)
    solve = make_solve(name, K=5, tol=1e-13, maxiter=200)

    def hg(th_):
        x = p.x_star_jax(th_)
        return fixed_point_hypergrad(p.T, p.outer, x, th_, solve)

    (v_e, g_e) = hg(th)
    (v_j, g_j) = jax.jit(hg)(th)
    assert g_j.dtype == F64
    assert rel_err(g_j, g_e) <= 1e-12
    assert float(v_j) == pytest.approx(float(v_e), rel=1e-12)
    x_np = p.x_star_np()
    ref = p.k_step(x_np, p.theta, 5) if name == "neumann" else p.exact(x_np, p.theta)
    assert rel_err(g_j, ref) <= 1e-8


@pytest.mark.parametrize("name", ["dense", "neumann", "normal_cg"])
def test_vmap_over_theta(name):
    p = Softplus()
    rng = np.random.default_rng(5)
    thetas = rng.uniform(0.5, 1.5, size=(3, p.m))
    solve = make_solve(name, K=4, tol=1e-13, maxiter=200)

    def hg(th_):
        x = p.x_star_jax(th_)
        return fixed_point_hypergrad(p.T, p.outer, x, th_, solve)[1]

    batched = jax.jit(jax.vmap(hg))(jnp.asarray(thetas, dtype=F64))
    assert batched.shape == thetas.shape
    for i, th_np in enumerate(thetas):
        x_np = p.x_star_np(th_np)
        ref = p.k_step(x_np, th_np, 4) if name == "neumann" else p.exact(x_np, th_np)
        assert rel_err(batched[i], ref) <= 1e-8, (name, i)
        assert rel_err(batched[i], hg(jnp.asarray(th_np, dtype=F64))) <= 1e-10
    # the thetas really differ, so a broadcast of one answer would fail
    assert rel_err(batched[0], batched[1]) > 1e-3


# --------------------------------------------------------------------------------------------
# 7. dense_solve chunking
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n,chunk", [(10, 3), (10, 4), (7, 7), (5, 256), (13, 1)])
def test_dense_solve_chunking(n, chunk):
    rng = np.random.default_rng(n * 100 + chunk)
    M = rng.normal(size=(n, n)) + 3.0 * np.eye(n)
    assert np.abs(M - M.T).max() > 0.1        # nonsymmetric
    b = rng.normal(size=n)
    got = dense_solve(lambda v: jnp.asarray(M) @ v, jnp.asarray(b, dtype=F64), chunk_size=chunk)
    assert rel_err(got, np.linalg.solve(M, b)) <= 1e-12


def test_dense_solve_pytree_and_jit():
    rng = np.random.default_rng(9)
    M = rng.normal(size=(7, 7)) + 3.0 * np.eye(7)
    b = {"a": rng.normal(size=(2, 2)), "b": rng.normal(size=3)}

    def flat(t):
        return jnp.concatenate([t["a"].ravel(), t["b"]])

    def unflat(v):
        return {"a": v[:4].reshape(2, 2), "b": v[4:]}

    mv = lambda t: unflat(jnp.asarray(M) @ flat(t))
    bj = jax.tree.map(lambda a: jnp.asarray(a, dtype=F64), b)
    got = jax.jit(lambda bb: dense_solve(mv, bb, chunk_size=3))(bj)
    ref = np.linalg.solve(M, np.concatenate([b["a"].ravel(), b["b"]]))
    assert got["a"].shape == (2, 2)
    assert rel_err(flat(got), ref) <= 1e-12


# --- solvers on a model with custom_vjp layers (ibau_jax.conv) ---------------------------
# jax.linear_transpose cannot transpose a custom_vjp call; jax.scipy's gmres/bicgstab and
# jaxopt's normal_cg used it, so they failed to even trace on the small VGG. The library's
# Krylov solvers must run there and match a dense solve.

def _conv_problem():
    from ibau_jax.models.conv import conv3x3
    rng = np.random.default_rng(3)
    w = jnp.asarray(rng.normal(size=(3, 3, 2, 3)) * 0.4, F64)
    v = jnp.asarray(rng.normal(size=(3, 3, 3, 2)) * 0.4, F64)
    target = jnp.asarray(rng.normal(size=(2, 4, 4, 2)), F64)

    def inner(d, th):           # nonconvex in d: the Hessian is indefinite
        h = jnp.tanh(conv3x3(d, th["w"]))
        return jnp.sum((conv3x3(h, th["v"]) - target) ** 2) - 0.3 * jnp.sum(d ** 2)

    T = lambda d, th: d - 0.05 * jax.grad(inner)(d, th)
    outer = lambda d, th: jnp.sum(jnp.sin(conv3x3(d, th["w"]))) + jnp.sum(th["v"] ** 2)
    d = jnp.asarray(rng.normal(size=(2, 4, 4, 2)), F64)
    return T, outer, d, {"w": w, "v": v}


def test_conv_problem_is_indefinite_with_custom_vjp():
    T, _, d, th = _conv_problem()
    n = d.size
    J = jax.jacrev(lambda x: T(x.reshape(d.shape), th).ravel())(d.ravel())
    eig = np.linalg.eigvalsh(0.5 * (np.eye(n) - J + (np.eye(n) - J).T))
    assert eig.min() < 0 < eig.max()
    with pytest.raises(NotImplementedError):      # why the library cannot use linear_transpose
        jax.linear_transpose(lambda u: jax.vjp(lambda x: T(x, th), d)[1](u)[0], d)(d)


@pytest.mark.parametrize("name", ["normal_cg", "gmres", "bicgstab"])
def test_krylov_solvers_run_on_custom_vjp_model(name):
    T, outer, d, th = _conv_problem()
    _, g_ref = fp_hg(T, outer, d, th, make_solve("dense"))
    solve = make_solve(name, tol=1e-12, maxiter=2000)
    _, g, info = jax.jit(lambda d, th: fp_hg(T, outer, d, th, solve, return_info=True))(d, th)
    assert tree_rel_err(g, g_ref) <= 1e-6, name
    assert int(info.iterations) > 0 and not bool(info.diverged)
    assert float(info.residual_norm) <= 1e-8 * float(info.rhs_norm)


def test_untransposable_matvec_fallback_is_said_once(monkeypatch):
    """A custom_vjp matvec cannot be transposed: the Krylov solve falls back to an
    undifferentiable one and says so, once per process, with a HypergradWarning."""
    import warnings

    from ibau_jax import hypergrad

    monkeypatch.setattr(hypergrad, "_WARNED", set())

    @jax.custom_vjp
    def scale(v):
        return 3.0 * v

    scale.defvjp(lambda v: (3.0 * v, None), lambda _, g: (3.0 * g,))
    b = jnp.ones(4)
    solve = hypergrad.make_solve("gmres", tol=1e-8, maxiter=10)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        x1 = solve(scale, b)
        x2 = solve(scale, 2 * b)
    np.testing.assert_allclose(x1, b / 3, rtol=1e-6)
    np.testing.assert_allclose(x2, 2 * b / 3, rtol=1e-6)
    msgs = [w for w in caught if issubclass(w.category, hypergrad.HypergradWarning)]
    assert len(msgs) == 1 and "not differentiable a second time" in str(msgs[0].message)
