"""Shared Adversarial Unlearning (``sau``; Wei et al., NeurIPS 2023) as pure, jitted functions.

The model f_θ is unlearned against the frozen backdoored model f_0 (its starting weights).
One round is one pass over the shuffled clean set in batches x (n, H, W, C), labels y (n,);
per batch:

1. ``shared_pgd``: per-example perturbations δ (n, H, W, C), ‖δ_i‖∞ ≤ ε, from δ = ε
   (BackdoorBench's ``pgd_init: max``), ``pgd_steps`` signed steps
   δ ← Π(δ - step·sign ∇_δ L_pgd) on

       L_pgd = β1·L_adv + β2·L_js,
       L_adv = -(Σ_{i: f_θ(x_i+δ_i) = f_θ(x_i)} CE(f_θ(x_i+δ_i), y_i)
                 + Σ_{i: f_0(x_i+δ_i) = f_0(x_i)} CE(f_0(x_i+δ_i), y_i)) / (2n),
       L_js  = Σ_{i not shared} JS(p_θ(x_i+δ_i) ‖ p_0(x_i+δ_i)) / n,

   where "shared" = both models' predictions moved away from their clean predictions, to the
   same class; probabilities clamped at 1e-8 (``pgd_objective``). Π clips δ to [-ε, ε] and
   (``clip_images``) to the valid range [-x, 1 - x].
2. ``unlearn_loss``: one Adam step on θ with

       L = λ1·mean CE(f_θ(x), y) + λ2·mean CE(f_θ(x+δ), y) + λ3·L_sar,
       L_sar = Σ_{i ∈ P} [-log(1e-6 + min(1 - p_θ,i, .999)) - log(1 + 1e-6 - max(p_θ,i, .001))] / (2n),

   p_θ,i = softmax(f_θ(x_i+δ_i))[ŷ0_i], ŷ0_i = argmax f_0(x_i+δ_i), and P the examples whose
   adversarial prediction by f_0 differs from both the label and f_0's clean prediction
   (``shared_adversarial_loss``): θ learns not to follow the backdoored model's adversarial
   class. (1 - p is computed as the sum of the other classes' probabilities, as the reference.)

Both models stay in eval mode (BatchNorm running statistics, no dropout; BackdoorBench's
default ``train_mode: False``), so examples are independent and a round is exact under any
padding. Source of the formulas and defaults: BackdoorBench ``defense/sau.py`` (the authors'
implementation) and ``config/defense/sau/config.yaml``.

Padding: per-example weights w (1 real, 0 padding) enter every sum and n = Σw, so the
clean set's last partial batch and a batch padded to a multiple of the device count give the
unpadded result.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .. import sharding
from ..errors import ConfigError, check_finite
from .base import CleanSet, DefenseResult, check_one_batch, run_rounds

PyTree = Any
LogitsFn = Callable[[PyTree, jax.Array], jax.Array]  # (params, x (N,H,W,C)) -> logits (N, classes)

# Fields that only enter arithmetic, so a sweep may trace them (vmap over runs).
SWEEPABLE = ("lr", "eps", "pgd_step", "beta_1", "beta_2", "lambda_1", "lambda_2", "lambda_3")


@dataclasses.dataclass(frozen=True)
class SAUConfig:
    """Hyperparameters of SAU. Defaults = BackdoorBench ``config/defense/sau/config.yaml``
    (the authors' code) unless noted.

    eps 0.2 (``trigger_norm``, L∞ ``norm_type``), pgd_step 0.2 (``adv_lr``), pgd_steps 5
    (``adv_steps``), start δ = +eps (``pgd_init: max``); beta_1 0.01, beta_2 1 (``beta_1``,
    ``beta_2``: weights of L_adv and L_js in the PGD); lambda_1 1, lambda_2 0, lambda_3 1
    (``lmd_1..3``: clean, adversarial-training and shared-adversarial terms); Adam lr 1e-4
    (``lr``, ``client_optimizer: adam``, wd 0; the configured cosine scheduler is never stepped
    in ``sau.py``, so the rate is constant), batch 256, one outer step per batch
    (``outer_steps: 1``). ``rounds``: the reference runs 100 (``n_rounds``) on CIFAR-10 with
    2,500 clean images (1,000 Adam steps). ibau-jax's default 20 (400 steps with the CLI's 5,000
    clean images) is set from the digits demo's small VGG: at lr 1e-4 its ASR stops falling after
    ~60 steps (docs/defenses.md), so 100 rounds would mostly cost time. ``clip_images``: also clip x + δ to [0, 1] (the reference leaves this
    line commented out; ibau-jax keeps adversarial images valid images).
    """

    rounds: int = 20
    batch_size: int = 256
    lr: float = 1e-4
    eps: float = 0.2
    pgd_step: float = 0.2
    pgd_steps: int = 5
    beta_1: float = 0.01
    beta_2: float = 1.0
    lambda_1: float = 1.0
    lambda_2: float = 0.0
    lambda_3: float = 1.0
    clip_images: bool = True

    def __post_init__(self):
        for name in ("rounds", "batch_size", "pgd_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {v!r}")
        if not isinstance(self.clip_images, (bool, np.bool_)):
            raise ConfigError(f"clip_images must be true or false, got {self.clip_images!r}")
        values = {}
        for name in SWEEPABLE:
            v = getattr(self, name)
            if isinstance(v, jax.core.Tracer) or (isinstance(v, np.ndarray) and v.ndim):
                continue  # traced / vmapped sweep values: checked by the sweep
            values[name] = check_finite(name, v)
        if values.get("lr", 1.0) <= 0:
            raise ConfigError(f"lr must be > 0, got {self.lr!r}")
        if "eps" in values and not 0 < values["eps"] <= 1:
            raise ConfigError(f"eps must be in (0, 1] (an L-inf radius on images in [0, 1]), got {self.eps!r}")
        if values.get("pgd_step", 1.0) <= 0:
            raise ConfigError(f"pgd_step must be > 0, got {self.pgd_step!r}")
        for name in ("beta_1", "beta_2", "lambda_1", "lambda_2", "lambda_3"):
            if values.get(name, 0.0) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        lambdas = [values[n] for n in ("lambda_1", "lambda_2", "lambda_3") if n in values]
        if len(lambdas) == 3 and not any(lambdas):
            raise ConfigError("lambda_1, lambda_2 and lambda_3 are all 0, so the unlearning loss is 0; "
                              "set at least one > 0 (defaults 1, 0, 1)")

    def tx(self) -> optax.GradientTransformation:
        # PyTorch Adam defaults (b1 .9, b2 .999, eps 1e-8) equal optax's.
        return optax.adam(self.lr)


def _ce(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example cross-entropy (N,)."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def js_divergence(logits_a: jax.Array, logits_b: jax.Array) -> jax.Array:
    """Per-example Jensen-Shannon divergence (N,) of softmax(logits_a), softmax(logits_b) (N, K),
    each probability clamped at 1e-8 first (as the reference)."""
    p = jnp.maximum(jax.nn.softmax(logits_a, -1), 1e-8)
    q = jnp.maximum(jax.nn.softmax(logits_b, -1), 1e-8)
    m = 0.5 * (p + q)
    return jnp.sum(0.5 * (p * jnp.log(p) + q * jnp.log(q)) - 0.5 * (p * jnp.log(m) + q * jnp.log(m)), -1)


def pgd_objective(logits_fn: LogitsFn, delta: jax.Array, params: PyTree, ref_params: PyTree, x: jax.Array,
                  y: jax.Array, clean_pred: jax.Array, clean_pred_ref: jax.Array, w: jax.Array,
                  beta_1: float, beta_2: float) -> jax.Array:
    """L_pgd(δ) = β1·L_adv + β2·L_js (module docstring), the loss the PGD *descends*.

    delta, x (n, H, W, C); y, clean_pred (argmax f_θ(x)), clean_pred_ref (argmax f_0(x)), w (n,).
    """
    xp = x + delta
    logits, logits_ref = logits_fn(params, xp), logits_fn(ref_params, xp)
    pred, pred_ref = jnp.argmax(logits, -1), jnp.argmax(logits_ref, -1)
    success, success_ref = pred != clean_pred, pred_ref != clean_pred_ref
    shared = success & success_ref & (pred == pred_ref)
    n = jnp.sum(w)
    adv = jnp.sum(w * jnp.where(success, 0.0, _ce(logits, y))) + jnp.sum(w * jnp.where(success_ref, 0.0, _ce(logits_ref, y)))
    loss_adv = -adv / 2 / n
    loss_js = jnp.sum(w * jnp.where(shared, 0.0, js_divergence(logits, logits_ref))) / n
    return beta_1 * loss_adv + beta_2 * loss_js


def project(delta: jax.Array, x: jax.Array, eps: float, clip_images: bool) -> jax.Array:
    """δ clipped to [-eps, eps] and, with ``clip_images``, to [-x, 1 - x] (so x + δ ∈ [0, 1])."""
    delta = jnp.clip(delta, -eps, eps)
    return jnp.clip(delta, -x, 1.0 - x) if clip_images else delta


def shared_pgd(logits_fn: LogitsFn, params: PyTree, ref_params: PyTree, x: jax.Array, y: jax.Array,
               w: jax.Array, config: SAUConfig) -> jax.Array:
    """Shared adversarial perturbations δ (n, H, W, C) of the batch x (n, H, W, C), y (n,).

    δ = Π(+eps); then ``pgd_steps`` times δ ← Π(δ - pgd_step·sign ∇_δ L_pgd). The reference
    stops early once every example is a shared adversarial one; then ∇L_pgd = 0 and further
    steps leave δ unchanged, so a fixed step count gives the same δ.
    """
    clean_pred = jnp.argmax(logits_fn(params, x), -1)
    clean_pred_ref = jnp.argmax(logits_fn(ref_params, x), -1)
    grad = jax.grad(pgd_objective, argnums=1)

    def body(_, d):
        g = grad(logits_fn, d, params, ref_params, x, y, clean_pred, clean_pred_ref, w,
                 config.beta_1, config.beta_2)
        return project(d - config.pgd_step * jnp.sign(g), x, config.eps, config.clip_images)

    delta = project(jnp.full_like(x, config.eps), x, config.eps, config.clip_images)
    return jax.lax.fori_loop(0, config.pgd_steps, body, delta)


def shared_adversarial_loss(adv_logits: jax.Array, adv_pred_ref: jax.Array, potential: jax.Array,
                            w: jax.Array) -> jax.Array:
    """L_sar (module docstring): adv_logits f_θ(x+δ) (n, K), adv_pred_ref argmax f_0(x+δ) (n,),
    potential (n,) bool (the set P), w (n,) weights; a sum over P divided by 2·Σw."""
    probs = jax.nn.softmax(adv_logits, -1)
    one_hot = jax.nn.one_hot(adv_pred_ref, adv_logits.shape[-1], dtype=probs.dtype)
    neg = jnp.sum(probs * (1 - one_hot), -1)
    pos = jnp.sum(probs * one_hot, -1)
    terms = -jnp.log(1e-6 + jnp.minimum(neg, 0.999)) - jnp.log(1 + 1e-6 - jnp.maximum(pos, 0.001))
    return jnp.sum(w * jnp.where(potential, terms, 0.0)) / 2 / jnp.sum(w)


class Losses(NamedTuple):
    total: jax.Array
    clean: jax.Array      # mean CE(f_θ(x), y)
    adv: jax.Array        # mean CE(f_θ(x + δ), y)
    shared: jax.Array     # L_sar
    potential: jax.Array  # Σ w over P: examples whose f_0-adversarial class is neither y nor f_0(x)


def unlearn_loss(logits_fn: LogitsFn, params: PyTree, ref_params: PyTree, x: jax.Array, delta: jax.Array,
                 y: jax.Array, w: jax.Array, config: SAUConfig) -> tuple[jax.Array, Losses]:
    """(L, Losses) of the outer step; the gradient flows into ``params`` only."""
    n = x.shape[0]
    both = logits_fn(params, jnp.concatenate([x, x + delta]))   # one pass; eval mode keeps rows independent
    logits, adv_logits = both[:n], both[n:]
    ref_params = jax.lax.stop_gradient(ref_params)
    pred_ref = jnp.argmax(logits_fn(ref_params, x), -1)
    adv_pred_ref = jnp.argmax(logits_fn(ref_params, x + delta), -1)
    potential = (adv_pred_ref != y) & (adv_pred_ref != pred_ref)
    clean = sharding.weighted_mean(_ce(logits, y), w)
    adv = sharding.weighted_mean(_ce(adv_logits, y), w)
    shared = shared_adversarial_loss(adv_logits, adv_pred_ref, potential, w)
    total = config.lambda_1 * clean + config.lambda_2 * adv + config.lambda_3 * shared
    return total, Losses(total, clean, adv, shared, jnp.sum(w * potential))


class RoundOutput(NamedTuple):
    params: PyTree
    opt_state: optax.OptState
    losses: Losses            # each (B,): per batch
    counts: jax.Array         # (B,) real examples per batch


def sau_round(logits_fn: LogitsFn, config: SAUConfig, params: PyTree, ref_params: PyTree,
              opt_state: optax.OptState, xb: jax.Array, yb: jax.Array, wb: jax.Array,
              on_step: Callable[[jax.Array], None] | None = None) -> RoundOutput:
    """One SAU round over batches xb (B, n, H, W, C), yb (B, n), weights wb (B, n); pure, jit it.

    ``on_step(loss)``, if given, is called from inside the compiled loop after each batch.
    """
    tx = config.tx()

    def body(carry, batch):
        p, s = carry
        x, y, w = batch
        delta = jax.lax.stop_gradient(shared_pgd(logits_fn, p, ref_params, x, y, w, config))
        grads, losses = jax.grad(unlearn_loss, argnums=1, has_aux=True)(logits_fn, p, ref_params, x, delta, y, w,
                                                                       config)
        updates, s = tx.update(grads, s, p)
        p = optax.apply_updates(p, updates)
        if on_step is not None:
            jax.debug.callback(on_step, losses.total)
        return (p, s), (losses, jnp.sum(w))

    (params, opt_state), (losses, counts) = jax.lax.scan(body, (params, opt_state), (xb, yb, wb))
    return RoundOutput(params, opt_state, losses, counts)


def batch_indices(n: int, batch_size: int, key: jax.Array, mesh: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """One round's shuffled batches of a clean set of n: (idx (B, P) int32, wb (B, P) float32).

    A random permutation (``jax.random.permutation(key, n)``; the reference's shuffling
    DataLoader) cut into B = ceil(n / batch_size) batches, the last one possibly smaller (the
    reference keeps it: no ``drop_last``); every batch padded to P = ``padded_size(batch_size,
    mesh)`` entries with index 0 and weight 0.
    """
    perm = np.asarray(jax.random.permutation(key, n)).astype(np.int32)
    nb, size = -(-n // batch_size), sharding.padded_size(batch_size, mesh)
    idx = np.zeros((nb, size), np.int32)
    wb = np.zeros((nb, size), np.float32)
    for b in range(nb):
        part = perm[b * batch_size:(b + 1) * batch_size]
        idx[b, :len(part)], wb[b, :len(part)] = part, 1.0
    return idx, wb


def make_logits_fn(model, batch_stats: PyTree) -> LogitsFn:
    """(params, x) -> logits of a flax model in eval mode with fixed BatchNorm statistics."""
    return lambda params, x: model.apply({"params": params, "batch_stats": batch_stats}, x, train=False)


def make_round(model, config: SAUConfig, on_step: Callable[[jax.Array], None] | None = None,
               mesh: Any = None) -> Callable[..., RoundOutput]:
    """Jitted ``round(params, opt_state, idx, wb, ref_params, batch_stats, x, y) -> RoundOutput``.

    x (N, H, W, C) float32 in [0, 1], y (N,) the clean set; idx, wb (B, P) from
    :func:`batch_indices` (the round's batches are gathered inside the program). With ``mesh``
    one SPMD program: weights, optimizer state and the clean set replicated, idx / wb split along
    the example axis P (a multiple of the device count); outputs replicated.
    """
    def round_fn(params, opt_state, idx, wb, ref_params, batch_stats, x, y):
        fn = make_logits_fn(model, batch_stats)
        return sau_round(fn, config, params, ref_params, opt_state, x[idx], y[idx], wb, on_step)

    if mesh is None:
        return jax.jit(round_fn)
    repl, data = sharding.replicated(mesh), sharding.split_along(mesh, 1)
    return jax.jit(round_fn, in_shardings=(repl, repl, data, data, repl, repl, repl, repl), out_shardings=repl)


class SAU:
    """SAU as a defense: ``config.rounds`` passes of :func:`sau_round` over the shuffled clean set,
    from the given (backdoored) weights, which also serve as the frozen reference f_0.

    History per round: ``round``, ``seconds`` (compile excluded), ``loss`` (the total),
    ``loss_clean``, ``loss_adv``, ``loss_shared`` (means over the round's examples) and
    ``potential_fraction`` (share of examples in P: the backdoored model's adversarial class is
    neither the label nor its clean prediction).
    """

    name = "sau"
    Config = SAUConfig

    def __init__(self, config: SAUConfig | None = None, on_step: Callable[[jax.Array], None] | None = None):
        self.config = config if config is not None else SAUConfig()
        self.on_step = on_step

    def num_steps(self, clean_set: CleanSet) -> int:
        """Outer steps of the whole run (for a progress bar)."""
        return self.config.rounds * -(-len(clean_set) // self.config.batch_size)

    def check_size(self, n: int) -> None:
        """ConfigError when a clean set of ``n`` images holds less than one batch."""
        check_one_batch(n, self.config.batch_size, kind="SAU")

    def run(self, model, variables: PyTree, clean_set: CleanSet, key: jax.Array, *, mesh: Any = None,
            callback=None) -> DefenseResult:
        cfg = self.config
        n = len(clean_set)
        self.check_size(n)
        x = np.asarray(clean_set.x, np.float32)
        if x.size and (x.min() < 0 or x.max() > 1):
            raise ConfigError(f"SAU needs clean images in [0, 1], got values in [{x.min():.3g}, {x.max():.3g}]; "
                              f"pass unnormalized images (data.to_float)")
        y = np.asarray(clean_set.y, np.int32)
        # Round r shuffles with fold_in(key, r): the batches of a run depend only on the key.
        inputs = [batch_indices(n, cfg.batch_size, jax.random.fold_in(key, r), mesh)
                  for r in range(1, cfg.rounds + 1)]
        params, batch_stats = variables["params"], variables["batch_stats"]
        ref_params = params
        opt_state = cfg.tx().init(params)
        round_fn = make_round(model, cfg, self.on_step, mesh)
        if mesh is not None:
            params, opt_state, ref_params, batch_stats, x, y = sharding.replicate(
                mesh, (params, opt_state, ref_params, batch_stats, x, y))
            inputs = [sharding.shard(mesh, inp, axis=1) for inp in inputs]
        else:
            x, y = jnp.asarray(x), jnp.asarray(y)

        @jax.jit
        def step(state, inp, ref_params, batch_stats, x, y):
            out = round_fn(state[0], state[1], inp[0], inp[1], ref_params, batch_stats, x, y)
            return (out.params, out.opt_state), (out.losses, out.counts)

        host_stats = sharding.to_host(batch_stats)
        variables_of = lambda state: {"params": sharding.to_host(state[0]), "batch_stats": host_stats}

        def record_of(r, aux):
            losses, counts = sharding.to_host(aux)
            mean = lambda v: float(np.sum(v * counts) / np.sum(counts))  # per-batch means -> per example
            return {"loss": mean(losses.total), "loss_clean": mean(losses.clean), "loss_adv": mean(losses.adv),
                    "loss_shared": mean(losses.shared),
                    "potential_fraction": float(np.sum(losses.potential) / np.sum(counts))}

        loop = run_rounds(step, (params, opt_state), inputs, consts=(ref_params, batch_stats, x, y),
                          variables_of=variables_of, record_of=record_of, callback=callback,
                          divergence_hint="lower lr (--set lr=...)")
        diagnostics = {"num_batches": int(inputs[0][0].shape[0]), "batch_size": cfg.batch_size,
                       "padded_batch_size": int(inputs[0][0].shape[1]), "devices": sharding.num_devices(mesh)}
        return DefenseResult(variables_of(loop.state), loop.history, diagnostics, loop.seconds,
                             loop.compile_seconds)
