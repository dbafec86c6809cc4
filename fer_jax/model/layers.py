"""Layers of the network that Flax does not provide in the form we need.

`Conv` takes explicit symmetric padding (PyTorch's `padding=p`; Flax's 'SAME' pads
asymmetrically at stride 2) and a selectable implementation (`fer_jax.model.conv`), `AngleLinear` is
SphereFace's bias-free cosine classifier.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from fer_jax.model import conv, losses

# PyTorch-style He init (fan_out, normal), as torchvision's ResNets.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class Conv(nn.Module):
    """Bias-free 2-D convolution, NHWC in/out, HWIO `kernel`, padding `((p, p), (p, p))`."""

    features: int
    kernel_size: int = 3
    strides: int = 1
    padding: int = 1
    impl: str = "xla"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel_size
        kernel = self.param("kernel", conv_init, (k, k, x.shape[-1], self.features), jnp.float32)
        x = x.astype(self.dtype)
        return conv.conv2d(
            x, kernel.astype(self.dtype), stride=self.strides, padding=self.padding, impl=self.impl
        )


def unit_columns_init(
    key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32
) -> jax.Array:
    """Uniform in [-1, 1], then every column scaled to unit L2 norm.

    As the reference's `uniform_(-1, 1).renorm_(2, 1, 1e-5).mul_(1e5)`. The scale matters even
    though the layer normalises the kernel on every call: the gradient of the raw kernel scales
    with `1 / |w|`, so the angular step per SGD update scales with `lr / |w|^2`. Un-normalised
    uniform columns (`|w|` ~ sqrt(D / 3) = 13 at D = 512) would turn the classifier's learning
    rate down ~170x.
    """
    return losses.normalize_columns(jax.random.uniform(key, shape, dtype, -1.0, 1.0))


class AngleLinear(nn.Module):
    """A-Softmax classifier: `(B, D)` -> `(B, K)` logits `|x| cos(theta_j)`, no bias.

    The kernel `(D, K)` is initialised with unit columns (`unit_columns_init`, as the reference)
    and column-normalised on every call. The training loss (`losses.a_softmax_loss`) takes this
    kernel directly.
    """

    num_classes: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param(
            "kernel", unit_columns_init, (x.shape[-1], self.num_classes), jnp.float32
        )
        return losses.angular_logits(x, kernel)
