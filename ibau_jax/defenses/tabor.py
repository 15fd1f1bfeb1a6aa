"""TABOR (``tabor``; Guo et al., "TABOR: A Highly Accurate Approach to Inspecting and Restoring
Trojan Backdoors in AI Systems", 2019): Neural Cleanse with four more regularisers.

The search minimises NC's objective (``trigger_inversion``) plus, with m (H, W, 1) the mask,
p (H, W, C) the pattern, q = (1 − m) · p the pattern outside the mask,

    λ1 (‖m‖₁ + ‖m‖₂²)                     R1, overly large triggers (mask)
  + λ2 (‖q‖₁ + ‖q‖₂²)                     R1, overly large triggers (pattern outside the mask)
  + λ3 S(m) + λ4 S(q)                     R2, scattered triggers: S(z) = Σ (z[i+1, j] − z[i, j])²
                                              + Σ (z[i, j+1] − z[i, j])²  (squared differences)
  + λ5 mean CE(f((1 − m) · x), y)         R3, blocking triggers: the masked-out input keeps its label
  + λ6 CE(f(m · p), t)                    R4, overlaying triggers: the trigger alone gives the target

with TrojanZoo's weights (λ1..λ6) = (1e-6, 1e-5, 1e-7, 1e-8, 0, 1e-2)
(``trojanvision/defenses/backdoor/model_inversion/tabor.py``, ``tabor_hyperparams``; R3 is off
there by default, so it is here). As in TrojanZoo, the smoothness terms are sums of SQUARED
neighbour differences (``F.mse_loss(..., reduction='sum')``), not absolute total variation.
Detection and mitigation are Neural Cleanse's.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from ..errors import ConfigError, check_finite
from .nc import NCConfig, NeuralCleanse
from .trigger_inversion import Regularizer

WEIGHTS = ("w_mask_size", "w_pattern_size", "w_mask_smooth", "w_pattern_smooth", "w_blocking", "w_overlay")


@dataclasses.dataclass(frozen=True)
class TaborConfig(NCConfig):
    """TABOR's settings: Neural Cleanse's (:class:`nc.NCConfig`) plus the regulariser weights
    λ1..λ6 = TrojanZoo's ``tabor_hyperparams`` default [1e-6, 1e-5, 1e-7, 1e-8, 0, 1e-2]."""

    w_mask_size: float = 1e-6
    w_pattern_size: float = 1e-5
    w_mask_smooth: float = 1e-7
    w_pattern_smooth: float = 1e-8
    w_blocking: float = 0.0
    w_overlay: float = 1e-2

    def __post_init__(self):
        super().__post_init__()
        for name in WEIGHTS:
            if check_finite(name, getattr(self, name)) < 0:
                raise ConfigError(f"{name} must be a finite number >= 0, got {getattr(self, name)!r} (--set {name}=...)")


def smoothness(z: jax.Array) -> jax.Array:
    """S(z) = Σ (z[i+1, j] − z[i, j])² + Σ (z[i, j+1] − z[i, j])² over z (H, W, C)."""
    return jnp.sum((z[1:] - z[:-1]) ** 2) + jnp.sum((z[:, 1:] - z[:, :-1]) ** 2)


def tabor_regularizer(cfg: TaborConfig) -> Regularizer:
    """TABOR's R(m, p, x, y, t, logits_fn) with ``cfg``'s weights (see the module docstring)."""

    def reg(m, p, x, y, t, logits_fn):
        q = (1 - m) * p
        loss = (cfg.w_mask_size * (jnp.sum(jnp.abs(m)) + jnp.sum(m ** 2))
                + cfg.w_pattern_size * (jnp.sum(jnp.abs(q)) + jnp.sum(q ** 2))
                + cfg.w_mask_smooth * smoothness(m) + cfg.w_pattern_smooth * smoothness(q))
        if cfg.w_blocking:
            ce = optax.softmax_cross_entropy_with_integer_labels(logits_fn((1 - m) * x), y)
            loss = loss + cfg.w_blocking * jnp.mean(ce)
        if cfg.w_overlay:
            # TrojanZoo repeats m·p over the batch; in eval mode every copy has the same CE,
            # so one image gives the same mean
            logits = logits_fn((m * p)[None])
            loss = loss + cfg.w_overlay * optax.softmax_cross_entropy_with_integer_labels(logits, t[None])[0]
        return loss

    return reg


class Tabor(NeuralCleanse):
    """``tabor``: Neural Cleanse's detection and mitigation with TABOR's search objective
    (result fields as :class:`nc.NeuralCleanse`)."""

    name = "tabor"
    Config = TaborConfig

    def regularizer(self) -> Regularizer:
        return tabor_regularizer(self.config)
