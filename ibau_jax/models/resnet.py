"""CIFAR ResNets (flax linen): the basic blocks, PreActResNet18 and ResNet18.

Layouts follow Kuang Liu's pytorch-cifar (also used by BackdoorBench): every conv is bias-free,
padding as in PyTorch (3x3: 1 on each side, also when strided; 1x1: none). Stride-1 3x3 convs
are ``Conv3x3`` (canonical custom-VJP path: fast reverse mode inside ``lax.scan`` on XLA CPU);
the three strided 3x3 convs and the 1x1 shortcut convs are ``nn.Conv`` and take XLA's generic
gradient path (slower inside scans on CPU, and the only convs not covered by ``conv.py``).

Inputs are NHWC float32 images in [0, 1]. ``example_mask`` (N,) of 0/1 selects the rows BN
statistics are taken over in train mode (1 = a real example, 0 = padding).
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from .features import INTERMEDIATES
from .layers import Conv3x3, batch_norm
from .masks import check_example_mask, check_neuron_masks


def _conv3x3(features: int, stride: int, impl: str, name: str) -> nn.Module:
    """A bias-free 3x3 conv, PyTorch padding 1: ``Conv3x3`` at stride 1, ``nn.Conv`` otherwise."""
    if stride == 1:
        return Conv3x3(features, impl, use_bias=False, name=name)
    return nn.Conv(features, (3, 3), strides=(stride, stride), padding=((1, 1), (1, 1)), use_bias=False,
                   name=name)


def _conv1x1(features: int, stride: int, name: str) -> nn.Conv:
    return nn.Conv(features, (1, 1), strides=(stride, stride), padding="VALID", use_bias=False, name=name)


class _Block(nn.Module):
    """The fields of both CIFAR ResNet blocks: output channels, stride of the first conv, conv path."""

    features: int
    stride: int = 1
    conv_impl: str = "canonical"


class PreActBlock(_Block):
    """Pre-activation basic block (He et al. 2016, "Identity Mappings"):

    o = relu(bn1(x)); shortcut = conv1x1_s(o) if the shape changes else x;
    out = conv3x3(relu(bn2(conv3x3_s(o)))) + shortcut.
    """

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False,
                 example_mask: jax.Array | None = None) -> jax.Array:
        out = nn.relu(batch_norm(self, x, "bn1", train, example_mask))
        if self.stride != 1 or x.shape[-1] != self.features:
            shortcut = _conv1x1(self.features, self.stride, "shortcut")(out)
        else:
            shortcut = x
        out = _conv3x3(self.features, self.stride, self.conv_impl, "conv1")(out)
        out = nn.relu(batch_norm(self, out, "bn2", train, example_mask))
        out = _conv3x3(self.features, 1, self.conv_impl, "conv2")(out)
        return out + shortcut


class BasicBlock(_Block):
    """Post-activation basic block (He et al. 2015):

    out = relu(bn2(conv3x3(relu(bn1(conv3x3_s(x))))) + shortcut(x)),
    shortcut = shortcut_bn(conv1x1_s(x)) if the shape changes else x.
    """

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False,
                 example_mask: jax.Array | None = None) -> jax.Array:
        out = _conv3x3(self.features, self.stride, self.conv_impl, "conv1")(x)
        out = nn.relu(batch_norm(self, out, "bn1", train, example_mask))
        out = batch_norm(self, _conv3x3(self.features, 1, self.conv_impl, "conv2")(out), "bn2", train,
                         example_mask)
        if self.stride != 1 or x.shape[-1] != self.features:
            shortcut = batch_norm(self, _conv1x1(self.features, self.stride, "shortcut")(x), "shortcut_bn",
                                  train, example_mask)
        else:
            shortcut = x
        return nn.relu(out + shortcut)


class _CifarResNet(nn.Module):
    """Stem "conv1" (+ "bn1" unless pre-activation), blocks "layer{s}_{b}", linear "linear".

    Sows "layer1".."layer4" (each stage's output) and "features" (the pooled (N, C) vector);
    reads "neuron_masks" nested per block like "batch_stats" (``masks.py``).
    """

    num_classes: int = 10
    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    widths: Sequence[int] = (64, 128, 256, 512)
    conv_impl: str = "canonical"

    preact = False  # class attribute, not a dataclass field

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False,
                 example_mask: jax.Array | None = None) -> jax.Array:
        check_neuron_masks(self)
        example_mask = check_example_mask(x, example_mask)
        x = Conv3x3(64, self.conv_impl, use_bias=False, name="conv1")(x)
        if not self.preact:
            x = nn.relu(batch_norm(self, x, "bn1", train, example_mask))
        block = PreActBlock if self.preact else BasicBlock
        for s, (n, width) in enumerate(zip(self.stage_sizes, self.widths)):
            for b in range(n):
                stride = 2 if (s > 0 and b == 0) else 1
                x = block(width, stride, self.conv_impl, name=f"layer{s + 1}_{b}")(x, train, example_mask)
            self.sow(INTERMEDIATES, f"layer{s + 1}", x)
        x = jnp.mean(x, axis=(1, 2))          # global average pool (4x4 for 32x32 inputs)
        self.sow(INTERMEDIATES, "features", x)
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
