"""I-BAU as pure, jitted functions (see ../shared/ALGORITHM.md for the method and its quirks).

One round, on a clean set split into B batches xb (B, n, H, W, C), yb (B, n):

1. ``search_perturbation``: δ = 0; one pass over the batches (a ``lax.scan``), each an
   optimizer step on  -CE(f(x + δ), labels) + search_reg·‖δ‖²  (labels: the model's own
   predictions on the clean batch in the original code).
2. ``project_l2``: δ ← δ·min(1, radius/‖δ‖).
3. ``outer_step`` per batch b (a second ``lax.scan``): one optax step on θ with the implicit
   hypergradient of  L_outer = CE(f(x_b + m_b δ), y_b)  through the fixed point
   δ = Φ(δ, θ) = δ - η ∇_δ L_inner(δ, θ),  L_inner = mean(-CE(f(x_in + δ), y_in)) + inner_reg·‖δ‖²,
   where m_b marks ``portion`` of the batch and x_in is batch 0 (original) or batch b.

``make_round`` compiles steps 1-3 into one call. The model stays in eval mode throughout
(BatchNorm running statistics, no dropout), as in the original code.
"""
from __future__ import annotations

import dataclasses
import random
from typing import Any, Callable, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .. import hypergrad

PyTree = Any
LogitsFn = Callable[[PyTree, jax.Array], jax.Array]  # (params, x (N,H,W,C)) -> logits (N, classes)


