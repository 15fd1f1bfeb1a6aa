"""Flax linen models. A model is a pure ``apply(variables, x, train=False)``.

Inputs are NHWC float32 images in [0, 1] (no normalization), as in the original
I-BAU code (which is NCHW in PyTorch; ``checkpoints`` converts the weights).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from .conv import conv3x3

# PyTorch BatchNorm2d defaults: eps 1e-5, running-stat momentum 0.1 (flax: 0.9).
BN_EPS = 1e-5
BN_MOMENTUM = 0.9


class Conv3x3(nn.Module):
    """3x3 'SAME' conv with bias, parameters named and shaped like ``nn.Conv`` (kernel HWIO).

    ``impl='canonical'`` uses ``conv.conv3x3`` (fast second-order work inside scans on CPU,
    reverse mode only); ``impl='xla'`` uses ``lax.conv_general_dilated`` and its autodiff.
    """

    features: int
    impl: str = "canonical"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (3, 3, x.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
        if self.impl == "canonical":
            y = conv3x3(x, kernel)
        elif self.impl == "xla":
            y = jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)),
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
        else:
            raise ValueError(f"unknown conv impl {self.impl!r}; use 'canonical' or 'xla'")
        return y + bias


class SmallVGG(nn.Module):
    """The I-BAU authors' "small VGG16".

    [conv3x3(32), BN, ELU] x2, maxpool2, dropout 0.3,
    [conv3x3(64), BN, ELU] x2, maxpool2, dropout 0.4,
    [conv3x3(128), BN, ELU] x2, maxpool2, dropout 0.4,
    flatten in NCHW order (so PyTorch's classifier weight maps unchanged), linear -> classes.

    Shapes: x (N, 32, 32, 3) -> logits (N, num_classes).
    """

    num_classes: int = 10
    widths: Sequence[int] = (32, 64, 128)
    dropout: Sequence[float] = (0.3, 0.4, 0.4)
    conv_impl: str = "canonical"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        i = 0
        for width, rate in zip(self.widths, self.dropout):
            for _ in range(2):
                x = Conv3x3(width, self.conv_impl, name=f"conv{i}")(x)
                x = nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM,
                                 epsilon=BN_EPS, name=f"bn{i}")(x)
                x = nn.elu(x)
                i += 1
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
            x = nn.Dropout(rate, deterministic=not train)(x)
        x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)
        return nn.Dense(self.num_classes, name="classifier")(x)


MODELS: dict[str, Callable[..., nn.Module]] = {"small_vgg": SmallVGG}


def get_model(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """Return the flax module registered under ``name`` for ``num_classes`` classes."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    return MODELS[name](num_classes=num_classes, **kwargs)


def init_variables(model: nn.Module, seed: int = 0, image_shape: tuple[int, int, int] = (32, 32, 3)):
    """Randomly initialised ``{'params', 'batch_stats'}`` for ``model``."""
    return model.init(jax.random.PRNGKey(seed), jnp.zeros((1, *image_shape), jnp.float32), train=False)
