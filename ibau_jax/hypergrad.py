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
"""
from __future__ import annotations

import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

with warnings.catch_warnings():
    # jaxopt is unmaintained and warns on import; it is pinned and used only in this module.
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    import jaxopt
    from jaxopt import linear_solve

PyTree = Any
Solve = Callable[[Callable[[PyTree], PyTree], PyTree], PyTree]

_UNROLL_MAX = 16
SOLVERS = ("neumann", "normal_cg", "gmres", "cg", "bicgstab", "dense")


def neumann(K: int, step: float = 1.0) -> Solve:
    """K Richardson steps from zero for A x = b: x_{k+1} = x_k + step·(b - A x_k).

    x_1 = step·b needs no product with A, so K steps cost K-1 matvecs. With A = I - J
    (fixed-point form) and step 1 this is the truncated Neumann series Σ_{k<K} J^k b.
    It converges only when the spectral radius of I - step·A is below 1; with K fixed
    it is a deliberate approximation (the original I-BAU uses K = 5).
    """
    if K < 1:
        raise ValueError(f"neumann needs K >= 1, got K={K}")

    def solve(matvec, b):
        def body(_, x):
            r = jax.tree.map(lambda bi, ai: bi - ai, b, matvec(x))
            return jax.tree.map(lambda xi, ri: xi + step * ri, x, r)

        x = jax.tree.map(lambda bi: step * bi, b)
        if K <= _UNROLL_MAX:  # small K: unrolled, so XLA schedules (and cost-counts) every step
            for k in range(1, K):
                x = body(k, x)
            return x
        return jax.lax.fori_loop(1, K, body, x)

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
    iterative = {"normal_cg": linear_solve.solve_normal_cg, "gmres": linear_solve.solve_gmres,
                 "cg": linear_solve.solve_cg, "bicgstab": linear_solve.solve_bicgstab}
    if name not in iterative:
        raise ValueError(f"unknown solver {name!r}; choose one of {', '.join(SOLVERS)}")
    fn = iterative[name]
    return lambda matvec, b: fn(matvec, b, ridge=ridge, tol=tol, maxiter=maxiter)


def root_hypergrad(optimality_fun: Callable[[PyTree, PyTree], PyTree],
                   outer_loss: Callable[[PyTree, PyTree], jax.Array],
                   sol: PyTree, theta: PyTree, solve: Solve, has_aux: bool = False):
    """Hypergradient dL(x*(θ), θ)/dθ for a root ``optimality_fun(x*, θ) = 0``.

    One backward pass of ``outer_loss`` gives (∂_x L, ∂_θ L); ``jaxopt.implicit_diff.root_vjp``
    adds the implicit term. Returns ``(loss, grad)`` (``((loss, aux), grad)`` with has_aux),
    grad shaped like θ.
    """
    value, (g_x, g_theta) = jax.value_and_grad(outer_loss, argnums=(0, 1), has_aux=has_aux)(sol, theta)
    (implicit,) = jaxopt.implicit_diff.root_vjp(optimality_fun, sol, (theta,), g_x, solve=solve)
    return value, jax.tree.map(jnp.add, g_theta, implicit)


def fixed_point_hypergrad(fixed_point_fun: Callable[[PyTree, PyTree], PyTree],
                          outer_loss: Callable[[PyTree, PyTree], jax.Array],
                          sol: PyTree, theta: PyTree, solve: Solve, has_aux: bool = False):
    """Hypergradient for a fixed point ``x* = fixed_point_fun(x*, θ)``: the root of x - T(x, θ).

    With ``solve = neumann(K)`` this is the original I-BAU / Grazzi et al. "fixed_point"
    hypergradient: v_0 = 0, v_{k+1} = Jᵀ v_k + ∂_x L, result ∂_θ L + (∂_θ T)ᵀ v_K.
    """
    def optimality(x, th):
        return jax.tree.map(jnp.subtract, x, fixed_point_fun(x, th))

    return root_hypergrad(optimality, outer_loss, sol, theta, solve, has_aux=has_aux)
