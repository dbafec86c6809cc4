"""BatchNorm that matches PyTorch's `nn.BatchNorm2d` exactly, including its running statistics.

Flax's `nn.BatchNorm` folds the *biased* batch variance into `batch_stats.var`; PyTorch folds
the *unbiased* one (n / (n - 1)). Converted checkpoints and side-by-side training only agree
with the PyTorch reference if we do the same, so this module reimplements the layer.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn


class BatchNorm(nn.Module):
    """Batch normalisation over all axes but the last (NHWC or (B, C)).

    Attributes:
      use_running_average: eval mode (normalise with `batch_stats`) if True.
      momentum: Flax convention, `ra = momentum * ra + (1 - momentum) * batch`
        (PyTorch momentum 0.1 is 0.9 here).
      epsilon: added to the variance.
      axis_name: if set, batch statistics are averaged over this mapped axis
        (cross-device BatchNorm under pmap / shard_map).
      dtype: output dtype; statistics are always computed in float32.
    """

    use_running_average: bool
    momentum: float = 0.9
    epsilon: float = 1e-5
    axis_name: str | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
        ra_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)

        xf = x.astype(jnp.float32)
        if self.use_running_average:
            mean, var = ra_mean.value, ra_var.value
        else:
            axes = tuple(range(x.ndim - 1))
            count = 1
            for d in x.shape[:-1]:
                count *= d
            mean = jnp.mean(xf, axes)
            if self.axis_name is not None:
                mean = jax.lax.pmean(mean, self.axis_name)
            var = jnp.mean(jnp.square(xf - mean), axes)
            if self.axis_name is not None:
                var = jax.lax.pmean(var, self.axis_name)
                count = count * jax.lax.psum(1, self.axis_name)
            if not self.is_initializing():
                unbiased = var * (count / jnp.maximum(count - 1, 1))
                m = self.momentum
                ra_mean.value = m * ra_mean.value + (1.0 - m) * mean
                ra_var.value = m * ra_var.value + (1.0 - m) * unbiased

        y = (xf - mean) * (jax.lax.rsqrt(var + self.epsilon) * scale) + bias
        return y.astype(self.dtype)
