"""Implicit hypergradients of bilevel problems, through jaxopt's implicit differentiation.

Problem: an inner solution x*(θ) defined by a root ``F(x*, θ) = 0`` (or a fixed point
``x* = T(x*, θ)``, i.e. ``F = x - T``) and an outer loss ``L(x, θ)``. The implicit function
theorem gives

    dL/dθ = ∂_θ L + (∂_θ F)ᵀ u,    with    (∂_x F)ᵀ u = -∂_x L    (all at (x*, θ)).

``jaxopt.implicit_diff.root_vjp`` builds that linear system and hands it to ``solve``; this
module supplies the solvers, among them the K-step fixed-point ("Neumann") iteration of the
original I-BAU code (Grazzi et al., ICML 2020). For the fixed-point form ∂_x F = I - J with
J = ∂_x T, so K Neumann steps from u_0 = 0 give u_K = -Σ_{k<K} (Jᵀ)^k ∂_x L, exactly the
original code's v_K = Σ_{k<K} (Jᵀ)^k ∇_x L_outer (with the sign folded into ∂_θ F = -∂_θ T).

Every function here is pure and works under ``jit``; ``solve`` functions take
``(matvec, b)`` with pytree ``b`` and return x with ``matvec(x) ≈ b``.

Diagnostics: ``root_hypergrad(..., return_info=True)`` (and ``fixed_point_hypergrad``) also
return a :class:`HypergradInfo` of arrays (residual ‖A u − b‖, ‖b‖, iterations, a divergence
flag), usable under ``jit``/``vmap``; :func:`check_info` turns it into a Python warning on
the host. :func:`unrolled_hypergrad` differentiates through T inner steps instead (full or
truncated backprop), for comparison. See docs/bilevel.md.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from .errors import ConfigError

with warnings.catch_warnings():
    # jaxopt is unmaintained and warns on import; it is pinned and used only in this module.
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    import jaxopt

PyTree = Any
Solve = Callable[[Callable[[PyTree], PyTree], PyTree], PyTree]

_UNROLL_MAX = 16
KRYLOV = ("normal_cg", "gmres", "cg", "bicgstab")
SOLVERS = ("neumann", *KRYLOV, "dense")


def neumann(K: int, step: float = 1.0) -> Solve:
    """K Richardson steps from zero for A x = b: x_{k+1} = x_k + step·(b - A x_k).

    x_1 = step·b needs no product with A, so K steps cost K-1 matvecs. With A = I - J
    (fixed-point form) and step 1 this is the truncated Neumann series Σ_{k<K} J^k b.
    It converges only when the spectral radius of I - step·A is below 1; with K fixed
    it is a deliberate approximation (the original I-BAU uses K = 5).

    The returned function carries ``.with_info(matvec, b) -> (x, ‖r_{K-1}‖)`` (same x, plus
    the norm of the residual b - A x_{K-1} seen in the last step, at no extra matvec) and
    ``.iterations = K``; :func:`solve_with_info` uses them to flag a growing residual.
    """
    if K < 1:
        raise ConfigError(f"neumann needs K >= 1, got K={K}")

    def run(matvec, b):
        def body(_, carry):
            x, _ = carry
            r = jax.tree.map(lambda bi, ai: bi - ai, b, matvec(x))
            return jax.tree.map(lambda xi, ri: xi + step * ri, x, r), tree_norm(r)

        # r_0 = b, so x_1 = step·b and ‖r_0‖ = ‖b‖ without a matvec
        carry = (jax.tree.map(lambda bi: step * bi, b), tree_norm(b))
        if K <= _UNROLL_MAX:  # small K: unrolled, so XLA schedules (and cost-counts) every step
            for k in range(1, K):
                carry = body(k, carry)
            return carry
        return jax.lax.fori_loop(1, K, body, carry)

    def solve(matvec, b):
        # the norm is dead code here and removed by XLA
        return run(matvec, b)[0]

    solve.with_info = run
    solve.iterations = K
    return solve


def dense_solve(matvec: Callable[[PyTree], PyTree], b: PyTree, chunk_size: int = 256) -> PyTree:
    """Exact solve: materialise A column by column (``chunk_size`` matvecs at a time) and LU-solve.

    Costs n matvecs for n unknowns; meant for checking (δ of CIFAR-10 has 3,072 entries).
    """
    b_flat, unravel = ravel_pytree(b)
    n = b_flat.shape[0]
    flat_mv = lambda v: ravel_pytree(matvec(unravel(v)))[0]
    nchunks = -(-n // chunk_size)
    eye = jnp.eye(nchunks * chunk_size, n, dtype=b_flat.dtype).reshape(nchunks, chunk_size, n)
    cols = jax.lax.map(jax.vmap(flat_mv), eye).reshape(-1, n)[:n]  # row i = A e_i
    return unravel(jnp.linalg.solve(cols.T, b_flat))


def _flat_system(matvec: Callable[[PyTree], PyTree], b: PyTree, ridge: float | None):
    """(b_flat, unravel, mv) with mv(v) = A v (+ ridge·v) on flat vectors."""
    b_flat, unravel = ravel_pytree(b)

    def mv(v):
        out = ravel_pytree(matvec(unravel(v)))[0]
        return out if ridge is None else out + ridge * v
    return b_flat, unravel, mv


def _cg(mv, b, tol, maxiter):
    """Conjugate gradients from x0 = 0 until ‖r‖ ≤ tol·‖b‖; returns (x, iterations)."""
    atol2 = (tol * jnp.linalg.norm(b)) ** 2

    def cond(s):
        return (s[3] > atol2) & (s[4] < maxiter)

    def body(s):
        x, r, p, rr, k = s
        ap = mv(p)
        alpha = rr / jnp.vdot(p, ap)
        x, r = x + alpha * p, r - alpha * ap
        rr_new = jnp.vdot(r, r)
        return x, r, r + (rr_new / rr) * p, rr_new, k + 1

    s = (jnp.zeros_like(b), b, b, jnp.vdot(b, b), jnp.int32(0))
    s = jax.lax.while_loop(cond, body, s)
    return s[0], s[4]


def _gmres(mv, b, tol, maxiter, restart):
    """Restarted GMRES(restart) from x0 = 0 (Arnoldi with classical Gram-Schmidt applied twice);
    ``maxiter`` counts restart cycles, as in jax.scipy. Returns (x, cycles)."""
    n = b.shape[0]
    m = min(restart, n)
    atol = tol * jnp.linalg.norm(b)

    def cycle(x, r, beta):
        V = jnp.zeros((m + 1, n), b.dtype).at[0].set(r / jnp.where(beta > 0, beta, 1))
        H = jnp.zeros((m + 1, m), b.dtype)

        def arnoldi(j, VH):
            V, H = VH
            w = mv(V[j])
            for _ in range(2):       # rows of V beyond j are still zero
                h = V @ w
                w = w - h @ V
                H = H.at[:, j].add(h)
            hn = jnp.linalg.norm(w)
            # exact breakdown (hn = 0): a zero basis vector keeps A V_m = V_{m+1} H true
            return V.at[j + 1].set(w / jnp.where(hn > 0, hn, 1)), H.at[j + 1, j].set(hn)

        V, H = jax.lax.fori_loop(0, m, arnoldi, (V, H))
        y = jnp.linalg.lstsq(H, jnp.zeros(m + 1, b.dtype).at[0].set(beta))[0]
        return x + y @ V[:m]

    def cond(s):
        return (s[2] > atol) & (s[3] < maxiter)

    def body(s):
        x, r, beta, k = s
        x = cycle(x, r, beta)
        r = b - mv(x)
        return x, r, jnp.linalg.norm(r), k + 1

    s = jax.lax.while_loop(cond, body, (jnp.zeros_like(b), b, jnp.linalg.norm(b), jnp.int32(0)))
    return s[0], s[3]


def _bicgstab(mv, b, tol, maxiter):
    """BiCGSTAB (van der Vorst 1992) from x0 = 0, shadow residual b; returns (x, iterations).
    Stops at ‖r‖ ≤ tol·‖b‖, after maxiter iterations, or on a breakdown (non-finite residual)."""
    atol = tol * jnp.linalg.norm(b)
    one = jnp.ones((), b.dtype)

    def cond(s):
        rn = jnp.linalg.norm(s[1])
        return (rn > atol) & jnp.isfinite(rn) & (s[8] < maxiter)

    def body(s):
        x, r, rhat, p, v, rho, alpha, omega, k = s
        rho_new = jnp.vdot(rhat, r)
        p = r + (rho_new / rho) * (alpha / omega) * (p - omega * v)
        v = mv(p)
        alpha = rho_new / jnp.vdot(rhat, v)
        sv = r - alpha * v
        t = mv(sv)
        tt = jnp.vdot(t, t)
        omega = jnp.where(tt > 0, jnp.vdot(t, sv) / jnp.where(tt > 0, tt, 1), 0)
        return x + alpha * p + omega * sv, sv - omega * t, rhat, p, v, rho_new, alpha, omega, k + 1

    z = jnp.zeros_like(b)
    s = jax.lax.while_loop(cond, body, (z, b, b, z, z, one, one, one, jnp.int32(0)))
    return s[0], s[8]


def krylov(name: str, tol: float = 1e-6, maxiter: int | None = None,
           ridge: float | None = None, restart: int = 20) -> Solve:
    """Krylov solver ``cg``, ``normal_cg``, ``gmres`` or ``bicgstab`` for A x = b, from x0 = 0.

    Stops when ‖r‖ ≤ tol·‖b‖ (``normal_cg``: the residual of AᵀA x = Aᵀb) or after
    ``maxiter`` iterations (``gmres``: restart cycles of ``restart`` Arnoldi steps; default
    10·n, as jax.scipy). ``ridge`` adds ridge·I to the iterated operator (to AᵀA for
    ``normal_cg``), as jaxopt's solvers do.

    The algorithms are those of jaxopt's ``solve_*`` / jax.scipy, written here so that no
    solver ever transposes ``matvec`` with ``jax.linear_transpose``: jax.scipy's gmres and
    bicgstab register a transpose solve and jaxopt's normal_cg forms Aᵀb that way, which
    fails on models with ``custom_vjp`` layers (``ibau_jax.conv``). ``normal_cg`` gets Aᵀ
    from one ``jax.vjp`` of the (linear) matvec. The returned function carries
    ``.with_iterations(matvec, b) -> (x, iterations)``.
    """
    if name not in KRYLOV:
        raise ConfigError(f"unknown Krylov solver {name!r}; choose one of {', '.join(KRYLOV)}")

    def run(matvec, b):
        if name == "normal_cg":
            b_flat, unravel, mv = _flat_system(matvec, b, None)
            _, vjp = jax.vjp(mv, jnp.zeros_like(b_flat))   # mv is linear: its VJP is Aᵀ
            at = lambda y: vjp(y)[0]
            op = (lambda v: at(mv(v))) if ridge is None else (lambda v: at(mv(v)) + ridge * v)
            rhs = at(b_flat)
        else:
            rhs, unravel, op = _flat_system(matvec, b, ridge)
        cap = 10 * rhs.shape[0] if maxiter is None else maxiter
        if name in ("cg", "normal_cg"):
            x, k = _cg(op, rhs, tol, cap)
        elif name == "gmres":
            x, k = _gmres(op, rhs, tol, cap, restart)
        else:
            x, k = _bicgstab(op, rhs, tol, cap)
        return unravel(x), k

    def with_iterations(matvec, b):
        # Registered with lax.custom_linear_solve so that grad-of-grad differentiates the
        # solve implicitly; that needs jax.linear_transpose(matvec) (cg: symmetric, none),
        # which custom_vjp layers do not allow: there the solve is returned undifferentiable.
        if name == "cg":
            return jax.lax.custom_linear_solve(matvec, b, run, symmetric=True, has_aux=True)
        try:
            return jax.lax.custom_linear_solve(matvec, b, run, transpose_solve=run, has_aux=True)
        except NotImplementedError:
            _warn_once(name, f"solver {name!r}: the linear system's matvec cannot be transposed (the model has "
                             "custom_vjp layers), so this solve is not differentiable a second time; the "
                             "hypergradient itself is exact, but a derivative OF it is not (use solver='cg' on "
                             "a symmetric system, or 'dense', for grad-of-hypergradient)")
            return run(matvec, b)

    def solve(matvec, b):
        return with_iterations(matvec, b)[0]

    solve.with_iterations = with_iterations
    return solve


_WARNED: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    """A ``HypergradWarning`` the first time ``key`` occurs in this process (fallbacks are said, once)."""
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, HypergradWarning, stacklevel=3)


def make_solve(name: str, *, K: int = 5, step: float = 1.0, tol: float = 1e-6,
               maxiter: int | None = None, ridge: float | None = None) -> Solve:
    """A linear solver by name: ``neumann`` (K, step), ``normal_cg``, ``gmres``, ``cg``,
    ``bicgstab`` (tol, maxiter, ridge) or ``dense``.

    ``cg`` assumes a symmetric positive definite system; the I-BAU inner Hessian is
    indefinite, where ``normal_cg``, ``gmres`` and ``dense`` stay exact. (jaxopt's
    ``solve_cholesky`` returns NaN there and is deliberately not offered.)
    """
    if name == "neumann":
        return neumann(K, step)
    if name == "dense":
        return dense_solve
    if name in KRYLOV:
        return krylov(name, tol=tol, maxiter=maxiter, ridge=ridge)
    raise ConfigError(f"unknown solver {name!r}; choose one of {', '.join(SOLVERS)}")


class HypergradInfo(NamedTuple):
    """Diagnostics of the linear solve A u = b inside a hypergradient (all jax arrays).

    Under ``vmap`` every field gets the batch axis.

    residual_norm: ‖A u − b‖₂ of the returned u (one extra matvec to compute), float scalar.
    rhs_norm: ‖b‖₂ (b = −∂_x L for root_vjp), float scalar; residual_norm / rhs_norm is the
        relative residual, 1 for u = 0.
    iterations: int32 scalar; K for ``neumann``, 0 for ``dense`` (direct), the iterations run
        for the Krylov solvers (``gmres``: restart cycles), −1 for a user solver that does not
        report them.
    diverged: bool scalar; the residual is non-finite, or larger than ‖b‖ (worse than
        u = 0), or — for ``neumann`` — grew over the last step, ‖r_K‖ > ‖r_{K−1}‖ (while
        above √eps·‖b‖). For a
        symmetric A the Richardson residual norm is log-convex in k, so growth at the last
        step means a mode with |1 − step·λ| > 1 dominates and the series diverges.
    """

    residual_norm: jax.Array
    rhs_norm: jax.Array
    iterations: jax.Array
    diverged: jax.Array


class HypergradWarning(RuntimeWarning):
    """Warned by :func:`check_info` when a hypergradient's linear solve diverged or stalled."""


