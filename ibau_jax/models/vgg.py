"""The I-BAU authors' small VGG (flax linen).

Inputs are NHWC float32 images in [0, 1] (no normalization), as in the original I-BAU code
(which is NCHW in PyTorch; ``checkpoints`` converts the weights).
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from .features import INTERMEDIATES
from .layers import Conv3x3, batch_norm, elu, max_pool_2x2
from .masks import check_example_mask, check_neuron_masks


class SmallVGG(nn.Module):
    """The I-BAU authors' "small VGG16".

    [conv3x3(32), BN, ELU] x2, maxpool2, dropout 0.3,
    [conv3x3(64), BN, ELU] x2, maxpool2, dropout 0.4,
    [conv3x3(128), BN, ELU] x2, maxpool2, dropout 0.4,
    flatten in NCHW order (so PyTorch's classifier weight maps unchanged), linear -> classes.
    The convs are "conv0".."conv5", the BNs "bn0".."bn5", the linear "classifier".

    Shapes: x (N, 32, 32, 3) -> logits (N, num_classes). ``example_mask`` (N,) of 0/1: the
    rows BN statistics are taken over in train mode (1 = a real example, 0 = padding).
    Sows "block1".."block3" and "features" (``features.py``); reads "neuron_masks" (``masks.py``).
    """

    num_classes: int = 10
    widths: Sequence[int] = (32, 64, 128)
    dropout: Sequence[float] = (0.3, 0.4, 0.4)
    conv_impl: str = "canonical"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False,
                 example_mask: jax.Array | None = None) -> jax.Array:
        check_neuron_masks(self)
        example_mask = check_example_mask(x, example_mask)
        i = 0
        for block, (width, rate) in enumerate(zip(self.widths, self.dropout), start=1):
            for _ in range(2):
                x = Conv3x3(width, self.conv_impl, name=f"conv{i}")(x)
                x = elu(batch_norm(self, x, f"bn{i}", train, example_mask))
                i += 1
            x = max_pool_2x2(x)
            self.sow(INTERMEDIATES, f"block{block}", x)
            x = nn.Dropout(rate, deterministic=not train)(x)
        x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)
        self.sow(INTERMEDIATES, "features", x)
        return nn.Dense(self.num_classes, name="classifier")(x)
