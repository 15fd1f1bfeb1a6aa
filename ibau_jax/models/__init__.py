"""Flax linen models and their registry. A model is a pure ``apply(variables, x, train=False)``.

Inputs are NHWC float32 images in [0, 1] (no normalization), as in the original I-BAU code
(which is NCHW in PyTorch; ``checkpoints`` converts the weights). Every model's
``__call__(x, train=False, example_mask=None)`` also

* sows named intermediate features into the "intermediates" collection (``features``),
* multiplies each BatchNorm output by an optional per-channel mask from the "neuron_masks"
  collection (``mask_template``; pruning = zeros in it),
* takes BN batch statistics in train mode over the rows where ``example_mask`` (N,) is 1 only
  (padded batches),

none of which changes the ``{"params", "batch_stats"}`` layout of ``init_variables``.

Modules: ``layers`` (BN constants and helper, ``Conv3x3``, pooling, ELU), ``vgg``, ``resnet``,
``features``, ``masks``, ``conv`` (the canonical 3x3 conv), ``errors``.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from . import conv
from .conv import conv3x3
from .errors import ModelError
from .features import INTERMEDIATES, features, sown
from .layers import BN_EPS, BN_MOMENTUM, Conv3x3, batch_norm, elu, max_pool_2x2
from .masks import NEURON_MASKS, check_neuron_masks, mask_template
from .resnet import BasicBlock, PreActBlock, PreActResNet18, ResNet18
from .vgg import SmallVGG

__all__ = [
    "BN_EPS", "BN_MOMENTUM", "BasicBlock", "Conv3x3", "INTERMEDIATES", "MODELS", "ModelError",
    "NEURON_MASKS", "PreActBlock", "PreActResNet18", "ResNet18", "SmallVGG", "batch_norm",
    "check_neuron_masks", "conv", "conv3x3", "elu", "features", "get_model", "init_variables",
    "mask_template", "max_pool_2x2", "register", "sown",
]

# name -> constructor called as ctor(num_classes=..., **kwargs); extend with ``register``.
MODELS: dict[str, Callable[..., nn.Module]] = {
    "small_vgg": SmallVGG,
    # the demo's narrow VGG (conv widths 16, 32, 64): digits models that train in seconds on a CPU
    "small_vgg_narrow": functools.partial(SmallVGG, widths=(16, 32, 64)),
    "preact_resnet18": PreActResNet18,
    "resnet18": ResNet18,
}


def register(name: str, ctor: Callable[..., nn.Module]) -> None:
    """Make ``get_model(name, num_classes, **kwargs)`` return ``ctor(num_classes=..., **kwargs)``.

    ModelError when ``name`` is taken (the built-in names cannot be replaced by accident).
    """
    if name in MODELS:
        raise ModelError(f"model name {name!r} is already registered; pick another name "
                         f"(taken: {sorted(MODELS)})")
    MODELS[name] = ctor


def get_model(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """Return the flax module registered under ``name`` for ``num_classes`` classes."""
    if name not in MODELS:
        raise ModelError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    if num_classes < 2:
        raise ModelError(f"num_classes must be >= 2, got {num_classes}")
    return MODELS[name](num_classes=num_classes, **kwargs)


def init_variables(model: nn.Module, seed: int = 0, image_shape: tuple[int, int, int] = (32, 32, 3)):
    """Randomly initialised ``{'params', 'batch_stats'}`` for ``model`` (no other collection)."""
    return model.init(jax.random.PRNGKey(seed), jnp.zeros((1, *image_shape), jnp.float32), train=False)
