"""Adversarial Neuron Pruning (``anp``; Wu & Wang, NeurIPS 2021, reference code
github.com/csdongxian/ANP_backdoor: ``optimize_mask_cifar.py``, ``prune_neuron_cifar.py``,
``models/anp_batchnorm.py``).

Every BatchNorm channel c gets a mask m_c ∈ [0, 1] on its scale γ_c and multiplicative noise
δ_c (scale) and ξ_c (bias):

    y = x̂ · γ · (m + δ) + β · (1 + ξ),      x̂ = (x − μ) / √(σ² + eps).

This is done by parameter surgery (:func:`perturbed_variables`: γ ← γ(m + δ), β ← β(1 + ξ)),
so the model itself is unchanged. One iteration, on a batch drawn with replacement from the
clean set (random crop and flip, as the reference's data loader):

1. δ, ξ ~ U(−ε, ε) per channel, then ``noise_steps`` signed ascent steps of size ε/noise_steps
   on CE(perturbed model), each clipped to [−ε, ε] (:func:`ascend_noise`);
2. one SGD-with-momentum step on m for  α·CE(m, 0, 0) + (1 − α)·CE(m, δ, ξ),  then m ← clip(m, 0, 1).

The model runs in train mode during the mask optimisation (BatchNorm batch statistics and
dropout), as the reference's ``model.train()``; the running statistics it would update are
discarded, as the reference's pruning script reloads the original checkpoint. The iterations
run as a jitted ``lax.scan``, ``chunk`` iterations per round of ``base.run_rounds``.

Then pruning: a pruned channel has its BN scale set to 0 (the reference zeros the weight only,
the bias stays), chosen by ``selection`` (see :class:`ANPConfig`). The result is plain
``{'params', 'batch_stats'}``: the original weights with the pruned scales zeroed.

Mask trees (m, δ, ξ) are nested like ``models.mask_template(model, variables)``: one (C,)
float32 vector per BN, keyed by the BN's path in ``variables['batch_stats']``.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from .. import sharding
from ..errors import ConfigError, UserError, check_finite
from ..training import augment
from .base import CleanSet, DefenseResult, run_rounds

PyTree = Any
SELECTIONS = ("clean", "threshold", "fraction")
MIN_HOLDOUT = 20          # held-out images below which an accuracy drop means nothing
EVAL_BATCH = 256          # held-out images per forward pass during selection


class ANPModelError(UserError):
    """The model has no BatchNorm layer to put masks on."""


@dataclasses.dataclass(frozen=True)
class ANPConfig:
    """ANP settings. Sources (csdongxian/ANP_backdoor unless noted):

    eps 0.4 (``--anp-eps``), alpha 0.2 (``--anp-alpha``), noise_steps 1 (``--anp-steps``; the
    noise step size is eps/noise_steps, the reference's noise optimizer lr), lr 0.2 and
    momentum 0.9 (``--lr``; ``torch.optim.SGD(mask_params, lr, momentum=0.9)``), iterations
    2000 (``--nb-iter``), batch_size 128 (``--batch-size``), chunk 500 iterations per round
    (``--print-every``: the reference evaluates every 500 iterations), crop_pad 4 and flip (the
    reference's training transform, which its clean split inherits), train_mode True (its
    ``model.train()`` during mask optimisation; False = eval mode: running statistics, no
    dropout). Paper, Sec. 4: the same eps, alpha, lr, momentum, batch and iterations.

    Pruning (``prune_neuron_cifar.py``): threshold 0.2 (the paper's and README's fixed
    threshold; channels with mask ≤ threshold are pruned, as the reference's ``<=``),
    candidate thresholds 0, prune_step, …, prune_max (``--pruning-step 0.05``,
    ``--pruning-max 0.9``). ``selection``:

    * ``"clean"`` (default, ibau-jax's): a random ``holdout`` fraction of the clean set is kept
      out of the mask optimisation; the largest candidate threshold whose pruned model's
      accuracy on it is at most ``max_acc_drop`` below the unpruned model's is used (no
      pruning when none qualifies). holdout 0.1 and max_acc_drop 0.02 are ibau-jax's choices.
    * ``"threshold"``: the fixed ``threshold`` (the reference's choice); every clean image
      optimises the mask.
    * ``"fraction"``: the ``fraction`` of all BN channels with the smallest masks (the
      reference's ``--pruning-by number``, as a fraction; 0.05 is ibau-jax's default).

    BackdoorBench's choice by test-set ASR is an oracle and not offered: the defense never sees
    test data. ``DefenseResult.artifacts['mask']`` holds the final mask, so such an upper
    bound can be computed outside the defense with :func:`prune`.
    """

    eps: float = 0.4
    alpha: float = 0.2
    noise_steps: int = 1
    lr: float = 0.2
    momentum: float = 0.9
    iterations: int = 2000
    batch_size: int = 128
    chunk: int = 500
    train_mode: bool = True
    crop_pad: int = 4
    flip: bool = True
    selection: str = "clean"
    threshold: float = 0.2
    fraction: float = 0.05
    holdout: float = 0.1
    max_acc_drop: float = 0.02
    prune_step: float = 0.05
    prune_max: float = 0.9

    def __post_init__(self):
        for name in ("noise_steps", "iterations", "batch_size", "chunk"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {v!r}")
        # eps > 1 lets a channel's scale change sign: no longer a relative perturbation.
        if not 0 <= check_finite("eps", self.eps) <= 1:
            raise ConfigError(f"eps must be in [0, 1] (the relative noise budget; the reference uses 0.4), "
                              f"got {self.eps!r}")
        if not 0 <= check_finite("alpha", self.alpha) <= 1:
            raise ConfigError(f"alpha must be in [0, 1] (the weight of the clean loss; the reference uses 0.2), "
                              f"got {self.alpha!r}")
        if check_finite("lr", self.lr) <= 0:
            raise ConfigError(f"lr must be a finite number > 0, got {self.lr!r}")
        if not 0 <= check_finite("momentum", self.momentum) < 1:
            raise ConfigError(f"momentum must be in [0, 1), got {self.momentum!r}")
        if self.selection not in SELECTIONS:
            raise ConfigError(f"selection must be one of {', '.join(SELECTIONS)}, got {self.selection!r} "
                              f"(a choice by test-set ASR is an oracle; see ANPConfig)")
        for name in ("threshold", "prune_max"):
            if not 0 <= check_finite(name, getattr(self, name)) <= 1:
                raise ConfigError(f"{name} must be in [0, 1] (masks lie in [0, 1]), got {getattr(self, name)!r}")
        if not 0 <= check_finite("fraction", self.fraction) <= 1:
            raise ConfigError(f"fraction must be in [0, 1], got {self.fraction!r}")
        if not 0 < check_finite("holdout", self.holdout) < 1:
            raise ConfigError(f"holdout must be in (0, 1), got {self.holdout!r}")
        if not 0 <= check_finite("max_acc_drop", self.max_acc_drop) <= 1:
            raise ConfigError(f"max_acc_drop must be in [0, 1], got {self.max_acc_drop!r}")
        if not 0 < check_finite("prune_step", self.prune_step) <= 1:
            raise ConfigError(f"prune_step must be in (0, 1], got {self.prune_step!r}")
        if self.crop_pad < 0:
            raise ConfigError(f"crop_pad must be >= 0, got {self.crop_pad}")

    def candidates(self) -> np.ndarray:
        """The thresholds ``selection="clean"`` tries: 0, prune_step, …, ≤ prune_max."""
        return np.round(np.arange(0.0, self.prune_max + self.prune_step / 2, self.prune_step), 6)


# ----------------------------------------------------------------------------- mask trees

def _bn_stats(node: Any) -> bool:
    return isinstance(node, Mapping) and set(node) == {"mean", "var"}


def bn_paths(variables: PyTree) -> list[tuple[str, ...]]:
    """The paths of every BatchNorm in ``variables['batch_stats']`` (also their paths in params).

    ANPModelError when there is none (the mask lives on BN scales) or when a BN has no learned
    scale and bias in ``params``.
    """
    stats = variables.get("batch_stats") if isinstance(variables, Mapping) else None
    paths = []

    def walk(node, prefix):
        for name, child in node.items():
            if _bn_stats(child):
                paths.append(prefix + (name,))
            elif isinstance(child, Mapping):
                walk(child, prefix + (name,))

    if stats:
        walk(dict(stats), ())
    if not paths:
        raise ANPModelError("anp needs a model with BatchNorm layers (its masks scale BN channels), but the "
                            "variables have no 'batch_stats'; use another defense (e.g. fp or ibau)")
    flat = traverse_util.flatten_dict(dict(variables["params"]))
    for p in paths:
        if p + ("scale",) not in flat or p + ("bias",) not in flat:
            raise ANPModelError(f"BatchNorm {'/'.join(p)} has no learned scale and bias in params; anp needs "
                                f"BatchNorm(use_scale=True, use_bias=True)")
    return paths


def _tree(paths: list[tuple[str, ...]], leaves: list[Any]) -> dict[str, Any]:
    return traverse_util.unflatten_dict(dict(zip(paths, leaves)))


def ones_mask(variables: PyTree) -> dict[str, Any]:
    """All-ones mask tree: one float32 (C,) vector per BN (``models.mask_template``'s layout)."""
    paths = bn_paths(variables)
    stats = traverse_util.flatten_dict(dict(variables["batch_stats"]))
    return _tree(paths, [jnp.ones(jnp.shape(stats[p + ("mean",)]), jnp.float32) for p in paths])


def perturbed_variables(variables: PyTree, mask: PyTree, noise_w: PyTree | None = None,
                        noise_b: PyTree | None = None) -> PyTree:
    """``variables`` with every masked BN's scale γ ← γ·(m + δ) and bias β ← β·(1 + ξ).

    ``mask`` m, ``noise_w`` δ and ``noise_b`` ξ are trees of (C,) vectors keyed by BN path (the
    layout of :func:`ones_mask`); None noise = 0. Since flax's BN computes x̂·γ + β, the model
    then computes y = x̂·γ·(m + δ) + β·(1 + ξ) in either mode. Pure and differentiable in m, δ, ξ;
    other collections are returned unchanged.
    """
    flat_m = traverse_util.flatten_dict(mask)
    flat_w = traverse_util.flatten_dict(noise_w) if noise_w is not None else {}
    flat_b = traverse_util.flatten_dict(noise_b) if noise_b is not None else {}
    params = traverse_util.flatten_dict(dict(variables["params"]))
    for p, m in flat_m.items():
        params[p + ("scale",)] = params[p + ("scale",)] * (m + flat_w[p] if p in flat_w else m)
        if p in flat_b:
            params[p + ("bias",)] = params[p + ("bias",)] * (1.0 + flat_b[p])
    return {**variables, "params": traverse_util.unflatten_dict(params)}


def pruned_channels(mask: PyTree, threshold: float) -> PyTree:
    """Boolean tree: True where the mask is ≤ ``threshold`` (the reference's ``<=``)."""
    return jax.tree.map(lambda m: np.asarray(m) <= threshold, mask)


def fraction_threshold(mask: PyTree, fraction: float) -> tuple[PyTree, float]:
    """(pruned tree, largest pruned mask value): the round(fraction·N) channels of smallest
    mask over all N BN channels (ties broken by layer order, then channel index; -1 if none)."""
    leaves, treedef = jax.tree.flatten(jax.tree.map(np.asarray, mask))
    flat = np.concatenate([leaf.ravel() for leaf in leaves])
    k = int(round(fraction * flat.size))
    order = np.argsort(flat, kind="stable")[:k]
    hit = np.zeros(flat.size, bool)
    hit[order] = True
    out, start = [], 0
    for leaf in leaves:
        out.append(hit[start:start + leaf.size].reshape(leaf.shape))
        start += leaf.size
    return jax.tree.unflatten(treedef, out), float(flat[order].max()) if k else -1.0


def prune(variables: PyTree, pruned: PyTree) -> PyTree:
    """``variables`` (host numpy) with the BN scale zeroed where ``pruned`` (bool tree) is True.

    The bias stays, as in the reference's ``pruning`` (a pruned channel outputs β).
    """
    keep = jax.tree.map(lambda p: (~np.asarray(p, bool)).astype(np.float32), pruned)
    out = perturbed_variables(jax.tree.map(np.asarray, variables), keep)
    return jax.tree.map(np.asarray, out)


# ----------------------------------------------------------------------------- noise

def random_noise(key: jax.Array, mask: PyTree, eps: float) -> tuple[PyTree, PyTree]:
    """(δ, ξ): trees like ``mask``, each entry uniform in [−eps, eps] (the reference's reset)."""
    leaves, treedef = jax.tree.flatten(mask)
    keys = jax.random.split(key, 2 * len(leaves))
    draw = lambda k, m: jax.random.uniform(k, jnp.shape(m), jnp.float32, -eps, eps)
    w = [draw(k, m) for k, m in zip(keys[: len(leaves)], leaves)]
    b = [draw(k, m) for k, m in zip(keys[len(leaves):], leaves)]
    return jax.tree.unflatten(treedef, w), jax.tree.unflatten(treedef, b)


def ascend_noise(loss_fn: Callable[[PyTree, PyTree], jax.Array], noise: tuple[PyTree, PyTree], eps: float,
                 steps: int) -> tuple[PyTree, PyTree]:
    """``steps`` signed gradient ascent steps on ``loss_fn(δ, ξ)`` from ``noise`` = (δ, ξ):

        (δ, ξ) ← clip((δ, ξ) + (eps/steps)·sign(∇ loss), −eps, eps)

    The step size eps/steps is the reference's noise-optimizer learning rate; the clip keeps the
    paper's budget ‖δ‖∞, ‖ξ‖∞ ≤ eps (the reference code omits it, so its noise can reach 2·eps).
    """
    step = eps / steps
    grad = jax.grad(lambda n: loss_fn(*n))
    for _ in range(steps):
        g = grad(noise)
        noise = jax.tree.map(lambda n, gn: jnp.clip(n + step * jnp.sign(gn), -eps, eps), noise, g)
    return noise


# ----------------------------------------------------------------------------- mask optimisation

def mask_optimizer(config: ANPConfig) -> optax.GradientTransformation:
    """SGD with heavy-ball momentum (PyTorch's: buf ← μ·buf + g, m ← m − lr·buf)."""
    return optax.sgd(config.lr, momentum=config.momentum)


def make_chunk(model: Any, config: ANPConfig, on_step: Callable[[jax.Array], None] | None = None,
               mesh: Any = None) -> Callable[..., tuple[Any, dict[str, jax.Array]]]:
    """``chunk(state, inputs, variables, x, y) -> (state, metrics)``, traceable.

    state = (mask, opt_state); inputs = (keys (chunk, 2) uint32, active (chunk,) bool): one ANP
    iteration per key (module docstring), skipped where ``active`` is False (the last round
    of a run whose iterations are not a multiple of ``chunk``); variables = the model's
    ``{'params', 'batch_stats'}``; x (N, H, W, C) float32, y (N,) int32 = the images the
    batches are drawn from (with replacement). metrics: per-iteration (chunk,) ``loss``,
    ``clean_loss``, ``perturbed_loss``, ``acc`` (clean batch accuracy) and ``active``.
    With ``mesh``: the batch is padded to a multiple of the device count (weight 0, excluded
    from losses and BN statistics) and split over the devices; everything else replicated.
    """
    cfg = config
    tx = mask_optimizer(cfg)
    batch = cfg.batch_size
    padded = sharding.padded_size(batch, mesh)
    w = None if padded == batch else (jnp.arange(padded) < batch).astype(jnp.float32)

    def ce(variables, x, y, key):
        if cfg.train_mode:
            extra = {} if w is None else {"example_mask": w}
            logits, _ = model.apply(variables, x, train=True, rngs={"dropout": key}, mutable=["batch_stats"],
                                    **extra)
        else:
            logits = model.apply(variables, x, train=False)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        return sharding.weighted_mean(losses, w), logits

    def iteration(state, key, variables, xs, ys):
        mask, opt_state = state
        k_idx, k_aug, k_noise, k_n, k_c, k_p = jax.random.split(key, 6)
        idx = jax.random.randint(k_idx, (batch,), 0, xs.shape[0])
        if padded != batch:
            idx = jnp.pad(idx, (0, padded - batch))
        x = augment(xs[idx], k_aug, cfg.crop_pad, cfg.flip)
        y = ys[idx]
        if mesh is not None:
            x = jax.lax.with_sharding_constraint(x, sharding.split_along(mesh, 0))
            y = jax.lax.with_sharding_constraint(y, sharding.split_along(mesh, 0))
        if cfg.eps > 0:
            fixed = jax.lax.stop_gradient(mask)
            noise_loss = lambda nw, nb: ce(perturbed_variables(variables, fixed, nw, nb), x, y, k_n)[0]
            noise = ascend_noise(noise_loss, random_noise(k_noise, mask, cfg.eps), cfg.eps, cfg.noise_steps)
            noise = jax.lax.stop_gradient(noise)

        def objective(m):
            if cfg.eps > 0:
                # The clean and the perturbed model as one vmapped forward over the two noise
                # settings (0 and (δ, ξ)): only BN scales and biases differ, so XLA runs one
                # batch of 2×B through the convs, and compiles one graph instead of two.
                zero = jax.tree.map(jnp.zeros_like, noise[0])
                nw, nb = (jax.tree.map(lambda a, b: jnp.stack([a, b]), zero, n) for n in noise)
                losses, logits = jax.vmap(lambda a, b, k: ce(perturbed_variables(variables, m, a, b), x, y, k))(
                    nw, nb, jnp.stack([k_c, k_p]))
                clean, rob, logits = losses[0], losses[1], logits[0]
            else:
                (clean, logits), rob = ce(perturbed_variables(variables, m), x, y, k_c), jnp.zeros((), jnp.float32)
            hits = (jnp.argmax(logits, -1) == y).astype(jnp.float32)
            return cfg.alpha * clean + (1 - cfg.alpha) * rob, (clean, rob, sharding.weighted_mean(hits, w))

        (loss, (clean, rob, acc)), g = jax.value_and_grad(objective, has_aux=True)(mask)
        updates, opt_state = tx.update(g, opt_state, mask)
        mask = jax.tree.map(lambda m: jnp.clip(m, 0.0, 1.0), optax.apply_updates(mask, updates))
        if on_step is not None:
            jax.debug.callback(on_step, loss)
        return (mask, opt_state), {"loss": loss, "clean_loss": clean, "perturbed_loss": rob,
                                   "acc": acc}

    zeros = {k: jnp.zeros((), jnp.float32) for k in ("loss", "clean_loss", "perturbed_loss", "acc")}

    def chunk(state, inputs, variables, xs, ys):
        def body(state, inp):
            key, active = inp
            state, m = jax.lax.cond(active, lambda s: iteration(s, key, variables, xs, ys),
                                    lambda s: (s, zeros), state)
            return state, {**m, "active": active}

        return jax.lax.scan(body, state, inputs)

    return chunk


def round_inputs(key: jax.Array, config: ANPConfig) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per round: the (chunk, 2) iteration keys fold_in(key, i), i = 1..iterations, and the
    (chunk,) active flags (False past the last iteration)."""
    n_rounds = -(-config.iterations // config.chunk)
    idx = np.arange(1, n_rounds * config.chunk + 1)
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.asarray(idx))
    if jnp.issubdtype(keys.dtype, jax.dtypes.prng_key):
        keys = jax.random.key_data(keys)
    keys = np.asarray(keys)
    active = idx <= config.iterations
    return [(keys[r * config.chunk:(r + 1) * config.chunk], active[r * config.chunk:(r + 1) * config.chunk])
            for r in range(n_rounds)]


# ----------------------------------------------------------------------------- selection

def make_heldout_accuracy(model: Any) -> Callable[..., jax.Array]:
    """``acc(variables, masks, thresholds, x, y, w)`` -> (T,): eval-mode accuracy on the held-out
    images x (B, b, H, W, C), y (B, b), weights w (B, b) (0 = padding) of the model pruned at
    each threshold (scale zeroed where mask ≤ t), jitted."""

    def one(variables, mask, t, x, y, w):
        keep = jax.tree.map(lambda m: (m > t).astype(jnp.float32), mask)
        v = perturbed_variables(variables, keep)

        def batch(inp):
            xb, yb, wb = inp
            hits = (jnp.argmax(model.apply(v, xb, train=False), -1) == yb).astype(jnp.float32)
            return jnp.sum(hits * wb)

        return jnp.sum(jax.lax.map(batch, (x, y, w))) / jnp.sum(w)

    @jax.jit
    def acc(variables, mask, thresholds, x, y, w):
        return jax.lax.map(lambda t: one(variables, mask, t, x, y, w), thresholds)

    return acc


def _batches(x: np.ndarray, y: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n = len(y)
    b = min(size, n)
    total = -(-n // b) * b
    w = sharding.example_weights(n, total).reshape(-1, b)
    xp = sharding.pad_examples(x, 0, total).reshape(-1, b, *x.shape[1:])
    yp = sharding.pad_examples(y, 0, total).reshape(-1, b)
    return xp, yp, w


def mask_summary(mask: PyTree, pruned: PyTree) -> dict[str, dict[str, float]]:
    """Per BN ("bn0", "layer1_0/bn1", …): channels, pruned, mean/min/max of the mask."""
    flat_m = traverse_util.flatten_dict(jax.tree.map(np.asarray, mask))
    flat_p = traverse_util.flatten_dict(jax.tree.map(np.asarray, pruned))
    return {"/".join(p): {"channels": int(m.size), "pruned": int(flat_p[p].sum()), "mean": round(float(m.mean()), 4),
                          "min": round(float(m.min()), 4), "max": round(float(m.max()), 4)}
            for p, m in flat_m.items()}


# ----------------------------------------------------------------------------- the defense

class ANP:
    """``anp``: optimise BN-channel masks under adversarial neuron noise, then prune.

    History: one record per round of ``chunk`` iterations (``round``, ``seconds``,
    ``iterations`` done, means over the round of ``loss``, ``clean_loss``, ``perturbed_loss``,
    ``train_acc``, and ``mask_mean``; the callback sees the soft-masked model γ·m, what the
    reference evaluates every 500 iterations), then one record with ``stage: "prune"`` (the
    callback sees the returned, pruned model): ``threshold`` (-1 when nothing is pruned),
    ``pruned``. ``artifacts['mask']``: the final mask tree (host numpy).
    """

    name = "anp"
    Config = ANPConfig

    def __init__(self, config: ANPConfig | None = None, on_step: Callable[[Any], None] | None = None):
        self.config = config if config is not None else ANPConfig()
        self.on_step = on_step

    def num_steps(self, clean_set: CleanSet) -> int:
        return self.config.iterations

    def check_size(self, n: int) -> int:
        """The held-out size of a clean set of ``n`` images; ConfigError when it or the rest is
        too small."""
        cfg = self.config
        n_hold = int(round(cfg.holdout * n)) if cfg.selection == "clean" else 0
        if cfg.selection == "clean" and n_hold < MIN_HOLDOUT:
            raise ConfigError(f"selection=clean holds out {n_hold} of the {n} clean images, fewer than "
                              f"{MIN_HOLDOUT}; use more clean images (--n-clean), a larger holdout "
                              f"(--set holdout=...) or selection=threshold")
        if n - n_hold < cfg.batch_size:
            raise ConfigError(f"the clean set leaves {n - n_hold} images to optimise the mask, fewer than one "
                              f"batch of {cfg.batch_size}; lower batch_size (--set batch_size=...) or use more "
                              f"clean images (--n-clean)")
        return n_hold

    def _split(self, clean_set: CleanSet, key: jax.Array) -> tuple[np.ndarray, np.ndarray]:
        """(optimisation indices, held-out indices); ConfigError when either is too small."""
        n = len(clean_set)
        n_hold = self.check_size(n)
        perm = np.asarray(jax.random.permutation(jax.random.fold_in(key, 0), n))
        return np.sort(perm[n_hold:]), np.sort(perm[:n_hold])

    def run(self, model, variables, clean_set: CleanSet, key: jax.Array, *, mesh: Any = None,
            callback=None) -> DefenseResult:
        cfg = self.config
        bn_paths(variables)  # ANPModelError before any work when there is no BatchNorm
        variables = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
        opt_idx, hold_idx = self._split(clean_set, key)
        xs = np.asarray(clean_set.x, np.float32)
        ys = np.asarray(clean_set.y, np.int32)
        host_vars = jax.tree.map(np.asarray, variables)

        mask = ones_mask(host_vars)
        state = (mask, mask_optimizer(cfg).init(mask))
        inputs = round_inputs(jax.random.fold_in(key, 1), cfg)
        x_opt, y_opt = xs[opt_idx], ys[opt_idx]
        dev_vars = host_vars
        if mesh is not None:
            state, dev_vars, x_opt, y_opt = sharding.replicate(mesh, (state, host_vars, x_opt, y_opt))
            inputs = [sharding.replicate(mesh, inp) for inp in inputs]
        chunk = make_chunk(model, cfg, self.on_step, mesh)

        masked_host = lambda m: jax.tree.map(np.asarray, perturbed_variables(host_vars, sharding.to_host(m)))
        variables_of = lambda s: masked_host(s[0])
        done = {"iterations": 0}

        def record_of(r, aux):
            state_mask, m = aux
            m = sharding.to_host(m)
            act = m["active"].astype(bool)
            done["iterations"] += int(act.sum())
            leaves = [np.asarray(v) for v in jax.tree.leaves(sharding.to_host(state_mask))]
            return {"stage": "mask", "iterations": done["iterations"],
                    **{k if k != "acc" else "train_acc": round(float(np.mean(m[k][act])), 6)
                       for k in ("loss", "clean_loss", "perturbed_loss", "acc")},
                    "mask_mean": round(float(np.mean(np.concatenate(leaves))), 6)}

        @jax.jit
        def round_step(state, inp, v, x, y):
            state, metrics = chunk(state, inp, v, x, y)
            return state, (state[0], metrics)

        loop = run_rounds(round_step, state, inputs, consts=(dev_vars, x_opt, y_opt), variables_of=variables_of,
                          record_of=record_of, callback=callback,
                          divergence_hint="lower lr (--set lr=...)")
        final_mask = jax.tree.map(np.asarray, sharding.to_host(loop.state[0]))

        t0 = time.perf_counter()
        compile_s = 0.0
        diagnostics: dict[str, Any] = {"selection": cfg.selection, "devices": sharding.num_devices(mesh),
                                       "mask_images": int(len(opt_idx)), "heldout_images": int(len(hold_idx))}
        if cfg.selection == "threshold":
            threshold = cfg.threshold
            pruned = pruned_channels(final_mask, threshold)
        elif cfg.selection == "fraction":
            pruned, threshold = fraction_threshold(final_mask, cfg.fraction)
        else:
            cands = cfg.candidates()
            acc_fn = make_heldout_accuracy(model)
            xh, yh, wh = _batches(xs[hold_idx], ys[hold_idx], EVAL_BATCH)
            # -1: no channel has a mask ≤ -1, so that entry is the unpruned model.
            ts = np.concatenate([[-1.0], cands]).astype(np.float32)
            tc = time.perf_counter()
            compiled = acc_fn.lower(host_vars, final_mask, ts, xh, yh, wh).compile()
            compile_s = time.perf_counter() - tc
            accs = np.asarray(compiled(host_vars, final_mask, ts, xh, yh, wh))
            base, cand_acc = float(accs[0]), accs[1:]
            ok = [i for i, a in enumerate(cand_acc) if base - a <= cfg.max_acc_drop + 1e-9]
            threshold = float(cands[max(ok)]) if ok else -1.0
            pruned = pruned_channels(final_mask, threshold)
            diagnostics.update(
                heldout_acc_unpruned=round(base, 6),
                candidates=[{"threshold": float(t), "pruned": int(sum(np.sum(p) for p in jax.tree.leaves(
                    pruned_channels(final_mask, float(t))))), "heldout_acc": round(float(a), 6)}
                    for t, a in zip(cands, cand_acc)])
        defended = prune(host_vars, pruned)
        n_pruned = int(sum(np.sum(p) for p in jax.tree.leaves(pruned)))
        n_total = int(sum(np.size(p) for p in jax.tree.leaves(pruned)))
        prune_seconds = time.perf_counter() - t0 - compile_s
        diagnostics.update(threshold=threshold, pruned=n_pruned, channels=n_total,
                           layers=mask_summary(final_mask, pruned))
        record = {"round": len(loop.history) + 1, "seconds": round(prune_seconds, 3), "stage": "prune",
                  "threshold": threshold, "pruned": n_pruned}
        if callback is not None:
            record.update(callback(record["round"], defended, record) or {})
        history = loop.history + [record]
        return DefenseResult(defended, history, diagnostics, loop.seconds + prune_seconds,
                             loop.compile_seconds + compile_s, artifacts={"mask": final_mask})
