"""Fine-Pruning (``fp``; Liu, Dolan-Gavitt & Garg, RAID 2018): prune the last conv layer's least
active channels, then fine-tune.

1. Split the defender's clean set (N images) with ``key``: a held-out part of
   ``round(holdout_fraction · N)`` images, the rest (the *train part*) for ranking and fine-tuning.
2. Rank: a_c = mean over images and positions of channel c of the last conv block's output
   (SmallVGG: conv5 → bn5 → ELU → max-pool, the sown "block3", (N, H', W', C)) on the train
   part; order the channels by a_c ascending (stable: ties keep the lower index first).
3. Sweep: for k = 0, s, 2s, … < C, s = ⌈prune_step · C⌉, the model with the k least active
   channels zeroed is scored on the held-out part, all candidates in ONE compiled program
   (:func:`sweep_accuracies`). Keep the largest k before the first one whose relative accuracy
   drop (acc₀ − acc_k) / acc₀ exceeds ``max_acc_drop`` (:func:`select_prune_count`).
4. Bake: a pruned channel's BN scale and bias are set to 0, so BN, ELU (ELU(0) = 0), pooling and
   dropout all give exactly 0 there; the variables stay plain ``{'params', 'batch_stats'}``.
5. Fine-tune ``epochs`` epochs on the train part (the ``training`` epoch, as ``ft``) with the
   pruned channels' scale/bias updates masked to 0, so they stay exactly 0.

Why the sweep is cheap and exact: zeroing channel c only zeroes its slice of the classifier's
input x (N, C·H'·W', flattened NCHW). So the logits of every candidate mask m (C,) are
``Σ_c m_c · P[:, c, :] + b`` with P[n, c, :] = x[n, c, :] @ W[c, :, :] computed once: one forward
pass of the held-out part instead of one per candidate (CPU: 128 full passes would take minutes).

Supported models: :class:`models.SmallVGG` (any widths). A ResNet's last block ends in a residual
sum, so zeroing a BN channel does not silence the channel there; such models are refused with
:class:`UnsupportedModelError`.

``selection="oracle"`` (BackdoorBench picks k with test-set accuracy, which a defender does not
have) is for comparison only: it needs ``FinePruning(config, oracle_set=(x, y))`` from Python;
then the whole clean set ranks and fine-tunes and (x, y) scores the sweep.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .. import models, sharding
from ..errors import ConfigError, check_finite
from ..models import ModelError
from .base import CleanSet, DefenseResult
from .ft import FTConfig, fine_tune

SELECTIONS = ("holdout", "oracle")
MIN_HOLDOUT = 10       # an accuracy on fewer images moves in steps > 10 %, coarser than the threshold
FEATURE_BATCH = 500    # images per forward pass when computing the last block's features


class UnsupportedModelError(ModelError):
    """The model has no last conv layer that Fine-Pruning can prune by zeroing BN channels."""


@dataclasses.dataclass(frozen=True)
class FPConfig:
    """Fine-Pruning settings.

    Sources: prune_step 0.01 (prune 1 % of the channels per step) and max_acc_drop 0.1 (stop when
    the clean accuracy falls by more than 10 % of its unpruned value) = BackdoorBench's
    ``config/defense/fp/cifar10.yaml`` (``once_prune_ratio: 0.01``, ``acc_ratio: 0.1``); Liu et
    al. prune "until the accuracy on the validation set drops by more than a threshold".
    holdout_fraction 0.1 = ibau-jax's choice (BackdoorBench scores the sweep on the test set, an
    oracle): 500 of the original split's 5000 clean images, accuracy steps of 0.2 %.
    selection "holdout" (the defender's data only); "oracle" needs test data (module docstring).
    Fine-tuning as ``ft`` (``FTConfig``): epochs 10, lr 0.01 cosine-decayed, batch 128, SGD
    momentum 0.9, weight decay 5e-4 (BackdoorBench's fp fine-tunes with SGD 0.01, momentum 0.9,
    wd 5e-4, cosine, for 100 epochs of batch 256; 10 keeps it comparable with ``ft``).
    ``epochs=0`` is the pruning defense alone.
    """

    prune_step: float = 0.01
    max_acc_drop: float = 0.1
    holdout_fraction: float = 0.1
    selection: str = "holdout"
    epochs: int = 10
    lr: float = 0.01
    batch_size: int = 128
    momentum: float = 0.9
    weight_decay: float = 5e-4
    crop_pad: int = 4
    flip: bool = True

    def __post_init__(self):
        if not 0 < check_finite("prune_step", self.prune_step) <= 1:
            raise ConfigError(f"prune_step must be in (0, 1] (a fraction of the channels), got {self.prune_step!r}")
        if not 0 <= check_finite("max_acc_drop", self.max_acc_drop) < 1:
            raise ConfigError(f"max_acc_drop must be in [0, 1) (a relative accuracy drop), got {self.max_acc_drop!r}")
        if not 0 < check_finite("holdout_fraction", self.holdout_fraction) < 1:
            raise ConfigError(f"holdout_fraction must be in (0, 1), got {self.holdout_fraction!r}")
        if self.selection not in SELECTIONS:
            raise ConfigError(f"selection must be one of {SELECTIONS}, got {self.selection!r}")
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 0:
            raise ConfigError(f"epochs must be an integer >= 0, got {self.epochs!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"batch_size must be an integer >= 1, got {self.batch_size!r}")
        if check_finite("lr", self.lr) <= 0:
            raise ConfigError(f"lr must be a finite number > 0, got {self.lr!r}")
        if not 0 <= check_finite("momentum", self.momentum) < 1:
            raise ConfigError(f"momentum must be in [0, 1), got {self.momentum!r}")
        if check_finite("weight_decay", self.weight_decay) < 0:
            raise ConfigError(f"weight_decay must be a finite number >= 0, got {self.weight_decay!r}")
        if self.crop_pad < 0:
            raise ConfigError(f"crop_pad must be >= 0, got {self.crop_pad}")


# ----------------------------------------------------------------------------- the pure parts

@dataclasses.dataclass(frozen=True)
class PruneSite:
    """Where a model is pruned: the BN of its last conv layer, the sown block after it, C channels."""

    bn: str
    block: str
    channels: int


def prune_site(model: Any, variables: Any) -> PruneSite:
    """The last conv layer of ``model`` (SmallVGG: ``bn{2L-1}`` and ``block{L}``, L = len(widths)).

    UnsupportedModelError for any other model or variables without that BN's scale and bias.
    """
    name = type(model).__name__
    if not isinstance(model, models.SmallVGG):
        raise UnsupportedModelError(
            f"fp cannot prune {name}: it needs a last conv layer whose BatchNorm → activation → pooling "
            f"feeds the classifier alone (SmallVGG); a ResNet's last block ends in a residual sum and a model "
            f"without BatchNorm has no channel scale to zero; use --model small_vgg or another defense")
    n = len(model.widths)
    bn = f"bn{2 * n - 1}"
    p = variables.get("params", {}).get(bn, {})
    if "scale" not in p or "bias" not in p:
        raise UnsupportedModelError(f"fp cannot prune {name}: its params have no {bn}/scale and {bn}/bias "
                                    f"(pass the model's full variables)")
    return PruneSite(bn, f"block{n}", int(model.widths[-1]))


def channel_means(block: jax.Array) -> jax.Array:
    """a_c = mean over images and positions: block (N, H, W, C) -> (C,)."""
    return jnp.mean(block, axis=(0, 1, 2))


def prune_order(means: np.ndarray) -> np.ndarray:
    """Channel indices, least active first (stable: ties keep the lower index first)."""
    return np.argsort(np.asarray(means), kind="stable")


def prune_counts(channels: int, prune_step: float) -> np.ndarray:
    """The candidate counts k = 0, s, 2s, … < C with s = ⌈prune_step · C⌉ (BackdoorBench's grid)."""
    return np.arange(0, channels, max(1, math.ceil(prune_step * channels)))


def keep_masks(order: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """(K, C) float32: row i is 1 except 0 at the ``counts[i]`` first channels of ``order``."""
    masks = np.ones((len(counts), len(order)), np.float32)
    for i, k in enumerate(counts):
        masks[i, order[:k]] = 0.0
    return masks


def pruned_logits(x: jax.Array, kernel: jax.Array, bias: jax.Array, masks: jax.Array) -> jax.Array:
    """Logits of a linear head whose input channels are masked, for every mask at once.

    x (N, C, S): the head's input per channel (SmallVGG: the NCHW-flattened last block, S = H'·W');
    kernel (C·S, K), bias (K,); masks (M, C) -> (M, N, K) = Σ_c m_c · (x[:, c] @ W_c) + b.
    """
    n, c, s = x.shape
    per_channel = jnp.einsum("ncs,csk->nck", x, kernel.reshape(c, s, -1))
    return jnp.einsum("mc,nck->mnk", masks, per_channel) + bias


@jax.jit
def sweep_accuracies(x: jax.Array, y: jax.Array, kernel: jax.Array, bias: jax.Array,
                     masks: jax.Array) -> jax.Array:
    """Accuracy on (x, y) of every candidate mask: x (N, C, S), y (N,), masks (M, C) -> (M,). One program."""
    return jnp.mean(jnp.argmax(pruned_logits(x, kernel, bias, masks), -1) == y, axis=-1)


def select_prune_count(accuracies: np.ndarray, max_acc_drop: float) -> int:
    """Index of the last candidate before the first whose relative drop exceeds ``max_acc_drop``.

    accuracies (K,), accuracies[0] the unpruned model's: drop_i = (acc₀ − acc_i) / acc₀ (an
    accuracy gain is no drop). The sweep stops at the first i with drop_i > max_acc_drop and keeps
    i − 1, as Liu et al. and BackdoorBench stop pruning; index 0 (no pruning) is always allowed.
    """
    acc = np.asarray(accuracies, np.float64)
    drop = (acc[0] - acc) / max(acc[0], 1e-12)
    over = np.nonzero(drop > max_acc_drop)[0]
    return int(over[0] - 1) if len(over) else len(acc) - 1


def bake(variables: Any, site: PruneSite, keep: np.ndarray) -> dict:
    """``{'params', 'batch_stats'}`` with ``site.bn``'s scale and bias multiplied by keep (C,)."""
    params = jax.tree.map(np.asarray, variables["params"])
    params = {**params, site.bn: {**params[site.bn], "scale": params[site.bn]["scale"] * keep,
                                  "bias": params[site.bn]["bias"] * keep}}
    return {"params": params, "batch_stats": jax.tree.map(np.asarray, variables["batch_stats"])}


def freeze_pruned(site: PruneSite, keep: np.ndarray) -> optax.GradientTransformation:
    """Multiplies the updates of ``site.bn``'s scale and bias by keep (C,): pruned entries stay put."""
    keep = jnp.asarray(keep, jnp.float32)

    def mask(path, u):
        keys = [getattr(p, "key", None) for p in path]
        return u * keep if keys[-2:] in ([site.bn, "scale"], [site.bn, "bias"]) else u

    return optax.stateless(lambda updates, params=None: jax.tree_util.tree_map_with_path(mask, updates))


def make_feature_fn(model: Any, site: PruneSite) -> Callable[..., tuple[jax.Array, jax.Array]]:
    """``f(variables, xb) -> (block (B, H', W', C), head input (B, C, S))`` in eval mode, jitted:
    one program for every batch of the same size (the sweep's and the ranking's)."""

    @jax.jit
    def f(variables, xb):
        out = models.features(model, variables, xb, names=[site.block, "features"])
        return out[site.block], out["features"].reshape(xb.shape[0], site.channels, -1)

    return f


def last_block_features(feature_fn: Callable[..., Any], variables: Any, x: np.ndarray,
                        batch: int = FEATURE_BATCH) -> tuple[np.ndarray, np.ndarray]:
    """(channel means (C,), head input (N, C, S)) of x (N, H, W, 3), in padded batches of ``batch``.

    The padding rows are cut off before the means (so they count no image twice).
    """
    n = x.shape[0]
    blocks, feats = [], []
    for i in range(0, n, batch):
        xb = x[i:i + batch]
        pad = batch - xb.shape[0]
        blk, ft = feature_fn(variables, np.concatenate([xb, np.zeros((pad, *x.shape[1:]), x.dtype)]) if pad else xb)
        blocks.append(np.asarray(blk)[:batch - pad])
        feats.append(np.asarray(ft)[:batch - pad])
    block = np.concatenate(blocks)
    return np.asarray(channel_means(block)), np.concatenate(feats)


# ----------------------------------------------------------------------------- the defense

class FinePruning:
    """``fp``: prune the last conv layer's least active channels on held-out clean data, then fine-tune.

    History per fine-tuning epoch: ``round``, ``seconds``, ``loss``, ``train_acc``. Diagnostics:
    ``layer``, ``channels``, ``pruned`` (count), ``pruned_fraction``, ``pruned_channels``,
    ``sweep_counts`` and ``sweep_accuracies`` (held-out accuracy per candidate count),
    ``selected_accuracy``, ``holdout_size``, ``selection``, ``sweep_seconds``, ``steps_per_epoch``.
    """

    name = "fp"
    Config = FPConfig

    def __init__(self, config: FPConfig | None = None, on_step: Callable[[Any], None] | None = None,
                 oracle_set: tuple[np.ndarray, np.ndarray] | None = None):
        self.config = config if config is not None else FPConfig()
        self.on_step = on_step
        if self.config.selection == "oracle" and oracle_set is None:
            raise ConfigError("selection='oracle' scores the pruning sweep on test data, which a defense is not "
                              "given: use selection=holdout, or FinePruning(config, oracle_set=(x, y)) from Python")
        self.oracle_set = oracle_set

    def _sizes(self, n: int) -> tuple[int, int]:
        """(held-out size, train-part size) of a clean set of n images."""
        hold = 0 if self.config.selection == "oracle" else int(round(self.config.holdout_fraction * n))
        return hold, n - hold

    def num_steps(self, clean_set: CleanSet) -> int:
        return self.config.epochs * (self._sizes(len(clean_set))[1] // self.config.batch_size)

    def check_size(self, n: int) -> tuple[int, int]:
        """(held-out size, train-part size) of a clean set of ``n`` images; ConfigError when
        either is too small."""
        cfg = self.config
        hold, train = self._sizes(n)
        if cfg.selection == "holdout" and hold < MIN_HOLDOUT:
            raise ConfigError(f"the clean set has {n} images: holdout_fraction={cfg.holdout_fraction} holds out {hold}, "
                              f"fewer than {MIN_HOLDOUT}; raise holdout_fraction or use a larger clean set (--n-clean)")
        if train < max(1, cfg.batch_size if cfg.epochs else 1):
            raise ConfigError(f"the clean set has {n} images: {train} remain after holding out {hold}, fewer than one "
                              f"batch of {cfg.batch_size}; lower batch_size or holdout_fraction, or use more images")
        return hold, train

    def run(self, model, variables, clean_set: CleanSet, key: jax.Array, *, mesh: Any = None,
            callback=None) -> DefenseResult:
        cfg = self.config
        site = prune_site(model, variables)
        n_hold, n_train = self.check_size(len(clean_set))
        k_split, k_ft = jax.random.split(key)
        perm = np.asarray(jax.random.permutation(k_split, len(clean_set)))
        x, y = np.asarray(clean_set.x, np.float32), np.asarray(clean_set.y, np.int32)
        hold, train = perm[:n_hold], perm[n_hold:]
        if cfg.selection == "oracle":
            score_x, score_y = np.asarray(self.oracle_set[0], np.float32), np.asarray(self.oracle_set[1], np.int32)
        else:
            score_x, score_y = x[hold], y[hold]
        train_x, train_y = x[train], y[train]

        # Rank, sweep, select (compilation timed apart from the work).
        batch = min(FEATURE_BATCH, max(len(train_y), len(score_y)))
        feature_fn = make_feature_fn(model, site)
        t0 = time.perf_counter()
        feature_fn = feature_fn.lower(variables, jax.ShapeDtypeStruct((batch, *x.shape[1:]), jnp.float32)).compile()
        head = variables["params"]["classifier"]
        c = site.channels
        counts = prune_counts(c, cfg.prune_step)
        spec = lambda shape, dt=jnp.float32: jax.ShapeDtypeStruct(shape, dt)
        sweep = sweep_accuracies.lower(spec((len(score_y), c, head["kernel"].shape[0] // c)),
                                       spec((len(score_y),), jnp.int32), spec(head["kernel"].shape),
                                       spec(head["bias"].shape), spec((len(counts), c))).compile()
        compile_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        means, _ = last_block_features(feature_fn, variables, train_x, batch)
        _, score_feats = last_block_features(feature_fn, variables, score_x, batch)
        order = prune_order(means)
        masks = keep_masks(order, counts)
        accs = np.asarray(sweep(score_feats, score_y, np.asarray(head["kernel"], np.float32),
                                np.asarray(head["bias"], np.float32), masks))
        best = select_prune_count(accs, cfg.max_acc_drop)
        keep = masks[best]
        pruned = bake(variables, site, keep)
        sweep_seconds = time.perf_counter() - t0

        # Fine-tune with the pruned channels frozen at 0.
        history, ft_seconds, ft_compile, steps = [], 0.0, 0.0, n_train // cfg.batch_size
        result_variables = pruned
        if cfg.epochs:
            ft_cfg = FTConfig(epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size, momentum=cfg.momentum,
                              weight_decay=cfg.weight_decay, crop_pad=cfg.crop_pad, flip=cfg.flip)
            loop = fine_tune(model, pruned, train_x, train_y, k_ft, ft_cfg, on_step=self.on_step, mesh=mesh,
                             callback=callback, extra_tx=freeze_pruned(site, keep))
            result_variables = loop.state
            history, ft_seconds, ft_compile = loop.history, loop.seconds, loop.compile_seconds

        diagnostics = {
            "layer": site.bn, "channels": site.channels, "pruned": int(counts[best]),
            "pruned_fraction": round(int(counts[best]) / site.channels, 4),
            "pruned_channels": sorted(int(c) for c in order[:counts[best]]),
            "sweep_counts": [int(k) for k in counts], "sweep_accuracies": [round(float(a), 4) for a in accs],
            "selected_accuracy": round(float(accs[best]), 4), "holdout_size": int(len(score_y)),
            "selection": cfg.selection, "sweep_seconds": round(sweep_seconds, 3), "steps_per_epoch": steps,
            "devices": sharding.num_devices(mesh)}
        return DefenseResult(result_variables, history, diagnostics, sweep_seconds + ft_seconds,
                             compile_seconds + ft_compile)