def tree_norm(tree: PyTree) -> jax.Array:
    """Euclidean norm of all leaves of a pytree taken together (0-d array)."""
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return jnp.zeros(())
    return jnp.sqrt(sum(jnp.sum(jnp.abs(leaf) ** 2) for leaf in leaves))


def solve_with_info(solve: Solve, matvec: Callable[[PyTree], PyTree],
                    b: PyTree) -> tuple[PyTree, HypergradInfo]:
    """``x = solve(matvec, b)`` plus a :class:`HypergradInfo` of the solve (one extra matvec)."""
    if hasattr(solve, "with_info"):          # neumann: also the residual of the previous step
        x, prev = solve.with_info(matvec, b)
        iterations = solve.iterations
    elif hasattr(solve, "with_iterations"):  # Krylov solvers count their iterations
        (x, iterations), prev = solve.with_iterations(matvec, b), None
    else:
        x, prev = solve(matvec, b), None
        iterations = getattr(solve, "iterations", 0 if solve is dense_solve else -1)
    res = tree_norm(jax.tree.map(jnp.subtract, matvec(x), b))
    rhs = tree_norm(b)
    diverged = ~jnp.isfinite(res) | (res > rhs)
    if prev is not None:
        # growth counts only above √eps·‖b‖: at convergence the residual is rounding noise
        floor = jnp.sqrt(jnp.finfo(res.dtype).eps) * rhs
        diverged = diverged | ((res > prev) & (res > floor))
    return x, HypergradInfo(res, rhs, jnp.asarray(iterations, jnp.int32), diverged)


