"""Trigger reverse-engineering for Neural Cleanse and TABOR: every candidate class in one program.

For a target class t, Neural Cleanse (Wang et al., S&P 2019; reference code bolunwang/backdoor,
``visualizer.py``) searches a mask and a pattern

    m = tanh(a) / 2 + 0.5   (H, W, 1),     p = tanh(b) / 2 + 0.5   (H, W, C),
    x' = (1 − m) · x + m · p,

minimising, over mini-batches of the clean set,

    L(a, b) = mean_i CE(f(x'_i), t) + cost · ‖m‖₁ + R(m, p, x, y, t)

with Adam (lr 0.1, β 0.5 / 0.9); R is 0 for NC and TABOR's regularisers for TABOR
(:data:`Regularizer`). ``cost`` follows NC's adaptive schedule, applied once per epoch to
the epoch's mean attack success (fraction of x' classified as t) and mean ‖m‖₁
(:func:`schedule_update`, the reference's per-epoch rule). The smallest ‖m‖₁ among the epochs
whose attack success reached the threshold is kept (the last mask when none did).

All classes run in ONE compiled program: the epoch function of one class is ``vmap``-ed over a
chunk of ``class_chunk`` classes, the epochs are a ``lax.while_loop`` (it ends when every class
of the chunk has stopped early, or after ``epochs``) and the batches a ``lax.scan``. A class
that stopped early is frozen while the others go on, so each class's result equals a separate
run of the same program on that class alone (tests/test_defenses_nc.py checks this;
benchmarks/nc_vmap.py times both).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ..errors import ConfigError, check_finite
from .base import DivergenceError

# R(m (H, W, 1), p (H, W, C), x (B, H, W, C), y (B,), t (), logits_fn) -> scalar added to the loss
Regularizer = Callable[[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array, Callable[[jax.Array], jax.Array]],
                       jax.Array]


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    """The trigger search's settings (NC's, shared by TABOR).

    Sources (bolunwang/backdoor ``gtsrb_visualize_example.py`` passed to ``visualizer.py``):
    epochs 1000 (``STEPS``), batch_size 32 (``BATCH_SIZE``), samples_per_epoch 1000
    (``NB_SAMPLE``: an epoch is 1000 // 32 = 31 mini-batches), lr 0.1 (``LR``), Adam betas
    0.5 / 0.9 (``visualizer.py``), init_cost 1e-3 (``INIT_COST``), cost_up 2 (``COST_MULTIPLIER``)
    and cost_down 2 ** 1.5 (``visualizer.py``: the down multiplier is the up one to the 1.5),
    patience 5 (``PATIENCE``), attack_threshold 0.99 (``ATTACK_SUCC_THRESHOLD``),
    early_stop_patience 25 (``EARLY_STOP_PATIENCE = 5 * PATIENCE``), early_stop_threshold 1.0
    (``EARLY_STOP_THRESHOLD``). class_chunk: how many classes one vmapped program holds
    (ibau-jax's memory knob; results do not depend on it).
    """

    epochs: int = 1000
    batch_size: int = 32
    samples_per_epoch: int = 1000
    lr: float = 0.1
    beta1: float = 0.5
    beta2: float = 0.9
    init_cost: float = 1e-3
    cost_up: float = 2.0
    cost_down: float = 2.0 ** 1.5
    patience: int = 5
    attack_threshold: float = 0.99
    early_stop_patience: int = 25
    early_stop_threshold: float = 1.0
    class_chunk: int = 10

    def __post_init__(self):
        for name in ("epochs", "batch_size", "samples_per_epoch", "patience", "early_stop_patience", "class_chunk"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {v!r} (--set {name}=...)")
        if self.samples_per_epoch < self.batch_size:
            raise ConfigError(f"samples_per_epoch ({self.samples_per_epoch}) must be >= batch_size "
                              f"({self.batch_size}); raise samples_per_epoch or lower batch_size")
        if check_finite("lr", self.lr) <= 0:
            raise ConfigError(f"lr must be a finite number > 0, got {self.lr!r} (--set lr=...)")
        for name in ("beta1", "beta2"):
            if not 0 <= check_finite(name, getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        if check_finite("init_cost", self.init_cost) <= 0:
            raise ConfigError(f"init_cost must be a finite number > 0, got {self.init_cost!r}")
        for name in ("cost_up", "cost_down"):
            if check_finite(name, getattr(self, name)) <= 1:
                raise ConfigError(f"{name} must be a finite number > 1, got {getattr(self, name)!r}")
        if not 0 < check_finite("attack_threshold", self.attack_threshold) <= 1:
            raise ConfigError(f"attack_threshold must be in (0, 1], got {self.attack_threshold!r}")
        if check_finite("early_stop_threshold", self.early_stop_threshold) <= 0:
            raise ConfigError(f"early_stop_threshold must be a finite number > 0, got {self.early_stop_threshold!r}")

    @property
    def batches_per_epoch(self) -> int:
        return self.samples_per_epoch // self.batch_size


# ----------------------------------------------------------------------------- the cost schedule

class Schedule(NamedTuple):
    """NC's per-class schedule state (``visualizer.visualize``'s local variables), jnp scalars."""

    cost: jax.Array            # current weight of ‖m‖₁ (starts at 0: RESET_COST_TO_ZERO)
    set_counter: jax.Array     # epochs in a row at cost 0 with attack success ≥ threshold
    up_counter: jax.Array
    down_counter: jax.Array
    up_flag: jax.Array         # the cost went up at least once since it was set
    down_flag: jax.Array
    es_counter: jax.Array      # epochs in a row without a better best norm
    es_reg_best: jax.Array
    reg_best: jax.Array        # smallest ‖m‖₁ among epochs at attack success ≥ threshold (inf: none)
    stopped: jax.Array         # early-stopped
    epochs: jax.Array          # epochs run


def schedule_init() -> Schedule:
    i, f = jnp.int32(0), jnp.bool_(False)
    inf = jnp.float32(jnp.inf)
    return Schedule(jnp.float32(0.0), i, i, i, f, f, i, inf, inf, f, i)


def schedule_update(s: Schedule, acc: jax.Array, reg: jax.Array, cfg: SearchConfig) -> tuple[Schedule, jax.Array]:
    """One epoch of NC's rule on the epoch's mean attack success ``acc`` and mean ‖m‖₁ ``reg``.

    In the reference's order: (1) keep the mask when acc ≥ threshold and reg < reg_best;
    (2) early stop: once a best exists, count epochs whose reg_best ≥ early_stop_threshold ·
    the best so far (reset otherwise), and stop when both flags are up and the count reaches
    early_stop_patience (nothing else changes that epoch); (3) at cost 0, set cost = init_cost
    after ``patience`` epochs in a row at acc ≥ threshold (resetting counters and flags);
    (4) count epochs above / below the threshold; ``patience`` above: cost × cost_up,
    ``patience`` below: cost ÷ cost_down. Returns (new state, whether to keep this epoch's mask).
    """
    hit = acc >= cfg.attack_threshold
    save = hit & (reg < s.reg_best)
    reg_best = jnp.where(save, reg, s.reg_best)
    found = reg_best < jnp.inf
    es_counter = jnp.where(found, jnp.where(reg_best >= cfg.early_stop_threshold * s.es_reg_best,
                                            s.es_counter + 1, 0), s.es_counter)
    es_reg_best = jnp.minimum(reg_best, s.es_reg_best)
    stop = s.down_flag & s.up_flag & (es_counter >= cfg.early_stop_patience)

    cost, up, down, up_flag, down_flag = s.cost, s.up_counter, s.down_counter, s.up_flag, s.down_flag
    set_counter = jnp.where((cost == 0) & hit, s.set_counter + 1, 0)
    do_set = (cost == 0) & hit & (set_counter >= cfg.patience)
    cost = jnp.where(do_set, jnp.float32(cfg.init_cost), cost)
    up, down = jnp.where(do_set, 0, up), jnp.where(do_set, 0, down)
    up_flag, down_flag = up_flag & ~do_set, down_flag & ~do_set
    up, down = jnp.where(hit, up + 1, 0), jnp.where(hit, 0, down + 1)
    go_up = up >= cfg.patience
    go_down = ~go_up & (down >= cfg.patience)
    cost = jnp.where(go_up, cost * cfg.cost_up, jnp.where(go_down, cost / cfg.cost_down, cost))
    up, down = jnp.where(go_up, 0, up), jnp.where(go_down, 0, down)
    up_flag, down_flag = up_flag | go_up, down_flag | go_down

    new = Schedule(cost.astype(jnp.float32), set_counter, up, down, up_flag, down_flag, es_counter,
                   es_reg_best, reg_best, stop, s.epochs + 1)
    # the reference breaks before changing the cost in the epoch it stops
    new = jax.tree.map(lambda n, o: jnp.where(stop, o, n), new,
                       s._replace(es_counter=es_counter, es_reg_best=es_reg_best, reg_best=reg_best,
                                  stopped=stop, epochs=s.epochs + 1))
    return new, save


# ----------------------------------------------------------------------------- the search

def mask_pattern(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """m = tanh(a)/2 + 0.5 (H, W, 1) and p = tanh(b)/2 + 0.5 (H, W, C), both in [0, 1]."""
    return jnp.tanh(a) / 2 + 0.5, jnp.tanh(b) / 2 + 0.5


def stamp(x: jax.Array | np.ndarray, mask: Any, pattern: Any) -> Any:
    """x' = (1 − m) · x + m · p for x (..., H, W, C), m (H, W, 1), p (H, W, C)."""
    return (1 - mask) * x + mask * pattern


class SearchState(NamedTuple):
    a: jax.Array               # (H, W, 1) mask in tanh space
    b: jax.Array               # (H, W, C) pattern in tanh space
    opt: Any                   # Adam's state
    sched: Schedule
    mask_best: jax.Array       # (H, W, 1)
    pattern_best: jax.Array    # (H, W, C)
    last_acc: jax.Array        # the last epoch's mean attack success


class SearchResult(NamedTuple):
    """Host arrays, one row per class: masks (K, H, W, 1), patterns (K, H, W, C), norms (K,)
    = ‖mask‖₁, cost / attack_success (K,) of the last epoch run, epochs (K,), found (K,)
    (whether an epoch reached the attack threshold)."""

    masks: np.ndarray
    patterns: np.ndarray
    norms: np.ndarray
    cost: np.ndarray
    attack_success: np.ndarray
    epochs: np.ndarray
    found: np.ndarray


def init_tanh(key: jax.Array, shape: tuple[int, int, int]) -> tuple[jax.Array, jax.Array]:
    """Random initial (a, b): mask and pattern uniform in [0, 1] as in the reference's example
    (``np.random.random``), mapped to tanh space (clipped so arctanh stays finite)."""
    ka, kb = jax.random.split(key)
    u = lambda k, s: jnp.clip(2 * jax.random.uniform(k, s) - 1, -0.999, 0.999)
    return jnp.arctanh(u(ka, shape[:2] + (1,))), jnp.arctanh(u(kb, shape))


def epoch_batches(key: jax.Array, x: jax.Array, y: jax.Array, cfg: SearchConfig) -> tuple[jax.Array, jax.Array]:
    """The epoch's ``batches_per_epoch`` mini-batches (nb, B, H, W, C), (nb, B): a shuffle of the
    clean set (repeated when it is smaller than an epoch), as the reference's shuffling generator."""
    nb, bs, n = cfg.batches_per_epoch, cfg.batch_size, x.shape[0]
    reps = -(-nb * bs // n)
    keys = jax.random.split(key, reps)
    idx = jnp.concatenate([jax.random.permutation(k, n) for k in keys])[: nb * bs].reshape(nb, bs)
    return x[idx], y[idx]


def make_search(apply_fn: Callable[[Any, jax.Array], jax.Array], cfg: SearchConfig,
                regularizer: Regularizer | None = None,
                on_epoch: Callable[[jax.Array], None] | None = None) -> Callable[..., tuple[SearchState, jax.Array]]:
    """``search(variables, targets (K,), a0 (K, H, W, 1), b0 (K, H, W, C), x (N, H, W, C), y (N,), key)
    -> (states, epochs_run)``: the whole search of K classes, traceable (jit it).

    ``apply_fn(variables, x) -> logits`` (eval mode). Epoch e's batches come from
    ``fold_in(key, e)`` and are the same for every class, so a class's result does not depend
    on which other classes share its program. ``on_epoch(e)`` is called from the host once per
    epoch of the whole chunk (outside the vmap, for a progress bar).
    """
    tx = optax.adam(cfg.lr, b1=cfg.beta1, b2=cfg.beta2)

    def epoch_one(state: SearchState, target: jax.Array, variables: Any, xb: jax.Array, yb: jax.Array) -> SearchState:
        logits_fn = lambda z: apply_fn(variables, z)

        def loss_fn(ab, x, y):
            m, p = mask_pattern(*ab)
            logits = logits_fn(stamp(x, m, p))
            ce = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, jnp.full(x.shape[:1], target)))
            reg = jnp.sum(m)
            loss = ce + state.sched.cost * reg
            if regularizer is not None:
                loss = loss + regularizer(m, p, x, y, target, logits_fn)
            acc = jnp.mean((jnp.argmax(logits, -1) == target).astype(jnp.float32))
            return loss, (reg, acc)

        def body(carry, batch):
            ab, opt = carry
            (_, (reg, acc)), g = jax.value_and_grad(loss_fn, has_aux=True)(ab, *batch)
            upd, opt = tx.update(g, opt, ab)
            return (optax.apply_updates(ab, upd), opt), (reg, acc)

        (ab, opt), (regs, accs) = jax.lax.scan(body, ((state.a, state.b), state.opt), (xb, yb))
        acc, reg = jnp.mean(accs), jnp.mean(regs)
        sched, save = schedule_update(state.sched, acc, reg, cfg)
        m, p = mask_pattern(*ab)
        new = SearchState(ab[0], ab[1], opt, sched, jnp.where(save, m, state.mask_best),
                          jnp.where(save, p, state.pattern_best), acc)
        # a class that has stopped keeps its state while the rest of its chunk goes on
        return jax.tree.map(lambda n, o: jnp.where(state.sched.stopped, o, n), new, state)

    def search(variables, targets, a0, b0, x, y, key):
        def init(a, b):
            m, p = mask_pattern(a, b)
            return SearchState(a, b, tx.init((a, b)), schedule_init(), m, p, jnp.float32(0.0))

        states = jax.vmap(init)(a0, b0)

        def cond(carry):
            e, st = carry
            return (e < cfg.epochs) & ~jnp.all(st.sched.stopped)

        def body(carry):
            e, st = carry
            xb, yb = epoch_batches(jax.random.fold_in(key, e), x, y, cfg)
            st = jax.vmap(epoch_one, in_axes=(0, 0, None, None, None))(st, targets, variables, xb, yb)
            if on_epoch is not None:
                jax.debug.callback(on_epoch, e)
            return e + 1, st

        e, states = jax.lax.while_loop(cond, body, (jnp.int32(0), states))
        # the reference returns the last mask when no epoch reached the threshold
        found = states.sched.reg_best < jnp.inf
        m, p = jax.vmap(mask_pattern)(states.a, states.b)
        pick = lambda best, last: jnp.where(found.reshape((-1,) + (1,) * (best.ndim - 1)), best, last)
        states = states._replace(mask_best=pick(states.mask_best, m), pattern_best=pick(states.pattern_best, p))
        return states, e

    return search


def reverse_engineer(apply_fn: Callable[[Any, jax.Array], jax.Array], variables: Any, x: np.ndarray, y: np.ndarray,
                     classes: Sequence[int], key: jax.Array, cfg: SearchConfig,
                     regularizer: Regularizer | None = None,
                     on_epoch: Callable[[jax.Array], None] | None = None,
                     on_chunk_done: Callable[[int], None] | None = None) -> tuple[SearchResult, float, float]:
    """Reverse-engineer a trigger for every class in ``classes``; returns (result, seconds, compile_seconds).

    Classes run ``class_chunk`` at a time in one compiled program (the last chunk padded with
    copies of its last class, dropped afterwards, so every chunk reuses one compilation).
    Class c's initial mask and pattern come from ``fold_in(key, c)``, the batches from
    ``fold_in(key, e)`` of a key split off ``key``. ``on_chunk_done(epochs_run)`` runs on the
    host after each chunk. A non-finite mask or pattern is a :class:`DivergenceError`.
    """
    import time

    from .. import interrupt

    classes = [int(c) for c in classes]
    x = jnp.asarray(np.asarray(x, np.float32))
    y = jnp.asarray(np.asarray(y, np.int32))
    shape = tuple(x.shape[1:])
    data_key, init_key = jax.random.split(key)
    k = min(cfg.class_chunk, len(classes))
    search = jax.jit(make_search(apply_fn, cfg, regularizer, on_epoch))
    compiled, compile_seconds, seconds = None, 0.0, 0.0
    out: list[Any] = []
    for start in range(0, len(classes), k):
        interrupt.check()
        chunk = classes[start:start + k]
        padded = chunk + [chunk[-1]] * (k - len(chunk))
        ab = [init_tanh(jax.random.fold_in(init_key, c), shape) for c in padded]
        args = (variables, jnp.asarray(padded, jnp.int32), jnp.stack([a for a, _ in ab]),
                jnp.stack([b for _, b in ab]), x, y, data_key)
        if compiled is None:
            t0 = time.perf_counter()
            compiled = search.lower(*args).compile()
            compile_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        states, e = jax.block_until_ready(compiled(*args))
        seconds += time.perf_counter() - t0
        states = jax.device_get(states)
        out.append(jax.tree.map(lambda v: np.asarray(v)[: len(chunk)], states))
        if on_chunk_done is not None:
            on_chunk_done(int(e))
    st = jax.tree.map(lambda *v: np.concatenate(v), *out)
    masks, patterns = np.asarray(st.mask_best, np.float32), np.asarray(st.pattern_best, np.float32)
    if not (np.isfinite(masks).all() and np.isfinite(patterns).all()):
        raise DivergenceError("the trigger search diverged (non-finite mask or pattern); lower lr (--set lr=...)")
    norms = np.abs(masks).reshape(len(classes), -1).sum(1)
    result = SearchResult(masks, patterns, norms, np.asarray(st.sched.cost), np.asarray(st.last_acc),
                          np.asarray(st.sched.epochs), np.asarray(st.sched.reg_best) < math.inf)
    return result, seconds, compile_seconds
