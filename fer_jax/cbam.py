"""CBAM: Convolutional Block Attention Module (Woo et al., ECCV 2018), as its official code.

Channel gate: one shared MLP (C -> C/16 -> C, biases, ReLU) on the global average- and
max-pooled features, summed, sigmoid. Spatial gate: per-pixel [max, mean] over channels ->
7x7 conv (2 -> 1, padding 3, no bias) -> BatchNorm (PyTorch momentum 0.01) -> sigmoid.
Both maps are sown into the `intermediates` collection for visualisation.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from fer_jax.batch_norm import BatchNorm
from fer_jax.layers import Conv

ORDERS = ("channel_first", "spatial_first", "parallel")


def max_along(x: jax.Array, axis: int) -> jax.Array:
    """`max(x, axis)` whose gradient goes to one arg-max element, as PyTorch's.

    `jnp.max`'s gradient finds the maximisers by comparing `x == max(x)`; under jit XLA:CPU can
    recompute `x` in a fusion with different rounding, the comparison then misses, and the
    gradient silently vanishes. A gather at the arg-max (`take_along_axis`) avoids that but its
    scatter gradient came out wrong under multi-device `pmap`. Summing `x` times a constant
    one-hot arg-max mask has neither problem: the value is exact and the gradient is `g * mask`.
    """
    mask = jax.nn.one_hot(jnp.argmax(x, axis=axis), x.shape[axis], dtype=x.dtype, axis=axis)
    return jnp.sum(x * jax.lax.stop_gradient(mask), axis=axis)


class ChannelGate(nn.Module):
    """`(B, H, W, C)` -> channel attention `(B, 1, 1, C)` in (0, 1)."""

    reduction: int = 16
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        hidden = nn.Dense(max(1, c // self.reduction), dtype=self.dtype, name="mlp_1")
        out = nn.Dense(c, dtype=self.dtype, name="mlp_3")
        flat = x.reshape(x.shape[0], -1, c)
        pooled = jnp.stack([jnp.mean(flat, axis=1), max_along(flat, axis=1)])  # (2, B, C)
        att = jnp.sum(out(nn.relu(hidden(pooled))), axis=0)
        return jax.nn.sigmoid(att)[:, None, None, :]


class SpatialGate(nn.Module):
    """`(B, H, W, C)` -> spatial attention `(B, H, W, 1)` in (0, 1)."""

    train: bool
    bn_axis_name: str | None = None
    conv_impl: str = "xla"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        pooled = jnp.concatenate(
            [max_along(x, -1)[..., None], jnp.mean(x, axis=-1, keepdims=True)], axis=-1
        )
        y = Conv(1, kernel_size=7, padding=3, impl=self.conv_impl, dtype=self.dtype, name="conv")(
            pooled
        )
        y = BatchNorm(
            use_running_average=not self.train,
            momentum=0.99,
            axis_name=self.bn_axis_name,
            dtype=self.dtype,
            name="bn",
        )(y)
        return jax.nn.sigmoid(y)


class CBAM(nn.Module):
    """Refines `(B, H, W, C)` features with channel and spatial attention.

    `order`: 'channel_first' (the paper's and CBAM's), 'spatial_first', or 'parallel'
    (`F * Mc(F) * Ms(F)`, both maps from the same input F).
    """

    order: str = "channel_first"
    train: bool = False
    bn_axis_name: str | None = None
    conv_impl: str = "xla"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.order not in ORDERS:
            raise ValueError(f"CBAM order must be one of {ORDERS} or None, got {self.order!r}")
        channel = ChannelGate(dtype=self.dtype, name="ChannelGate")
        spatial = SpatialGate(
            train=self.train,
            bn_axis_name=self.bn_axis_name,
            conv_impl=self.conv_impl,
            dtype=self.dtype,
            name="SpatialGate",
        )
        if self.order == "channel_first":
            mc = channel(x)
            x = x * mc
            ms = spatial(x)
            x = x * ms
        elif self.order == "spatial_first":
            ms = spatial(x)
            x = x * ms
            mc = channel(x)
            x = x * mc
        else:
            mc, ms = channel(x), spatial(x)
            x = x * mc * ms
        self.sow("intermediates", "channel_attention", mc)
        self.sow("intermediates", "spatial_attention", ms)
        return x.astype(self.dtype)