def check_info(info: HypergradInfo, rtol: float | None = None, stacklevel: int = 2) -> bool:
    """Host-side check: warn (:class:`HypergradWarning`) if any solve diverged, or, with
    ``rtol``, if any relative residual exceeds it. Returns True when nothing was warned.

    Call it outside ``jit`` on a returned (possibly vmapped) info; it blocks on the values.
    """
    res, rhs = np.asarray(info.residual_norm), np.asarray(info.rhs_norm)
    div = np.asarray(info.diverged)
    ok = True
    if div.any():
        ok = False
        warnings.warn(f"hypergradient linear solve diverged in {int(div.sum())} of {div.size} "
                      f"case(s): residual {np.max(res):.3g} vs ‖b‖ {np.max(rhs):.3g} "
                      "(Neumann/fixed-point iteration on a system with spectral radius ≥ 1? "
                      "use gmres, normal_cg or dense)", HypergradWarning, stacklevel=stacklevel)
    if rtol is not None:
        rel = res / np.maximum(rhs, np.finfo(np.float64).tiny)
        bad = ~(rel <= rtol)
        if bad.any() and not div.any():
            ok = False
            warnings.warn(f"hypergradient linear solve not converged: relative residual "
                          f"{np.nanmax(rel):.3g} > rtol {rtol:g}", HypergradWarning,
                          stacklevel=stacklevel)
    return ok


