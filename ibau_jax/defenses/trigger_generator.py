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
import numpy as np

from ..models.conv import conv3x3

# ConvTranspose(5x5, stride 2, 'SAME') as a stride-1 3x3 convolution per output phase, then
# depth-to-space. Output pixel 2i+a (lax.conv_transpose's SAME padding: 3 before, 2 after the
# dilated input) = sum over taps t of x[i-1+t] w[_TAPS[a][t]]; index 5 is a zero tap:
#   y[2i]   = x[i-1] w[1] + x[i] w[3]
#   y[2i+1] = x[i-1] w[0] + x[i] w[2] + x[i+1] w[4]
_TAPS = np.array([[1, 3, 5], [0, 2, 4]])


class ConvTranspose2x(nn.Module):
    """``nn.ConvTranspose(features, (5, 5), strides=(2, 2))`` (padding 'SAME', same parameters
    ``kernel`` (5, 5, in, features) and ``bias``, same initialisation), computed as one canonical
    3x3 convolution (``models.conv.conv3x3``, whose gradients stay canonical): inside the
    generator's ``lax.scan`` XLA's CPU backend runs the transposed convolution's gradients in a
    naive loop (the reason for ``models.conv``), and a DeepInspect generator step took 5.2 s
    there against 1.6 s outside a scan (benchmarks/generator_step.py).

    x (N, h, w, in) -> (N, 2h, 2w, features); equal to ``nn.ConvTranspose`` up to float rounding
    (tests/test_defenses_deepinspect.py).
    """

    features: int
    kernel_init: nn.initializers.Initializer = nn.linear.default_kernel_init

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        n, h, w, cin = x.shape
        kernel = self.param("kernel", self.kernel_init, (5, 5, cin, self.features))
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
        padded = jnp.concatenate([kernel, jnp.zeros((1, 5, cin, self.features), kernel.dtype)], 0)
        padded = jnp.concatenate([padded, jnp.zeros((6, 1, cin, self.features), kernel.dtype)], 1)
        # phase kernels: (3, 3, in, 2, 2, features) -> (3, 3, in, 4 * features), phase-major
        k = padded[_TAPS.T[:, None, :, None], _TAPS.T[None, :, None, :]]     # (3, 3, 2, 2, in, out)
        k = jnp.transpose(k, (0, 1, 4, 2, 3, 5)).reshape(3, 3, cin, 4 * self.features)
        y = conv3x3(x, k)
        y = y.reshape(n, h, w, 2, 2, self.features).transpose(0, 1, 3, 2, 4, 5)
        return y.reshape(n, 2 * h, 2 * w, self.features) + bias


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
        h = nn.relu(ConvTranspose2x(self.width, name="up1")(h))
        o = ConvTranspose2x(ch, kernel_init=nn.initializers.zeros, name="up2")(h)
        per_class = self.param("class_pattern", nn.initializers.zeros, (self.num_classes, h_img, w_img, ch))
        return self.bound * jnp.tanh(o[:, :h_img, :w_img, :] + per_class[c])
