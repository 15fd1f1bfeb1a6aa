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


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2, stride-2 max pooling as element-wise selects; the first maximum in the window wins.

    Shapes: x (N, H, W, C) with H, W even -> (N, H/2, W/2, C). Same values as
    ``nn.max_pool(x, (2, 2), strides=(2, 2))`` and the same derivatives of every order, ties
    included: the gradient goes to the first maximal element in row-major window order, as
    in XLA's ``select_and_scatter`` and PyTorch's ``max_pool2d``. (``jnp.max`` would split a
    tie evenly; ties are common where saturated image regions make neighbouring activations
    equal.) Why: the derivatives of ``reduce_window`` are ``select_and_scatter`` ops that
    XLA's CPU backend runs slowly inside the I-BAU round (docs/performance.md); selects
    are element-wise and fuse.
    """
    n, h, w, c = x.shape
    if h % 2 or w % 2:
        return nn.max_pool(x, (2, 2), strides=(2, 2))
    v = x.reshape(n, h // 2, 2, w // 2, 2, c)
    is_max = v == jnp.max(v, axis=(2, 4), keepdims=True)
    # First maximum in row-major window order: weight the tied positions 8, 4, 2, 1, keep the largest.
    order = jnp.asarray([[8, 4], [2, 1]], jnp.int8).reshape(1, 1, 2, 1, 2, 1)
    score = jnp.where(is_max, order, jnp.int8(0))
    first = score == jnp.max(score, axis=(2, 4), keepdims=True)
    # The mask is piecewise constant in x, so every derivative flows to the selected element
    # through a broadcast and a select (no pads or scatters).
    return jnp.sum(jnp.where(first, v, jnp.zeros((), v.dtype)), axis=(2, 4))


def elu(x: jax.Array) -> jax.Array:
    """ELU with α = 1: x for x > 0, eˣ − 1 otherwise.

    ``nn.elu`` (and PyTorch) use ``expm1``, which XLA's CPU backend runs slowly; ``exp`` it
    vectorizes, and a faithful I-BAU round evaluates ELU and its derivatives many times per
    step (docs/performance.md). The two differ by about one float32 ulp of 1 (1e-7) in
    absolute value at most.
    """
    return jnp.where(x > 0, x, jnp.exp(jnp.minimum(x, 0.0)) - 1.0)


class Conv3x3(nn.Module):
    """3x3 'SAME' conv with bias, parameters named and shaped like ``nn.Conv`` (kernel HWIO).

    ``impl='canonical'`` uses ``conv.conv3x3`` (fast second-order work inside scans on CPU,
    reverse mode only); ``impl='xla'`` uses ``lax.conv_general_dilated`` and its autodiff.
    """

    features: int
    impl: str = "canonical"
    use_bias: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (3, 3, x.shape[-1], self.features))
        if self.impl == "canonical":
            y = conv3x3(x, kernel)
        elif self.impl == "xla":
            y = jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)),
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
        else:
            raise ValueError(f"unknown conv impl {self.impl!r}; use 'canonical' or 'xla'")
        if not self.use_bias:
            return y
        return y + self.param("bias", nn.initializers.zeros_init(), (self.features,))


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
                x = elu(x)
                i += 1
            x = max_pool_2x2(x)
            x = nn.Dropout(rate, deterministic=not train)(x)
        x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)
        return nn.Dense(self.num_classes, name="classifier")(x)


# ----------------------------------------------------------------------------- CIFAR ResNets
#
# Layouts follow Kuang Liu's pytorch-cifar (also used by BackdoorBench): every conv is bias-free,
# padding as in PyTorch (3x3: 1 on each side, also when strided; 1x1: none). Stride-1 3x3 convs
# are ``Conv3x3`` (canonical custom-VJP path: fast reverse mode inside ``lax.scan`` on XLA CPU);
# the three strided 3x3 convs and the 1x1 shortcut convs are ``nn.Conv`` and take XLA's generic
# gradient path (slower inside scans on CPU, and the only convs not covered by ``conv.py``).


def _bn(train: bool, name: str) -> nn.BatchNorm:
    return nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPS, name=name)


def _conv3x3(features: int, stride: int, impl: str, name: str) -> nn.Module:
    """A bias-free 3x3 conv, PyTorch padding 1: ``Conv3x3`` at stride 1, ``nn.Conv`` otherwise."""
    if stride == 1:
        return Conv3x3(features, impl, use_bias=False, name=name)
    return nn.Conv(features, (3, 3), strides=(stride, stride), padding=((1, 1), (1, 1)), use_bias=False,
                   name=name)


def _conv1x1(features: int, stride: int, name: str) -> nn.Conv:
    return nn.Conv(features, (1, 1), strides=(stride, stride), padding="VALID", use_bias=False, name=name)


class PreActBlock(nn.Module):
    """Pre-activation basic block (He et al. 2016, "Identity Mappings"):

    o = relu(bn1(x)); shortcut = conv1x1_s(o) if the shape changes else x;
    out = conv3x3(relu(bn2(conv3x3_s(o)))) + shortcut.
    """

    features: int
    stride: int = 1
    conv_impl: str = "canonical"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        out = nn.relu(_bn(train, "bn1")(x))
        if self.stride != 1 or x.shape[-1] != self.features:
            shortcut = _conv1x1(self.features, self.stride, "shortcut")(out)
        else:
            shortcut = x
        out = _conv3x3(self.features, self.stride, self.conv_impl, "conv1")(out)
        out = _conv3x3(self.features, 1, self.conv_impl, "conv2")(nn.relu(_bn(train, "bn2")(out)))
        return out + shortcut


class BasicBlock(nn.Module):
    """Post-activation basic block (He et al. 2015):

    out = relu(bn2(conv3x3(relu(bn1(conv3x3_s(x))))) + shortcut(x)),
    shortcut = bn(conv1x1_s(x)) if the shape changes else x.
    """

    features: int
    stride: int = 1
    conv_impl: str = "canonical"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        out = nn.relu(_bn(train, "bn1")(_conv3x3(self.features, self.stride, self.conv_impl, "conv1")(x)))
        out = _bn(train, "bn2")(_conv3x3(self.features, 1, self.conv_impl, "conv2")(out))
        if self.stride != 1 or x.shape[-1] != self.features:
            shortcut = _bn(train, "shortcut_bn")(_conv1x1(self.features, self.stride, "shortcut")(x))
        else:
            shortcut = x
        return nn.relu(out + shortcut)


class _CifarResNet(nn.Module):
    num_classes: int = 10
    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    widths: Sequence[int] = (64, 128, 256, 512)
    conv_impl: str = "canonical"

    preact = False  # class attribute, not a dataclass field

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = Conv3x3(64, self.conv_impl, use_bias=False, name="conv1")(x)
        if not self.preact:
            x = nn.relu(_bn(train, "bn1")(x))
        block = PreActBlock if self.preact else BasicBlock
        for s, (n, width) in enumerate(zip(self.stage_sizes, self.widths)):
            for b in range(n):
                stride = 2 if (s > 0 and b == 0) else 1
                x = block(width, stride, self.conv_impl, name=f"layer{s + 1}_{b}")(x, train)
        x = jnp.mean(x, axis=(1, 2))          # global average pool (4x4 for 32x32 inputs)
        return nn.Dense(self.num_classes, name="linear")(x)


class PreActResNet18(_CifarResNet):
    """PreAct-ResNet-18 as in Kuang Liu's pytorch-cifar / BackdoorBench.

    Stem: conv3x3(64) only (no BN/ReLU: each PreActBlock starts with BN-ReLU); 4 stages of
    2 PreActBlocks with widths (64, 128, 256, 512) and strides (1, 2, 2, 2); shortcuts are a bare
    1x1 conv (no BN) when the shape changes. No final BN-ReLU (as in that code): global average
    pool of the last block's sum, then linear. 11,171,146 parameters for 10 classes.

    Shapes: x (N, 32, 32, 3) -> logits (N, num_classes).
    """

    preact = True


class ResNet18(_CifarResNet):
    """The standard CIFAR ResNet-18 (Kuang Liu's pytorch-cifar).

    Stem: conv3x3(64), BN, ReLU; 4 stages of 2 BasicBlocks, widths (64, 128, 256, 512), strides
    (1, 2, 2, 2); shortcuts 1x1 conv + BN when the shape changes; global average pool, linear.
    11,173,962 parameters for 10 classes.

    Shapes: x (N, 32, 32, 3) -> logits (N, num_classes).
    """

    preact = False


MODELS: dict[str, Callable[..., nn.Module]] = {
    "small_vgg": SmallVGG,
    "preact_resnet18": PreActResNet18,
    "resnet18": ResNet18,
}


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