def root_hypergrad(optimality_fun: Callable[[PyTree, PyTree], PyTree],
                   outer_loss: Callable[[PyTree, PyTree], jax.Array],
                   sol: PyTree, theta: PyTree, solve: Solve, has_aux: bool = False,
                   return_info: bool = False):
    """Hypergradient dL(x*(θ), θ)/dθ for a root ``optimality_fun(x*, θ) = 0``.

    One backward pass of ``outer_loss`` gives (∂_x L, ∂_θ L); ``jaxopt.implicit_diff.root_vjp``
    adds the implicit term (∂_θ F)ᵀ u with (∂_x F)ᵀ u = −∂_x L. Returns ``(loss, grad)``
    (``((loss, aux), grad)`` with has_aux), grad shaped like θ; with ``return_info`` also a
    :class:`HypergradInfo` of that linear solve: ``(loss, grad, info)``.
    """
    value, (g_x, g_theta) = jax.value_and_grad(outer_loss, argnums=(0, 1), has_aux=has_aux)(sol, theta)
    if not return_info:
        (implicit,) = jaxopt.implicit_diff.root_vjp(optimality_fun, sol, (theta,), g_x, solve=solve)
        return value, jax.tree.map(jnp.add, g_theta, implicit)

    infos = []

    def recording_solve(matvec, b):
        # root_vjp calls solve exactly once, inside this trace; keep its info
        x, info = solve_with_info(solve, matvec, b)
        infos.append(info)
        return x

    (implicit,) = jaxopt.implicit_diff.root_vjp(optimality_fun, sol, (theta,), g_x,
                                                solve=recording_solve)
    return value, jax.tree.map(jnp.add, g_theta, implicit), infos[0]


