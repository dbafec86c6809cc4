"""BatchNorm that matches PyTorch's `nn.BatchNorm2d` exactly, including its running statistics.

Flax's `nn.BatchNorm` folds the *biased* batch variance into `batch_stats.var`; PyTorch folds
the *unbiased* one (n / (n - 1)). Converted checkpoints and side-by-side training only agree
with the PyTorch reference if we do the same, so this module reimplements the layer.

Speed on CPU (`reduce_impl="matmul"`, what "auto" picks there): XLA:CPU runs large reductions
(here over B*H*W = 123,904 rows) slowly and, at that length, inaccurately, and autodiff of the
normalisation leaves ~8 elementwise passes over the activations in the backward. So training
mode is one `custom_vjp` (`normalize_batch`): per-channel sums as matrix-vector products with
ones (`sum_leading`), two passes forward (mean, then the centred variance, as PyTorch) and the
closed-form backward, `dx = scale * rstd * (g - mean(g) - xhat * mean(g * xhat))`, two sums
and one pass (measured: docs/cpu_performance.md). Elsewhere ("xla") XLA's own reductions and
autodiff are fast and fuse with their neighbours.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from fer_jax.model import mesh_axes

REDUCE_IMPLS = ("xla", "matmul", "auto")


def select_reduce_impl(impl: str, backend: str | None = None) -> str:
    """'auto' -> 'matmul' on CPU, 'xla' elsewhere; other values are checked and returned."""
    if impl not in REDUCE_IMPLS:
        raise ValueError(f"BatchNorm reduce_impl must be one of {REDUCE_IMPLS}, got {impl!r}")
    if impl != "auto":
        return impl
    return "matmul" if (backend or jax.default_backend()) == "cpu" else "xla"


def sum_leading(x: jax.Array) -> jax.Array:
    """`(d0, ..., dk, C)` -> `(C,)` sums over all leading axes, as matrix-vector products.

    One axis at a time (`ones (d_i,) @ x.reshape(d_i, -1)`, row-major reshapes are free): the
    first product reads the whole tensor, the others are tiny, and each adds only d_i terms per
    output, so the float32 rounding grows with sum(d_i) (B + H + W), not with B * H * W as one
    long dot would.
    """
    out = x
    for d in x.shape[:-1]:
        out = jnp.ones((d,), x.dtype) @ out.reshape(d, -1)
    return out


def _axis_sum(v: jax.Array, axis_name: str | None) -> jax.Array:
    return v if axis_name is None else jax.lax.psum(v, axis_name)


def _rows(x: jax.Array, axis_name: str | None) -> jax.Array | int:
    """Rows per channel over all devices of `axis_name` (B*H*W on one device)."""
    rows = x.size // x.shape[-1]
    return rows if axis_name is None else rows * jax.lax.psum(1, axis_name)


@partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def normalize_batch(
    x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float, axis_name: str | None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Training-mode batch normalisation of `x` `(..., C)` over all axes but the last.

    Returns `(y, mean, var)`: `y` in `x.dtype`, the float32 `(C,)` batch mean and biased
    variance (over all devices of `axis_name`, for the running statistics). Statistics and the
    backward are computed in float32. Differentiable in `x`, `scale` and `bias` through `y`
    only: the gradient ignores cotangents of `mean` and `var` (callers stop their gradient).
    """
    return _normalize_batch_fwd(x, scale, bias, epsilon, axis_name)[0]


def _normalize_batch_fwd(x, scale, bias, epsilon, axis_name):
    xf = x.astype(jnp.float32)
    n = _rows(x, axis_name)
    mean = _axis_sum(sum_leading(xf), axis_name) / n
    var = _axis_sum(sum_leading(jnp.square(xf - mean)), axis_name) / n
    rstd = jax.lax.rsqrt(var + epsilon)
    y = (xf - mean) * (rstd * scale) + bias
    return (y.astype(x.dtype), mean, var), (x, mean, rstd, scale)


def _normalize_batch_bwd(epsilon, axis_name, residuals, cotangents):
    del epsilon
    x, mean, rstd, scale = residuals
    g = cotangents[0].astype(jnp.float32)
    xhat = (x.astype(jnp.float32) - mean) * rstd
    g_sum, gx_sum = sum_leading(g), sum_leading(g * xhat)  # this device's: d bias, d scale
    n = _rows(x, axis_name)
    g_mean, gx_mean = _axis_sum(g_sum, axis_name) / n, _axis_sum(gx_sum, axis_name) / n
    dx = (scale * rstd) * (g - g_mean - xhat * gx_mean)
    return dx.astype(x.dtype), gx_sum, g_sum


normalize_batch.defvjp(_normalize_batch_fwd, _normalize_batch_bwd)


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
      reduce_impl: training mode by 'xla' (jnp reductions and autodiff), 'matmul'
        (`normalize_batch`: matmul sums, hand-written backward) or 'auto' (matmul on CPU);
        equal to float32 rounding. Eval mode is the same affine map either way.
    """

    use_running_average: bool
    momentum: float = 0.9
    epsilon: float = 1e-5
    axis_name: str | None = None
    dtype: Any = jnp.float32
    reduce_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
        ra_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)

        if not self.use_running_average and select_reduce_impl(self.reduce_impl) == "matmul":
            x, s, b = mesh_axes.match_varying_axes(x, scale, bias)
            y, mean, var = normalize_batch(x, s, b, self.epsilon, self.axis_name)
            mean, var = jax.lax.stop_gradient(mean), jax.lax.stop_gradient(var)
            self._update_running_stats(ra_mean, ra_var, mean, var, _rows(x, self.axis_name))
            return y.astype(self.dtype)

        xf = x.astype(jnp.float32)
        if self.use_running_average:
            mean, var = ra_mean.value, ra_var.value
        else:
            axes = tuple(range(x.ndim - 1))
            mean = jnp.mean(xf, axes)
            if self.axis_name is not None:
                mean = jax.lax.pmean(mean, self.axis_name)
            var = jnp.mean(jnp.square(xf - mean), axes)
            if self.axis_name is not None:
                var = jax.lax.pmean(var, self.axis_name)
            self._update_running_stats(ra_mean, ra_var, mean, var, _rows(x, self.axis_name))
        y = (xf - mean) * (jax.lax.rsqrt(var + self.epsilon) * scale) + bias
        return y.astype(self.dtype)

    def _update_running_stats(self, ra_mean, ra_var, mean, var, count) -> None:
        """PyTorch's update: the running variance takes the unbiased batch variance."""
        if self.is_initializing():
            return
        unbiased = var * (count / jnp.maximum(count - 1, 1))
        m = self.momentum
        ra_mean.value = m * ra_mean.value + (1.0 - m) * mean
        ra_var.value = m * ra_var.value + (1.0 - m) * unbiased
