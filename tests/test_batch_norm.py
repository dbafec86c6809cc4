"""BatchNorm: the CPU path (matmul sums, hand-written backward) agrees with XLA's reductions and
autodiff, and with a float64 reference, values, gradients and statistics, on one device and
across devices."""

from __future__ import annotations

import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fer_jax.model import batch_norm
from fer_jax.model.batch_norm import BatchNorm


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


def _float64_reference(x, scale, bias, g, eps=1e-5):
    """y, and the gradients (x, scale, bias) of sum(y * g), in float64 numpy."""
    x, scale, bias, g = (np.asarray(a, np.float64) for a in (x, scale, bias, g))
    axes = tuple(range(x.ndim - 1))
    n = x.size // x.shape[-1]
    mean = x.mean(axes)
    rstd = 1 / np.sqrt(((x - mean) ** 2).mean(axes) + eps)
    xhat = (x - mean) * rstd
    dscale, dbias = (g * xhat).sum(axes), g.sum(axes)
    dx = scale * rstd * (g - dbias / n - xhat * dscale / n)
    return xhat * scale + bias, dx, dscale, dbias


def test_hand_written_backward_matches_float64_over_a_long_reduction():
    # 30,976 rows per channel, as layer 2's maps at batch 64: the gradient must stay at float32
    # rounding (XLA:CPU's own reductions at 123,904 rows were 0.2 off in dx).
    x = jax.random.normal(jax.random.key(2), (64, 22, 22, 8)) * 2 + 3
    g = jax.random.normal(jax.random.key(3), x.shape)
    scale, bias = jnp.linspace(0.5, 1.5, 8), jnp.linspace(-1, 1, 8)

    def y_dot_g(x, scale, bias):
        y, _, _ = batch_norm.normalize_batch(x, scale, bias, 1e-5, None)
        return jnp.sum(y * g), y

    (_, y), grads = jax.jit(jax.value_and_grad(y_dot_g, (0, 1, 2), has_aux=True))(x, scale, bias)
    y_ref, *grads_ref = _float64_reference(x, scale, bias, g)
    np.testing.assert_allclose(y, y_ref, rtol=0, atol=2e-5)
    for got, want in zip(grads, grads_ref, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-5 * np.abs(want).max())


def test_bfloat16_input_gives_bfloat16_output_and_gradient():
    x = jax.random.normal(jax.random.key(4), (8, 5, 5, 4)).astype(jnp.bfloat16)
    bn = BatchNorm(use_running_average=False, dtype=jnp.bfloat16, reduce_impl="matmul")
    variables = bn.init(jax.random.key(0), x)
    y, _ = bn.apply(variables, x, mutable=["batch_stats"])
    dx = jax.grad(lambda x: jnp.sum(bn.apply(variables, x, mutable=["batch_stats"])[0]))(x)
    assert y.dtype == dx.dtype == jnp.bfloat16


CROSS_DEVICE_SCRIPT = textwrap.dedent(
    """
    import json
    from functools import partial
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import PartitionSpec as P
    from fer_jax.model.batch_norm import BatchNorm

    x = jax.random.normal(jax.random.key(1), (8, 6, 6, 5)) * 2 + 1
    w = jax.random.normal(jax.random.key(2), x.shape)

    def run(impl, axis_name, psum_grads, x, w):
        bn = BatchNorm(use_running_average=False, axis_name=axis_name, reduce_impl=impl)
        variables = bn.init(jax.random.key(0), x[:1])  # shapes only: no collectives in init
        params = {"scale": jnp.linspace(0.5, 1.5, 5), "bias": jnp.linspace(-1, 1, 5)}

        def loss(params, x):
            y, upd = bn.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                              mutable=["batch_stats"])
            return jnp.sum(jnp.sin(y) * w), (y, upd["batch_stats"])

        (_, (y, stats)), (dp, dx) = jax.value_and_grad(loss, (0, 1), has_aux=True)(params, x)
        if psum_grads:  # per-device parameter gradients (pmap, unchecked shard_map): sum them
            dp = jax.lax.psum(dp, axis_name)
        return y, stats, dp, dx

    out = {"one": run("xla", None, False, x, w)}
    for impl in ("xla", "matmul"):
        xs, ws = x.reshape(2, 4, *x.shape[1:]), w.reshape(2, 4, *w.shape[1:])
        y, stats, dp, dx = jax.pmap(partial(run, impl, "d", True), axis_name="d")(xs, ws)
        out["pmap_" + impl] = (y.reshape(x.shape), jax.tree.map(lambda a: a[0], stats),
                               jax.tree.map(lambda a: a[0], dp), dx.reshape(x.shape))
        mesh = jax.make_mesh((2,), ("d",))
        for check in (False, True):
            # With check_vma, autodiff already sums the replicated parameters' gradients.
            f = partial(run, impl, "d", not check)
            g = jax.shard_map(f, mesh=mesh, in_specs=(P("d"), P("d")),
                              out_specs=(P("d"), P(), P(), P("d")), check_vma=check)
            sharded = jax.device_put((x, w), jax.NamedSharding(mesh, P("d")))
            out[f"shard_map_{impl}_check_vma_{check}"] = jax.jit(g)(*sharded)
    print(json.dumps(jax.tree.map(lambda a: np.asarray(a).tolist(), out)))
    """
)


def test_cross_device_statistics_and_gradients_equal_one_device_under_pmap_and_shard_map():
    from tests.test_parallel import run_on_cpu_devices

    out = run_on_cpu_devices(CROSS_DEVICE_SCRIPT, 2)
    want = jax.tree.leaves(out.pop("one"))
    for name, got in out.items():
        for a, b in zip(jax.tree.leaves(got), want, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=name)