def fixed_point_hypergrad(fixed_point_fun: Callable[[PyTree, PyTree], PyTree],
                          outer_loss: Callable[[PyTree, PyTree], jax.Array],
                          sol: PyTree, theta: PyTree, solve: Solve, has_aux: bool = False,
                          return_info: bool = False):
    """Hypergradient for a fixed point ``x* = fixed_point_fun(x*, θ)``: the root of x - T(x, θ).

    With ``solve = neumann(K)`` this is the original I-BAU / Grazzi et al. "fixed_point"
    hypergradient: v_0 = 0, v_{k+1} = Jᵀ v_k + ∂_x L, result ∂_θ L + (∂_θ T)ᵀ v_K.
    ``return_info`` as in :func:`root_hypergrad`; the system there is (I − J)ᵀ u = −∂_x L.
    """
    def optimality(x, th):
        return jax.tree.map(jnp.subtract, x, fixed_point_fun(x, th))

    return root_hypergrad(optimality, outer_loss, sol, theta, solve, has_aux=has_aux,
                          return_info=return_info)


def unrolled_hypergrad(step_fn: Callable[[PyTree, PyTree], PyTree],
                       outer_loss: Callable[[PyTree, PyTree], jax.Array],
                       x0: PyTree, theta: PyTree, T: int, truncate: int | None = None,
                       has_aux: bool = False):
    """Hypergradient by differentiating through T inner steps x_{t+1} = step_fn(x_t, θ).

    Returns ``(L(x_T, θ), dL(x_T(θ), θ)/dθ)`` (``((L, aux), grad)`` with has_aux); x0 is a
    constant. ``truncate=None`` backpropagates through all T steps (reverse mode, memory
    O(T·|x|)); ``truncate=k`` (0 ≤ k ≤ T) only through the last k: x_{T−k} is passed
    through ``stop_gradient`` (truncated backprop, Shaban et al. 2019), which biases the
    result unless the early iterates did not depend on θ. Both are ``lax.scan`` loops.
    """
    if T < 0:
        raise ConfigError(f"unrolled_hypergrad needs T >= 0, got T={T}")
    k = T if truncate is None else truncate
    if not 0 <= k <= T:
        raise ConfigError(f"truncate must be in [0, T={T}], got {truncate}")

    def run(x, th, n):
        if n == 0:
            return x
        x, _ = jax.lax.scan(lambda xt, _: (step_fn(xt, th), None), x, None, length=n)
        return x

    def objective(th):
        # the first T−k steps see a constant θ, so reverse mode stores nothing for them
        x = jax.lax.stop_gradient(run(x0, jax.lax.stop_gradient(th), T - k))
        return outer_loss(run(x, th, k), th)

    return jax.value_and_grad(objective, has_aux=has_aux)(theta)
