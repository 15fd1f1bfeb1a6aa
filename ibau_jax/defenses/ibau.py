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
(BatchNorm running statistics, no dropout), as in the original code. :class:`IBAU` is the
defense (``defenses.get("ibau")``): ``config.rounds`` rounds through ``base.run_rounds``.

Padding: with per-example weights ``wb`` (B, n) (1 real, 0 padding; ``sharding.pad_examples``)
every mean over a batch counts only the real examples, so a batch padded to a multiple of the
device count gives the unpadded result; ``wb=None`` is the plain mean (bitwise as before).
"""
from __future__ import annotations

import dataclasses
import random
from typing import Any, Callable, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .. import hypergrad, sharding
from ..errors import ConfigError, check_finite
from .base import CleanSet, DefenseResult, check_one_batch, run_rounds

PyTree = Any
LogitsFn = Callable[[PyTree, jax.Array], jax.Array]  # (params, x (N,H,W,C)) -> logits (N, classes)
MASK_RNGS = ("python", "jax")


@dataclasses.dataclass(frozen=True)
class IBAUConfig:
    """Hyperparameters of I-BAU. Defaults = the original code's notebook (``faithful``).

    Sources: ../shared/ALGORITHM.md (the original code, github.com/YiZeng623/I-BAU): batch 100,
    K = 5 fixed-point steps, η = 0.1, inner/search L2 weight 1e-3, search SGD lr 10, L2
    radius 10 (notebook; defense.py has none), 1% of each outer batch perturbed, Adam lr 1e-3,
    5 rounds (defense.py; the notebooks show 1). ``solver``/``solver_*``: ibau-jax's exact
    alternatives (docs/solver_study.md). ``mask_rng="python"`` draws the perturbed images
    as the original does after ``random.seed(seed)``. ``max_batches`` > 0 uses only the first
    clean batches (quick runs). ``solver_info`` records the hypergradient solve's residual and
    iterations per outer step (one extra Hessian-vector product per step).
    """

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
    rounds: int = 5
    mask_rng: Literal["python", "jax"] = "python"
    max_batches: int = 0
    solver_info: bool = False

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
            raise ConfigError(f"unknown solver {self.solver!r}; choose one of {', '.join(hypergrad.SOLVERS)}")
        for name, allowed in (("inner_batch", ("first", "current")), ("search_optimizer", ("sgd", "adam")),
                              ("search_labels", ("predicted", "true")), ("outer_optimizer", ("adam", "sgd")),
                              ("mask_rng", MASK_RNGS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name, low in (("K", 1), ("batch_size", 1), ("rounds", 1), ("max_batches", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low:
                raise ConfigError(f"{name} must be an integer >= {low}, got {v!r}")
        if self.solver_maxiter is not None and self.solver_maxiter < 1:
            raise ConfigError(f"solver_maxiter must be >= 1 or None, got {self.solver_maxiter}")
        # Numeric fields may be traced in a sweep (``make_hparam_round``): check concrete values only.
        concrete = lambda v: not isinstance(v, jax.core.Tracer)
        for name in ("fp_step", "inner_reg", "search_lr", "search_reg", "outer_lr", "solver_tol", "portion",
                     "radius"):
            v = getattr(self, name)
            if v is None or not concrete(v):
                continue
            if isinstance(v, np.ndarray) and v.ndim:     # vmapped sweep values
                continue
            f = check_finite(name, v)
            if name in ("fp_step", "search_lr", "outer_lr", "solver_tol", "radius") and f <= 0:
                raise ConfigError(f"{name} must be > 0, got {v!r}" + (" (or None for no projection)" if name == "radius" else ""))
            if name in ("inner_reg", "search_reg") and f < 0:
                raise ConfigError(f"{name} must be >= 0, got {v!r}")
            if name == "portion" and not 0.0 <= f <= 1.0:
                raise ConfigError(f"portion must be in [0, 1], got {v!r}")

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
               reg: float, w: jax.Array | None = None) -> jax.Array:
    """L_inner(δ, θ) = mean(-CE(f(x + δ), y)) + reg·‖δ‖²;  δ (1, H, W, C), x (n, H, W, C), w (n,) or None."""
    return -sharding.weighted_mean(_ce(logits_fn(params, x + delta), y), w) + reg * jnp.sum(delta ** 2)


def fixed_point_map(logits_fn: LogitsFn, delta: jax.Array, params: PyTree, x: jax.Array, y: jax.Array,
                    step: float, reg: float, w: jax.Array | None = None) -> jax.Array:
    """Φ(δ, θ) = δ - step·∇_δ L_inner(δ, θ)."""
    return delta - step * jax.grad(inner_loss, argnums=1)(logits_fn, delta, params, x, y, reg, w)


def outer_loss(logits_fn: LogitsFn, delta: jax.Array, params: PyTree, x: jax.Array, y: jax.Array,
               mask: jax.Array, w: jax.Array | None = None) -> jax.Array:
    """L_outer(δ, θ) = mean(CE(f(x + m δ), y)) with mask m (n,) in {0, 1} (mean over w's real examples)."""
    return sharding.weighted_mean(_ce(logits_fn(params, x + mask[:, None, None, None] * delta), y), w)


def project_l2(delta: jax.Array, radius: float | None) -> jax.Array:
    """δ·min(1, radius/‖δ‖₂); identity when radius is None."""
    if radius is None:
        return delta
    norm = jnp.sqrt(jnp.sum(delta ** 2))
    return delta * jnp.minimum(1.0, radius / jnp.maximum(norm, 1e-12))


def search_perturbation(logits_fn: LogitsFn, params: PyTree, xb: jax.Array, yb: jax.Array,
                        config: IBAUConfig, delta0: jax.Array | None = None,
                        wb: jax.Array | None = None) -> jax.Array:
    """Step 1: one optimizer pass of δ over the batches xb (B, n, H, W, C). Returns δ (1, H, W, C).

    δ starts at ``delta0`` (default: zeros, as the original) with a fresh optimizer state.
    ``wb`` (B, n): per-example weights of padded batches (None: no padding).
    """
    tx = config.search_tx()
    delta = jnp.zeros((1,) + xb.shape[2:], xb.dtype) if delta0 is None else delta0

    def loss(d, x, labels, w):
        xp = x + d
        if config.clip_images:
            xp = jnp.clip(xp, 0.0, 1.0)
        return -sharding.weighted_mean(_ce(logits_fn(params, xp), labels), w) + config.search_reg * jnp.sum(d ** 2)

    def body(carry, batch):
        d, opt_state = carry
        x, y, w = batch
        labels = jnp.argmax(logits_fn(params, x), -1) if config.search_labels == "predicted" else y
        g = jax.grad(loss)(d, x, labels, w)
        updates, opt_state = tx.update(g, opt_state, d)
        return (optax.apply_updates(d, updates), opt_state), None

    (delta, _), _ = jax.lax.scan(body, (delta, tx.init(delta)), (xb, yb, wb))
    return delta


def hypergradient(logits_fn: LogitsFn, params: PyTree, delta: jax.Array, x_in: jax.Array, y_in: jax.Array,
                  x_out: jax.Array, y_out: jax.Array, mask: jax.Array, config: IBAUConfig,
                  w_in: jax.Array | None = None, w_out: jax.Array | None = None, return_info: bool = False):
    """(L_outer, dL_outer/dθ) through the fixed point δ = Φ(δ, θ), with ``config``'s solver
    (plus a ``hypergrad.HypergradInfo`` with ``return_info``)."""
    phi = lambda d, p: fixed_point_map(logits_fn, d, p, x_in, y_in, config.fp_step, config.inner_reg, w_in)
    lout = lambda d, p: outer_loss(logits_fn, d, p, x_out, y_out, mask, w_out)
    return hypergrad.fixed_point_hypergrad(phi, lout, delta, params, config.make_solve(), return_info=return_info)


def outer_step(logits_fn: LogitsFn, config: IBAUConfig, params: PyTree, opt_state: optax.OptState,
               delta: jax.Array, x_in: jax.Array, y_in: jax.Array, x_out: jax.Array, y_out: jax.Array,
               mask: jax.Array, w_in: jax.Array | None = None, w_out: jax.Array | None = None):
    """One optax step on θ with the hypergradient. Returns (params, opt_state, loss, info);
    info is a ``HypergradInfo`` when ``config.solver_info``, else None."""
    out = hypergradient(logits_fn, params, delta, x_in, y_in, x_out, y_out, mask, config, w_in, w_out,
                        return_info=config.solver_info)
    (loss, grads), info = (out[:2], out[2]) if config.solver_info else (out, None)
    updates, opt_state = config.outer_tx().update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, info


def random_masks(key: jax.Array, num_batches: int, config: IBAUConfig) -> jax.Array:
    """(B, n) float masks, each row with ``n_perturbed`` ones at distinct random positions."""
    n = config.batch_size

    def one(k):
        idx = jax.random.permutation(k, n)[: config.n_perturbed]
        return jnp.zeros((n,), jnp.float32).at[idx].set(1.0)

    return jax.vmap(one)(jax.random.split(key, num_batches))


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
    raise ConfigError(f"unknown mask rng {rng!r}; choose one of {', '.join(MASK_RNGS)}")


class RoundOutput(NamedTuple):
    params: PyTree
    opt_state: optax.OptState
    delta: jax.Array          # (1, H, W, C), after projection
    losses: jax.Array         # (B,) outer losses
    info: Any = None          # hypergrad.HypergradInfo with a (B,) axis when config.solver_info


def unlearn_round(logits_fn: LogitsFn, config: IBAUConfig, params: PyTree, opt_state: optax.OptState,
                  xb: jax.Array, yb: jax.Array, masks: jax.Array,
                  on_step: Callable[[jax.Array], None] | None = None,
                  wb: jax.Array | None = None) -> RoundOutput:
    """One whole I-BAU round (search, projection, B outer steps); pure, jit it as a whole.

    xb (B, n, H, W, C), yb (B, n), masks (B, n); ``wb`` (B, n) per-example weights of padded
    batches (None: none padded). ``on_step(loss)``, if given, is called from inside the
    compiled loop after each outer step (through ``jax.debug.callback``), e.g. to advance a
    progress bar.
    """
    delta = project_l2(search_perturbation(logits_fn, params, xb, yb, config, wb=wb), config.radius)
    delta = jax.lax.stop_gradient(delta)
    w0 = None if wb is None else wb[0]

    def body(carry, batch):
        p, s = carry
        x, y, m, w = batch
        x_in, y_in, w_in = (xb[0], yb[0], w0) if config.inner_batch == "first" else (x, y, w)
        p, s, loss, info = outer_step(logits_fn, config, p, s, delta, x_in, y_in, x, y, m, w_in, w)
        if on_step is not None:
            jax.debug.callback(on_step, loss)
        return (p, s), (loss, info)

    (params, opt_state), (losses, info) = jax.lax.scan(body, (params, opt_state), (xb, yb, masks, wb))
    return RoundOutput(params, opt_state, delta, losses, info)


def make_logits_fn(model) -> Callable[[PyTree, PyTree, jax.Array], jax.Array]:
    """(batch_stats, params, x) -> logits of a flax model in eval mode."""
    def logits(batch_stats, params, x):
        return model.apply({"params": params, "batch_stats": batch_stats}, x, train=False)
    return logits


def make_round(model, config: IBAUConfig, on_step: Callable[[jax.Array], None] | None = None,
               mesh: Any = None, padded: bool = False) -> Callable[..., RoundOutput]:
    """Jitted ``round(params, batch_stats, opt_state, xb, yb, masks[, wb]) -> RoundOutput``.

    xb (B, n, H, W, C) float32 in [0, 1], yb (B, n) int, masks (B, n) from ``seed_masks`` or
    ``random_masks``; with ``padded`` also wb (B, n) per-example weights. With ``mesh`` the
    round is one SPMD program: weights and optimizer state replicated, xb / yb / masks / wb
    split along the example axis n (which must then be a multiple of the device count:
    ``prepare_batches`` pads it); outputs replicated.
    """
    logits = make_logits_fn(model)

    def round_fn(params, batch_stats, opt_state, xb, yb, masks, wb=None):
        fn = lambda p, x: logits(batch_stats, p, x)
        return unlearn_round(fn, config, params, opt_state, xb, yb, masks, on_step, wb)

    if mesh is None:
        return jax.jit(round_fn)
    repl, data = sharding.replicated(mesh), sharding.split_along(mesh, 1)
    in_sh = (repl, repl, repl, data, data, data) + ((data,) if padded else ())
    return jax.jit(round_fn, in_shardings=in_sh, out_shardings=repl)


def check_batches(n: int, config: IBAUConfig) -> None:
    """ConfigError when a clean set of ``n`` images holds less than one I-BAU batch."""
    check_one_batch(n, config.batch_size, kind="I-BAU")


def prepare_batches(x: np.ndarray, y: np.ndarray, config: IBAUConfig, mesh: Any = None
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, int]:
    """The clean set as I-BAU batches: (xb (B, n', H, W, C), yb (B, n'), wb (B, n') or None, unused).

    Batches of ``config.batch_size`` in the set's order (the original's fixed order); a
    remainder smaller than a batch is left out (``unused`` counts it); ``max_batches`` > 0
    keeps only the first batches. With a mesh whose device count does not divide the batch
    size, the example axis is zero-padded to n' (a multiple of it) and ``wb`` marks the real
    examples; otherwise wb is None and n' = batch_size.
    """
    n, bs = len(y), config.batch_size
    check_batches(n, config)
    nb = n // bs
    if config.max_batches:
        nb = min(nb, config.max_batches)
    xb = np.asarray(x[: nb * bs], np.float32).reshape(nb, bs, *np.shape(x)[1:])
    yb = np.asarray(y[: nb * bs]).reshape(nb, bs)
    size = sharding.padded_size(bs, mesh)
    wb = None
    if size != bs:
        xb, yb = sharding.pad_examples(xb, 1, size), sharding.pad_examples(yb, 1, size)
        wb = sharding.example_weights(bs, size, (nb,))
    return xb, yb, wb, n - nb * bs


def seed_of_key(key: jax.Array) -> int:
    """The integer seed s of ``PRNGKey(s)`` (its last 32-bit word): the Python ``random`` seed of
    ``mask_rng="python"``, so ``PRNGKey(s)`` draws the original code's masks after ``random.seed(s)``."""
    data = np.asarray(jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key)
    return int(data.reshape(-1)[-1])


# IBAUConfig fields that may be traced (vmapped) in a sweep: they only enter arithmetic.
SWEEPABLE = ("outer_lr", "fp_step", "inner_reg", "radius", "search_lr", "search_reg")


def make_hparam_round(model, config: IBAUConfig, names: Sequence[str], mesh: Any = None,
                      strategy: str = "auto"):
    """Jitted ``round(params, batch_stats, opt_state, xb, yb, masks, hp) -> RoundOutput`` over R runs.

    R runs in one compiled program: params / opt_state with a leading run axis R, masks
    (R, B, n), hp {name: (R,)} for ``names`` ⊆ SWEEPABLE; batch_stats, xb, yb shared. With
    ``mesh`` the example axis of xb / yb / masks is also split over the devices.

    ``strategy``: ``"vmap"`` batches the runs (``jax.vmap``), ``"map"`` runs them one after
    another inside the program (``lax.map``), ``"auto"`` = vmap on accelerators, map on CPU.
    Why: vmapping over per-run weights turns every convolution into a grouped one, which
    XLA's CPU backend runs slowly (4 seeds vmapped took 2.2x the time of 4 separate runs,
    docs/scaling.md); on a GPU the batched convolutions are what fills the device.
    """
    if strategy == "auto":
        strategy = "map" if jax.default_backend() == "cpu" else "vmap"
    if strategy not in ("vmap", "map"):
        raise ConfigError(f"strategy must be 'auto', 'vmap' or 'map', got {strategy!r}")
    bad = [n for n in names if n not in SWEEPABLE]
    if bad:
        raise ConfigError(f"cannot sweep {bad} in one compilation; sweepable: {SWEEPABLE} (loop over K etc.)")
    logits = make_logits_fn(model)

    def one(params, batch_stats, opt_state, xb, yb, masks, hp):
        # Traced hyperparameters in the frozen config: its checks never look at these fields.
        cfg = dataclasses.replace(config, **hp)
        return unlearn_round(lambda p, x: logits(batch_stats, p, x), cfg, params, opt_state, xb, yb, masks)

    if strategy == "vmap":
        batched = jax.vmap(one, in_axes=(0, None, 0, None, None, 0, 0))
    else:
        def batched(params, batch_stats, opt_state, xb, yb, masks, hp):
            run = lambda a: one(a[0], batch_stats, a[1], xb, yb, a[2], a[3])
            return jax.lax.map(run, (params, opt_state, masks, hp))
    if mesh is None:
        return jax.jit(batched)
    sharding.check_divisible(config.batch_size, mesh)
    repl, data = sharding.replicated(mesh), sharding.split_along(mesh, 1)
    return jax.jit(batched, in_shardings=(repl, repl, repl, data, data, sharding.split_along(mesh, 2), repl),
                   out_shardings=repl)


class IBAU:
    """I-BAU as a defense: ``config.rounds`` rounds of :func:`unlearn_round` from the given weights.

    History per round: ``round``, ``seconds`` (compile excluded), ``delta_norm``, ``outer_loss``
    (mean over the round's outer steps) and, with ``solver_info``, the hypergradient solve's
    worst relative residual, mean iterations and the count of diverged solves.
    """

    name = "ibau"
    Config = IBAUConfig

    def __init__(self, config: IBAUConfig | None = None, on_step: Callable[[jax.Array], None] | None = None):
        self.config = config if config is not None else IBAUConfig()
        self.on_step = on_step

    def num_steps(self, clean_set: CleanSet) -> int:
        """Outer steps of the whole run (for a progress bar)."""
        nb = len(clean_set) // self.config.batch_size
        return self.config.rounds * (min(nb, self.config.max_batches) if self.config.max_batches else nb)

    def check_size(self, n: int) -> None:
        """ConfigError when a clean set of ``n`` images holds less than one batch."""
        check_batches(n, self.config)

    def run(self, model, variables: PyTree, clean_set: CleanSet, key: jax.Array, *, mesh: Any = None,
            callback=None) -> DefenseResult:
        cfg = self.config
        xb, yb, wb, unused = prepare_batches(clean_set.x, clean_set.y, cfg, mesh)
        masks = seed_masks(seed_of_key(key), cfg.rounds, xb.shape[0], cfg, cfg.mask_rng)
        if wb is not None:
            masks = sharding.pad_examples(masks, 2, xb.shape[1])
        params, batch_stats = variables["params"], variables["batch_stats"]
        opt_state = cfg.outer_tx().init(params)
        round_fn = make_round(model, cfg, self.on_step, mesh, padded=wb is not None)
        if mesh is not None:
            data = lambda a: sharding.shard(mesh, a, axis=1)
            xb, yb = data(xb), data(yb)
            wb = data(wb) if wb is not None else None
            params, batch_stats, opt_state = sharding.replicate(mesh, (params, batch_stats, opt_state))
            inputs = [data(m) for m in masks]
        else:
            xb, yb = jnp.asarray(xb), jnp.asarray(yb)
            wb = None if wb is None else jnp.asarray(wb)
            inputs = [jnp.asarray(m) for m in masks]
        consts = (batch_stats, xb, yb) + (() if wb is None else (wb,))

        @jax.jit
        def step(state, m, bs, x, y, *w):
            p, s = state
            out = round_fn(p, bs, s, x, y, m, *w)
            return (out.params, out.opt_state), out

        variables_of = lambda state: {"params": sharding.to_host(state[0]),
                                      "batch_stats": sharding.to_host(batch_stats)}

        last: dict[str, Any] = {}

        def record_of(r, out):
            last["delta"] = out.delta
            rec = {"delta_norm": float(np.linalg.norm(sharding.to_host(out.delta))),
                   "outer_loss": float(np.mean(sharding.to_host(out.losses)))}
            if out.info is not None:
                info = sharding.to_host(out.info)
                rel = info.residual_norm / np.maximum(info.rhs_norm, np.finfo(np.float32).tiny)
                rec.update(solver_max_rel_residual=float(np.max(rel)),
                           solver_mean_iterations=float(np.mean(info.iterations)),
                           solver_diverged=int(np.sum(info.diverged)))
            return rec

        hint = ("lower outer_lr (--set outer_lr=...), or use an exact solver (--set solver=gmres, "
                "normal_cg or dense)")
        loop = run_rounds(step, (params, opt_state), inputs, consts=consts, variables_of=variables_of,
                          record_of=record_of, callback=callback, divergence_hint=hint)
        diagnostics = {"num_batches": int(xb.shape[0]), "batch_size": cfg.batch_size,
                       "padded_batch_size": int(xb.shape[1]), "unused_clean_images": unused,
                       "devices": sharding.num_devices(mesh)}
        return DefenseResult(variables_of(loop.state), loop.history, diagnostics, loop.seconds,
                             loop.compile_seconds, artifacts={"delta": sharding.to_host(last["delta"])})
