"""BatchNorm: the matmul reductions (CPU) agree with XLA's, values, gradients and statistics."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fer_jax import batch_norm
from fer_jax.batch_norm import BatchNorm


def _run(impl: str, x: jax.Array, axis_name=None):
    bn = BatchNorm(use_running_average=False, reduce_impl=impl)
    variables = bn.init(jax.random.key(0), x)
    params = {
        "scale": jnp.linspace(0.5, 1.5, x.shape[-1]),
        "bias": jnp.linspace(-1, 1, x.shape[-1]),
    }

    def loss(params, x):
        y, updates = bn.apply(
            {"params": params, "batch_stats": variables["batch_stats"]}, x, mutable=["batch_stats"]
        )
        return jnp.sum(jnp.sin(y) * jnp.arange(y.size).reshape(y.shape) / y.size), (y, updates)

    (_, (y, updates)), grads = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(params, x)
    return y, updates["batch_stats"], grads


def test_matmul_reductions_match_xla_reductions_with_gradients():
    x = jax.random.normal(jax.random.key(1), (4, 11, 11, 24)) * 3 + 1
    y_x, stats_x, grads_x = _run("xla", x)
    y_m, stats_m, grads_m = _run("matmul", x)
    np.testing.assert_allclose(y_m, y_x, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(stats_m), jax.tree.leaves(stats_x), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(grads_m), jax.tree.leaves(grads_x), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    # The matmul path leaves no XLA reduction in the training forward and backward passes.
    assert _count_reductions("matmul", x) == 0
    assert _count_reductions("xla", x) > 0


def _count_reductions(impl: str, x: jax.Array) -> int:
    bn = BatchNorm(use_running_average=False, reduce_impl=impl)
    variables = bn.init(jax.random.key(0), x)

    def fwd_bwd(variables, x):
        apply = lambda v, x: bn.apply(v, x, mutable=["batch_stats"])  # noqa: E731
        (y, stats), vjp = jax.vjp(apply, variables, x, has_aux=False)
        return stats, vjp((jnp.ones_like(y), jax.tree.map(jnp.zeros_like, stats)))

    return jax.jit(fwd_bwd).lower(variables, x).as_text().count("stablehlo.reduce")


def test_auto_picks_matmul_on_cpu_only_and_unknown_impls_are_named():
    assert batch_norm.select_reduce_impl("auto", "cpu") == "matmul"
    assert batch_norm.select_reduce_impl("auto", "gpu") == "xla"
    assert batch_norm.select_reduce_impl("xla", "cpu") == "xla"
    with pytest.raises(ValueError, match="reduce_impl.*'fast'"):
        batch_norm.select_reduce_impl("fast")
