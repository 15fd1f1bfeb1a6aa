"""DeepInspect's conditional trigger generator: G(z, one-hot c) -> an additive trigger pattern.

Chen et al. (IJCAI 2019, "DeepInspect", §3) learn the distribution of triggers of each candidate
target class with a conditional generator: noise z and the one-hot class c go in, an image-shaped
perturbation δ comes out, and x + δ should be classified as c. The paper gives no architecture;
TrojanZoo's reading (``trojanvision/defenses/backdoor/model_inspection/deep_inspect.py``) uses
one-hot -> dense -> ReLU, concatenated with z, dense to a feature map, two transposed 5×5
convolutions with BatchNorm, sigmoid. This generator keeps that shape at a smaller size (no
BatchNorm, so it is a pure function of its parameters, and a feature map of a quarter of the
image's side upsampled twice, instead of a full-size dense layer with 64·H·W outputs):

    e = ReLU(W_e onehot(c))                               (width,)
    h = ReLU(W_h [z, e])  reshaped to (⌈H/4⌉, ⌈W/4⌉, width)
    h = ReLU(ConvT_{5×5, stride 2}(h));  o = ConvT_{5×5, stride 2}(h)  cropped to (H, W, C)
    δ = bound · tanh(o + P_c)                              |δ| ≤ bound elementwise

P_c (H, W, C) is a learned map per class (ibau-jax's addition): the class enters the output
directly, so each class's trigger is learned from the first step instead of only after the
shared layers have learned to separate the classes (with few steps, as on a CPU, the deep path
alone gave every class the same trigger). The last layer and P start at zero, so every class's
trigger starts at δ = 0 (the search grows a trigger rather than shrinking a random one).
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp


class TriggerGenerator(nn.Module):
    """G(z (N, noise_dim), c (N,) int) -> δ (N, H, W, C) with |δ| ≤ ``bound``.

    ``image_shape``: (H, W, C) of the images; ``num_classes``: the one-hot size; ``width``: the
    channels of the hidden feature maps.
    """

    image_shape: tuple[int, int, int]
    num_classes: int
    width: int = 32
    bound: float = 1.0

    @nn.compact
    def __call__(self, z: jax.Array, c: jax.Array) -> jax.Array:
        h_img, w_img, ch = self.image_shape
        h4, w4 = math.ceil(h_img / 4), math.ceil(w_img / 4)
        e = nn.relu(nn.Dense(self.width, name="embed")(jax.nn.one_hot(c, self.num_classes)))
        h = nn.relu(nn.Dense(h4 * w4 * self.width, name="project")(jnp.concatenate([z, e], -1)))
        h = h.reshape(z.shape[0], h4, w4, self.width)
        h = nn.relu(nn.ConvTranspose(self.width, (5, 5), strides=(2, 2), name="up1")(h))
        o = nn.ConvTranspose(ch, (5, 5), strides=(2, 2), kernel_init=nn.initializers.zeros, name="up2")(h)
        per_class = self.param("class_pattern", nn.initializers.zeros, (self.num_classes, h_img, w_img, ch))
        return self.bound * jnp.tanh(o[:, :h_img, :w_img, :] + per_class[c])