@dataclasses.dataclass(frozen=True)
class IBAUConfig:
    """Hyperparameters of I-BAU. Defaults = the original code's notebook (``faithful``)."""

    batch_size: int = 100
    K: int = 5                                    # fixed-point (Neumann) steps
    solver: str = "neumann"                       # see hypergrad.SOLVERS
    solver_tol: float = 1e-6                      # iterative solvers only
    solver_maxiter: int | None = 100
    fp_step: float = 0.1                          # η of Φ(δ, θ) = δ - η ∇_δ L_inner
    inner_reg: float = 1e-3
    inner_batch: Literal["first", "current"] = "first"      # original: always batch 0
    search_lr: float = 10.0
    search_reg: float = 1e-3
    search_optimizer: Literal["sgd", "adam"] = "sgd"         # GTSRB notebook: adam, lr 1.0
    search_labels: Literal["predicted", "true"] = "predicted"
    clip_images: bool = False                     # clip x + δ to [0, 1] in the search (GTSRB notebook)
    radius: float | None = 10.0                   # L2 projection; None = off (defense.py)
    portion: float = 0.01                         # fraction of each outer batch that gets δ
    outer_optimizer: Literal["adam", "sgd"] = "adam"
    outer_lr: float = 1e-3

    @classmethod
    def faithful(cls, **overrides: Any) -> "IBAUConfig":
        """The original notebook: K=5 Neumann, batch 0 in Φ, 1% perturbed, L2 projection 10."""
        return cls(**overrides)

    @classmethod
    def defense_py(cls, **overrides: Any) -> "IBAUConfig":
        """The original defense.py: as ``faithful`` but without the L2 projection."""
        return cls(**{"radius": None, **overrides})

    def __post_init__(self):
        if self.solver not in hypergrad.SOLVERS:
            raise ValueError(f"unknown solver {self.solver!r}; choose one of {', '.join(hypergrad.SOLVERS)}")
        if self.K < 1:
            raise ValueError(f"K must be >= 1, got {self.K}")
        if not 0.0 <= self.portion <= 1.0:
            raise ValueError(f"portion must be in [0, 1], got {self.portion}")
        for name, allowed in (("inner_batch", ("first", "current")), ("search_optimizer", ("sgd", "adam")),
                              ("search_labels", ("predicted", "true")), ("outer_optimizer", ("adam", "sgd"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")

    @property
    def n_perturbed(self) -> int:
        """Images per outer batch that receive δ: int(portion · batch_size), as the original."""
        return int(self.batch_size * self.portion)

    def make_solve(self) -> hypergrad.Solve:
        return hypergrad.make_solve(self.solver, K=self.K, tol=self.solver_tol, maxiter=self.solver_maxiter)

    def outer_tx(self) -> optax.GradientTransformation:
        # PyTorch Adam defaults (b1 .9, b2 .999, eps 1e-8) equal optax's.
        return optax.adam(self.outer_lr) if self.outer_optimizer == "adam" else optax.sgd(self.outer_lr)

    def search_tx(self) -> optax.GradientTransformation:
        return optax.sgd(self.search_lr) if self.search_optimizer == "sgd" else optax.adam(self.search_lr)


def _ce(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example cross-entropy (N,)."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def inner_loss(logits_fn: LogitsFn, delta: jax.Array, params: PyTree, x: jax.Array, y: jax.Array,
               reg: float) -> jax.Array:
    """L_inner(δ, θ) = mean(-CE(f(x + δ), y)) + reg·‖δ‖²;  δ (1, H, W, C), x (n, H, W, C)."""
    return -jnp.mean(_ce(logits_fn(params, x + delta), y)) + reg * jnp.sum(delta ** 2)


def fixed_point_map(logits_fn: LogitsFn, delta: jax.Array, params: PyTree, x: jax.Array, y: jax.Array,
                    step: float, reg: float) -> jax.Array:
    """Φ(δ, θ) = δ - step·∇_δ L_inner(δ, θ)."""
    return delta - step * jax.grad(inner_loss, argnums=1)(logits_fn, delta, params, x, y, reg)


def outer_loss(logits_fn: LogitsFn, delta: jax.Array, params: PyTree, x: jax.Array, y: jax.Array,
               mask: jax.Array) -> jax.Array:
    """L_outer(δ, θ) = mean(CE(f(x + m δ), y)) with mask m (n,) in {0, 1}."""
    return jnp.mean(_ce(logits_fn(params, x + mask[:, None, None, None] * delta), y))


def project_l2(delta: jax.Array, radius: float | None) -> jax.Array:
    """δ·min(1, radius/‖δ‖₂); identity when radius is None."""
    if radius is None:
        return delta
    norm = jnp.sqrt(jnp.sum(delta ** 2))
    return delta * jnp.minimum(1.0, radius / jnp.maximum(norm, 1e-12))


def search_perturbation(logits_fn: LogitsFn, params: PyTree, xb: jax.Array, yb: jax.Array,
                        config: IBAUConfig, delta0: jax.Array | None = None) -> jax.Array:
    """Step 1: one optimizer pass of δ over the batches xb (B, n, H, W, C). Returns δ (1, H, W, C).

    δ starts at ``delta0`` (default: zeros, as the original) with a fresh optimizer state.
    """
    tx = config.search_tx()
    delta = jnp.zeros((1,) + xb.shape[2:], xb.dtype) if delta0 is None else delta0

    def loss(d, x, labels):
        xp = x + d
        if config.clip_images:
            xp = jnp.clip(xp, 0.0, 1.0)
        return -jnp.mean(_ce(logits_fn(params, xp), labels)) + config.search_reg * jnp.sum(d ** 2)

    def body(carry, batch):
        d, opt_state = carry
        x, y = batch
        labels = jnp.argmax(logits_fn(params, x), -1) if config.search_labels == "predicted" else y
        g = jax.grad(loss)(d, x, labels)
        updates, opt_state = tx.update(g, opt_state, d)
        return (optax.apply_updates(d, updates), opt_state), None

    (delta, _), _ = jax.lax.scan(body, (delta, tx.init(delta)), (xb, yb))
    return delta


def hypergradient(logits_fn: LogitsFn, params: PyTree, delta: jax.Array, x_in: jax.Array, y_in: jax.Array,
                  x_out: jax.Array, y_out: jax.Array, mask: jax.Array, config: IBAUConfig):
    """(L_outer, dL_outer/dθ) through the fixed point δ = Φ(δ, θ), with ``config``'s solver."""
    phi = lambda d, p: fixed_point_map(logits_fn, d, p, x_in, y_in, config.fp_step, config.inner_reg)
    lout = lambda d, p: outer_loss(logits_fn, d, p, x_out, y_out, mask)
    return hypergrad.fixed_point_hypergrad(phi, lout, delta, params, config.make_solve())


def outer_step(logits_fn: LogitsFn, config: IBAUConfig, params: PyTree, opt_state: optax.OptState,
               delta: jax.Array, x_in: jax.Array, y_in: jax.Array, x_out: jax.Array, y_out: jax.Array,
               mask: jax.Array):
    """One optax step on θ with the hypergradient. Returns (params, opt_state, loss)."""
    loss, grads = hypergradient(logits_fn, params, delta, x_in, y_in, x_out, y_out, mask, config)
    updates, opt_state = config.outer_tx().update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


def random_masks(key: jax.Array, num_batches: int, config: IBAUConfig) -> jax.Array:
    """(B, n) float masks, each row with ``n_perturbed`` ones at distinct random positions."""
    n = config.batch_size

    def one(k):
        idx = jax.random.permutation(k, n)[: config.n_perturbed]
        return jnp.zeros((n,), jnp.float32).at[idx].set(1.0)

    return jax.vmap(one)(jax.random.split(key, num_batches))


MASK_RNGS = ("python", "jax")


def python_masks(rng: random.Random, num_batches: int, config: IBAUConfig) -> np.ndarray:
    """(B, n) float32 masks drawn as the original code draws them: per outer batch,
    ``rng.sample(range(n), n_perturbed)`` with Python's ``random`` (the original calls
    ``random.sample(list(np.arange(n)), int(n * portion))`` once per outer step)."""
    masks = np.zeros((num_batches, config.batch_size), np.float32)
    for b in range(num_batches):
        masks[b, rng.sample(range(config.batch_size), config.n_perturbed)] = 1.0
    return masks


def seed_masks(seed: int, rounds: int, num_batches: int, config: IBAUConfig,
               rng: Literal["python", "jax"] = "python") -> np.ndarray:
    """(rounds, B, n) masks of a whole run, as ``ibau-jax unlearn --seed S --mask-rng RNG`` draws them.

    ``python`` (default): one ``random.Random(seed)`` over all rounds, so the perturbed images
    are those of the original code run after ``random.seed(seed)``. ``jax``: round r uses
    ``random_masks`` with the r-th ``jax.random.split`` of ``PRNGKey(seed)``.
    """
    if rng == "python":
        gen = random.Random(seed)
        return np.stack([python_masks(gen, num_batches, config) for _ in range(rounds)])
    if rng == "jax":
        key, out = jax.random.PRNGKey(seed), []
        for _ in range(rounds):
            key, sub = jax.random.split(key)
            out.append(np.asarray(random_masks(sub, num_batches, config)))
        return np.stack(out)
    raise ValueError(f"unknown mask rng {rng!r}; choose one of {', '.join(MASK_RNGS)}")


class RoundOutput(NamedTuple):
    params: PyTree
    opt_state: optax.OptState
    delta: jax.Array          # (1, H, W, C), after projection
    losses: jax.Array         # (B,) outer losses


def unlearn_round(logits_fn: LogitsFn, config: IBAUConfig, params: PyTree, opt_state: optax.OptState,
                  xb: jax.Array, yb: jax.Array, masks: jax.Array,
                  on_step: Callable[[jax.Array], None] | None = None) -> RoundOutput:
    """One whole I-BAU round (search, projection, B outer steps); pure, jit it as a whole.

    ``on_step(loss)``, if given, is called from inside the compiled loop after each outer
    step (through ``jax.debug.callback``), e.g. to advance a progress bar.
    """
    delta = project_l2(search_perturbation(logits_fn, params, xb, yb, config), config.radius)
    delta = jax.lax.stop_gradient(delta)

    def body(carry, batch):
        p, s = carry
        x, y, m = batch
        x_in, y_in = (xb[0], yb[0]) if config.inner_batch == "first" else (x, y)
        p, s, loss = outer_step(logits_fn, config, p, s, delta, x_in, y_in, x, y, m)
        if on_step is not None:
            jax.debug.callback(on_step, loss)
        return (p, s), loss

    (params, opt_state), losses = jax.lax.scan(body, (params, opt_state), (xb, yb, masks))
    return RoundOutput(params, opt_state, delta, losses)


def make_logits_fn(model) -> Callable[[PyTree, PyTree, jax.Array], jax.Array]:
    """(batch_stats, params, x) -> logits of a flax model in eval mode."""
    def logits(batch_stats, params, x):
        return model.apply({"params": params, "batch_stats": batch_stats}, x, train=False)
    return logits


def make_round(model, config: IBAUConfig,
               on_step: Callable[[jax.Array], None] | None = None) -> Callable[..., RoundOutput]:
    """Jitted ``round(params, batch_stats, opt_state, xb, yb, masks) -> RoundOutput``.

    xb (B, n, H, W, C) float32 in [0, 1], yb (B, n) int, masks (B, n) from ``seed_masks`` or ``random_masks``.
    """
    logits = make_logits_fn(model)

    @jax.jit
    def round_fn(params, batch_stats, opt_state, xb, yb, masks):
        fn = lambda p, x: logits(batch_stats, p, x)
        return unlearn_round(fn, config, params, opt_state, xb, yb, masks, on_step)

    return round_fn
