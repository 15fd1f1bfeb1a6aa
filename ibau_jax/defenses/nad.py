"""Neural Attention Distillation (``nad``; Li et al., ICLR 2021, reference code bboylyg/NAD).

Two stages on the defender's clean set:

1. Teacher: the poisoned model fine-tuned with cross-entropy for ``teacher_epochs`` epochs
   (``training.make_epoch_fn``, the step that trains poisoned models and runs ``ft``).
2. Student: the poisoned model again, trained for ``epochs`` epochs on

       L = CE(f_S(x), y) + sum_i beta_i * AT(F_S_i(x), F_T_i(x))

   where F_i are the feature maps (N, H, W, C) at the outputs of three conv blocks, the
   teacher runs frozen in eval mode and the student in train mode, on the same augmented x.

The attention map of a feature map f (N, H, W, C) (the reference's ``AT.attention_map``):

    a = sum_c |f_c|^p                 (N, H, W) -> flattened (N, H*W)
    A = a / (||a||_2 + 1e-6)          per example, the L2 norm over the H*W positions

and the loss is the reference's ``F.mse_loss(A_S, A_T)``: the MEAN of the squared difference
over the N*H*W entries (not a norm), i.e. the mean over examples of ``mean_hw (A_S - A_T)^2``.

Each epoch is one pure jitted ``lax.scan`` over the batches; teacher and student epochs both go
through ``base.run_rounds`` (one history record per student epoch; the teacher's epochs are in
``diagnostics["teacher_history"]``). With a mesh, every batch is padded to a multiple of the
device count at weight 0 and split over the devices, as in ``training``.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .. import sharding, training
from ..errors import ConfigError, UserError, check_finite
from ..models.features import INTERMEDIATES, sown
from .base import CleanSet, DefenseResult, check_one_batch, run_rounds

PyTree = Any
AUTO = "auto"
NUM_LAYERS = 3
EPS = 1e-6  # the reference's attention_map eps


class FeatureLayerError(UserError):
    """The model does not sow the feature maps NAD distils."""


@dataclasses.dataclass(frozen=True)
class NADConfig:
    """NAD settings. Every default is the reference code's (bboylyg/NAD) unless stated.

    Student (``main.py`` + ``config.py`` + ``utils/util.py``): ``epochs`` 20, ``batch_size`` 64,
    SGD with Nesterov momentum 0.9 and weight decay 1e-4 (PyTorch's coupled L2, on every
    parameter), and ``adjust_learning_rate``'s steps: ``lr`` 0.1 for epochs 0..1, ``lr_mid``
    0.01 from epoch ``lr_mid_epoch`` 2, ``lr_min`` 1e-4 from epoch ``lr_min_epoch`` 20 (never
    reached by the default 20 epochs). ``beta1, beta2, beta3`` 500 / 1000 / 1000: the β of the
    low, middle and high layer in the reference's config.py at commit f17b713 (the paper's
    CIFAR-10 setting; the repository's latest config uses 0 / 0 / 5000, i.e. only the last
    layer). ``p`` 2 (``--p``).

    Teacher: ``teacher_epochs`` 10 (the reference README: the teacher is the backdoored model
    fine-tuned on the clean subset for 5~10 epochs "by just setting all the param beta = 0",
    i.e. main.py's optimiser and learning-rate steps, which the teacher uses here too).

    ``crop_pad`` 4 / ``flip``: random crop and horizontal flip (the reference README's
    augmentation for its fine-tuning and NAD table; the older data_loader also applied a
    3-pixel Cutout, not done here). ``flip=False`` for GTSRB.

    ``layers``: three sown feature-map names, comma-separated, low to high (paired with
    beta1..beta3), or ``"auto"``: the model's last three sown 4-D maps — "block1,block2,block3"
    for SmallVGG (its three conv blocks, as the reference's three WRN groups), and
    "layer2,layer3,layer4" for the four-stage ResNet-18s (the reference's ResNet and WRN have
    three stages and distil all three; on four stages we keep the last three, so the highest
    β still lands on the last conv stage).
    """

    teacher_epochs: int = 10
    epochs: int = 20
    batch_size: int = 64
    lr: float = 0.1
    lr_mid: float = 0.01
    lr_min: float = 1e-4
    lr_mid_epoch: int = 2
    lr_min_epoch: int = 20
    momentum: float = 0.9
    weight_decay: float = 1e-4
    beta1: float = 500.0
    beta2: float = 1000.0
    beta3: float = 1000.0
    p: float = 2.0
    layers: str = AUTO
    crop_pad: int = 4
    flip: bool = True

    def __post_init__(self):
        for name in ("teacher_epochs", "epochs", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {v!r}")
        for name in ("lr_mid_epoch", "lr_min_epoch", "crop_pad"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"{name} must be an integer >= 0, got {v!r}")
        if self.lr_mid_epoch > self.lr_min_epoch:
            raise ConfigError(f"lr_mid_epoch ({self.lr_mid_epoch}) must be <= lr_min_epoch ({self.lr_min_epoch})")
        for name in ("lr", "lr_mid", "lr_min", "p"):
            if check_finite(name, getattr(self, name)) <= 0:
                raise ConfigError(f"{name} must be a finite number > 0, got {getattr(self, name)!r}")
        for name in ("beta1", "beta2", "beta3", "weight_decay"):
            if check_finite(name, getattr(self, name)) < 0:
                raise ConfigError(f"{name} must be a finite number >= 0, got {getattr(self, name)!r}")
        if not 0 <= check_finite("momentum", self.momentum) < 1:
            raise ConfigError(f"momentum must be in [0, 1), got {self.momentum!r}")
        if self.layers != AUTO and len(self.layer_names) != NUM_LAYERS:
            raise ConfigError(f"layers must be 'auto' or {NUM_LAYERS} comma-separated feature names "
                              f"(low to high, paired with beta1..beta3), got {self.layers!r}")

    @property
    def layer_names(self) -> tuple[str, ...]:
        """The configured names (empty for ``"auto"``)."""
        return () if self.layers == AUTO else tuple(n.strip() for n in self.layers.split(",") if n.strip())

    @property
    def betas(self) -> tuple[float, float, float]:
        return (float(self.beta1), float(self.beta2), float(self.beta3))


# ----------------------------------------------------------------------------- the math

def attention_map(f: jax.Array, p: float = 2.0, eps: float = EPS) -> jax.Array:
    """A = a / (||a||_2 + eps) with a = sum_c |f_c|^p, flattened per example.

    f (N, H, W, C) -> (N, H*W). The reference's ``AT.attention_map`` in NHWC.
    """
    a = jnp.sum(jnp.abs(f) ** p, axis=-1).reshape(f.shape[0], -1)
    sq = jnp.sum(a * a, axis=1, keepdims=True)
    # sqrt's gradient is infinite at 0: an all-zero map (possible after a ReLU) must give a
    # zero gradient, as PyTorch's norm does, not a NaN.
    safe = jnp.where(sq > 0, sq, 1.0)
    norm = jnp.where(sq > 0, jnp.sqrt(safe), 0.0)
    return a / (norm + eps)


def at_loss(f_student: jax.Array, f_teacher: jax.Array, p: float = 2.0) -> jax.Array:
    """Per-example attention-transfer loss (N,): ``mean_hw (A_S - A_T)^2``.

    Its mean over the batch is the reference's ``F.mse_loss(A_S, A_T)`` (a mean over all
    N*H*W entries). No gradient flows into the teacher's features.
    """
    d = attention_map(f_student, p) - jax.lax.stop_gradient(attention_map(f_teacher, p))
    return jnp.mean(d * d, axis=1)


def lr_schedule(config: NADConfig, steps_per_epoch: int) -> Callable[[jax.Array], jax.Array]:
    """The reference's ``adjust_learning_rate`` per optimiser step: lr before epoch
    ``lr_mid_epoch``, lr_mid before ``lr_min_epoch``, lr_min after."""
    mid, low = config.lr_mid_epoch * steps_per_epoch, config.lr_min_epoch * steps_per_epoch

    def schedule(count: jax.Array) -> jax.Array:
        return jnp.where(count < mid, config.lr, jnp.where(count < low, config.lr_mid, config.lr_min))

    return schedule


def make_optimizer(config: NADConfig, steps_per_epoch: int) -> optax.GradientTransformation:
    """PyTorch's ``SGD(lr, momentum, weight_decay, nesterov=True)``: g + wd·θ, then Nesterov
    momentum, then the step-wise learning rate (``lr_schedule``)."""
    sgd = optax.sgd(lr_schedule(config, steps_per_epoch), momentum=config.momentum or None, nesterov=config.momentum > 0)
    if config.weight_decay:
        return optax.chain(optax.add_decayed_weights(config.weight_decay), sgd)
    return sgd


def distill_step(state: training.TrainState, teacher: PyTree, batch: tuple[jax.Array, jax.Array],
                 rng: jax.Array, layers: tuple[str, ...], betas: tuple[float, ...], p: float = 2.0,
                 crop_pad: int = 4, flip: bool = True,
                 w: jax.Array | None = None) -> tuple[training.TrainState, dict[str, jax.Array]]:
    """One student step: L = CE + sum_i betas[i] * mean_n AT(F_S[layers[i]], F_T[layers[i]]).

    state: the student (train mode: batch statistics, dropout); teacher: ``{'params',
    'batch_stats'}`` of the same architecture, applied in eval mode; batch = (x (n, H, W, C) in
    [0, 1], y (n,)), augmented once (``training.augment``) and fed to both. ``w`` (n,): 1 for
    real examples, 0 for padding (excluded from every mean and from BatchNorm's statistics).
    The rng is split as in ``training.train_step`` (augmentation, dropout).
    Returns the new state and ``{'loss', 'ce', 'at', 'acc'}`` of the batch before the update
    (``at`` = sum_i beta_i AT_i).
    """
    x, y = batch
    aug_key, drop_key = jax.random.split(rng)
    x = training.augment(x.astype(jnp.float32), aug_key, crop_pad, flip)
    masked = {} if w is None else {"example_mask": w}
    _, t_state = state.apply_fn(teacher, x, mutable=[INTERMEDIATES])
    t_feats = sown(t_state[INTERMEDIATES], layers)

    def loss_fn(params):
        logits, updates = state.apply_fn({"params": params, "batch_stats": state.batch_stats}, x, train=True,
                                         rngs={"dropout": drop_key}, mutable=["batch_stats", INTERMEDIATES],
                                         **masked)
        s_feats = sown(updates[INTERMEDIATES], layers)
        ce = sharding.weighted_mean(optax.softmax_cross_entropy_with_integer_labels(logits, y), w)
        at = sum(b * sharding.weighted_mean(at_loss(s_feats[n], t_feats[n], p), w) for n, b in zip(layers, betas))
        return ce + at, (logits, updates["batch_stats"], ce, at)

    (loss, (logits, batch_stats, ce, at)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    hits = (jnp.argmax(logits, -1) == y).astype(jnp.float32)
    return state, {"loss": loss, "ce": ce, "at": at, "acc": sharding.weighted_mean(hits, w)}


def make_student_epoch(layers: tuple[str, ...], betas: tuple[float, ...], p: float, batch_size: int,
                       crop_pad: int = 4, flip: bool = True, on_step: Callable[[Any], None] | None = None,
                       mesh: Any = None) -> Callable[..., Any]:
    """``epoch(state, teacher, xs, ys, rng) -> (state, mean metrics)``, traceable: the training
    epoch's loop (``training.scan_epoch``: shuffle, drop the last N mod batch_size, scan) over
    ``distill_step``.
    With ``mesh``: batches padded to ``sharding.padded_size(batch_size, mesh)`` at weight 0 and
    split over the devices (state, teacher, xs, ys replicated)."""
    padded = batch_size if mesh is None else sharding.padded_size(batch_size, mesh)

    def epoch(state, teacher, xs, ys, rng):
        step = lambda st, batch, k, w: distill_step(st, teacher, batch, k, layers, betas, p, crop_pad, flip, w)
        return training.scan_epoch(step, state, xs, ys, rng, batch_size, padded_batch=padded, mesh=mesh,
                                   on_step=on_step)

    return epoch


# ----------------------------------------------------------------------------- the layers

def _natural(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def feature_maps(model: Any, variables: PyTree, image_shape: Sequence[int]) -> dict[str, tuple[int, ...]]:
    """``{name: shape}`` of the 4-D (N, H, W, C) features ``model`` sows, in natural name
    order; shapes only (``jax.eval_shape``: nothing is computed)."""
    x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
    _, state = jax.eval_shape(lambda v, x: model.apply(v, x, mutable=[INTERMEDIATES]), variables, x)
    inter = state.get(INTERMEDIATES, {})
    maps = {n: tuple(v[-1].shape) for n, v in inter.items()
            if isinstance(v, tuple) and v and hasattr(v[-1], "shape") and len(v[-1].shape) == 4}
    return {n: maps[n] for n in sorted(maps, key=_natural)}


def resolve_layers(config: NADConfig, model: Any, variables: PyTree, image_shape: Sequence[int]) -> tuple[str, ...]:
    """The three feature names to distil; FeatureLayerError (one line) when the model lacks them."""
    maps = feature_maps(model, variables, image_shape)
    name = type(model).__name__
    fix = ("sow each conv block's output into 'intermediates' (see ibau_jax/models/features.py) "
           "or name sown maps with --set layers=LOW,MID,HIGH")
    if config.layers == AUTO:
        if len(maps) < NUM_LAYERS:
            raise FeatureLayerError(f"NAD needs {NUM_LAYERS} sown conv feature maps, but {name} sows "
                                    f"{len(maps)} ({', '.join(maps) or 'none'}); {fix}")
        return tuple(list(maps)[-NUM_LAYERS:])
    missing = [n for n in config.layer_names if n not in maps]
    if missing:
        raise FeatureLayerError(f"NAD layers {', '.join(missing)} are not sown feature maps of {name} "
                                f"(it sows {', '.join(maps) or 'none'}); {fix}")
    return config.layer_names


# ----------------------------------------------------------------------------- the defense

class NAD:
    """``nad``: distil a clean-fine-tuned teacher's attention into the poisoned model.

    History per student epoch: ``round`` (the epoch), ``seconds``, ``loss`` (CE + AT), ``ce``,
    ``at`` (sum_i beta_i AT_i) and ``train_acc``, means over the epoch's steps. Diagnostics:
    ``layers``, ``steps_per_epoch``, ``devices``, ``teacher_history`` (per teacher epoch
    ``loss``, ``train_acc``, ``seconds``), ``teacher_seconds``, ``teacher_compile_seconds``.
    ``seconds``/``compile_seconds`` cover teacher and student together.
    """

    name = "nad"
    Config = NADConfig

    def __init__(self, config: NADConfig | None = None, on_step: Callable[[Any], None] | None = None):
        self.config = config if config is not None else NADConfig()
        self.on_step = on_step

    def num_steps(self, clean_set: CleanSet) -> int:
        """Teacher and student optimiser steps together (the progress bar's total)."""
        return (self.config.teacher_epochs + self.config.epochs) * (len(clean_set) // self.config.batch_size)

    def check_size(self, n: int) -> None:
        """ConfigError when a clean set of ``n`` images holds less than one batch."""
        check_one_batch(n, self.config.batch_size)

    def run(self, model, variables, clean_set: CleanSet, key: jax.Array, *, mesh: Any = None,
            callback=None) -> DefenseResult:
        cfg = self.config
        self.check_size(len(clean_set))
        steps = len(clean_set) // cfg.batch_size
        variables = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
        layers = resolve_layers(cfg, model, variables, np.shape(clean_set.x)[1:])
        xs, ys = np.asarray(clean_set.x, np.float32), np.asarray(clean_set.y, np.int32)

        def fresh_state():
            return training.TrainState.create(apply_fn=model.apply, params=variables["params"],
                                              batch_stats=variables["batch_stats"], tx=make_optimizer(cfg, steps))

        teacher_state, student_state = fresh_state(), fresh_state()
        if mesh is not None:
            teacher_state, student_state, xs, ys = sharding.replicate(mesh, (teacher_state, student_state, xs, ys))
        teacher_key, student_key = jax.random.split(key)
        variables_of = lambda s: sharding.to_host({"params": s.params, "batch_stats": s.batch_stats})
        hint = "lower lr (--set lr=... lr_mid=...)"

        # 1. the teacher: plain fine-tuning with the student's optimiser
        t_epoch = training.make_epoch_fn(cfg.batch_size, cfg.crop_pad, cfg.flip, self.on_step, mesh)
        t_step = jax.jit(lambda state, k, xs, ys: t_epoch(state, xs, ys, k))
        t_loop = run_rounds(t_step, teacher_state, [jax.random.fold_in(teacher_key, e)
                                                    for e in range(1, cfg.teacher_epochs + 1)],
                            consts=(xs, ys), variables_of=variables_of,
                            record_of=lambda r, m: {"loss": float(sharding.to_host(m["loss"])),
                                                    "train_acc": float(sharding.to_host(m["acc"]))},
                            divergence_hint=f"teacher: {hint}")
        teacher = {"params": t_loop.state.params, "batch_stats": t_loop.state.batch_stats}

        # 2. the student: CE + attention distillation from the frozen teacher
        s_epoch = make_student_epoch(layers, cfg.betas, float(cfg.p), cfg.batch_size, cfg.crop_pad, cfg.flip,
                                     self.on_step, mesh)
        s_step = jax.jit(lambda state, k, teacher, xs, ys: s_epoch(state, teacher, xs, ys, k))
        host = lambda m, k: float(sharding.to_host(m[k]))
        s_loop = run_rounds(s_step, student_state, [jax.random.fold_in(student_key, e)
                                                    for e in range(1, cfg.epochs + 1)],
                            consts=(teacher, xs, ys), variables_of=variables_of,
                            record_of=lambda r, m: {"loss": host(m, "loss"), "ce": host(m, "ce"),
                                                    "at": host(m, "at"), "train_acc": host(m, "acc")},
                            callback=callback, divergence_hint=hint)
        diagnostics = {"layers": list(layers), "steps_per_epoch": steps, "devices": sharding.num_devices(mesh),
                       "teacher_history": t_loop.history, "teacher_seconds": round(t_loop.seconds, 3),
                       "teacher_compile_seconds": round(t_loop.compile_seconds, 3)}
        return DefenseResult(variables_of(s_loop.state), s_loop.history, diagnostics,
                             t_loop.seconds + s_loop.seconds, t_loop.compile_seconds + s_loop.compile_seconds)
