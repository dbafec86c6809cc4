"""experiments/onednn_conv (oneDNN convolutions through the XLA FFI) against XLA's convolution.

Forward, input gradient and kernel gradient at every CBAM-ResNet18 convolution shape (batch 2),
float32 (tight), bfloat16, and float32 with bfloat16 compute (bf16 primitives writing f32
results; to bfloat16 rounding), both layouts. Skipped unless
``experiments/onednn_conv/build.sh`` has built the library.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from experiments import onednn_conv

pytestmark = pytest.mark.skipif(
    not onednn_conv.available() or jax.default_backend() != "cpu",
    reason="experiments/onednn_conv/libonednn_conv.so not built (run experiments/onednn_conv/"
    "build.sh; needs the onednn + onednn-devel wheels) or not on CPU",
)

# (H=W, Cin, Cout, k, stride, padding): the network's convolutions (experiments/conv_microbench).
SHAPES = [
    (44, 1, 64, 3, 1, 1),
    (44, 64, 64, 3, 1, 1),
    (44, 2, 1, 7, 1, 3),
    (44, 64, 128, 3, 2, 1),
    (44, 64, 128, 1, 2, 0),
    (22, 128, 128, 3, 1, 1),
    (22, 128, 256, 3, 2, 1),
    (22, 128, 256, 1, 2, 0),
    (11, 256, 256, 3, 1, 1),
    (11, 256, 512, 3, 2, 1),
    (11, 256, 512, 1, 2, 0),
    (6, 512, 512, 3, 1, 1),
    (6, 2, 1, 7, 1, 3),
]


def _reference(x: jax.Array, k: jax.Array, stride: int, padding: int) -> jax.Array:
    """XLA's convolution in float32 at full precision."""
    return lax.conv_general_dilated(
        x.astype(jnp.float32),
        k.astype(jnp.float32),
        (stride, stride),
        ((padding, padding), (padding, padding)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=lax.Precision.HIGHEST,
    )


def _values_and_grads(fn, x, k, dy):
    y, vjp = jax.vjp(fn, x, k)
    return (y, *vjp(dy))


def _rel_err(a: jax.Array, b: jax.Array) -> float:
    """max |a - b| / max |b| (float32)."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


@pytest.mark.parametrize("layout", ["nhwc", "any"])
@pytest.mark.parametrize(
    "dtype,compute,tol",
    [("float32", None, 2e-5), ("bfloat16", None, 2e-2), ("float32", "bfloat16", 2e-2)],
)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "{}x{}x{}->{} k{} s{} p{}".format(s[0], *s))
def test_matches_xla(shape, dtype, compute, tol, layout):
    h, cin, cout, ksz, stride, padding = shape
    rng = np.random.default_rng(sum(shape))
    ho = (h + 2 * padding - ksz) // stride + 1
    dt = jnp.dtype(dtype)
    # float32 with compute bfloat16: values exact in bf16, so that the reference sees the same.
    rounded = jnp.dtype(compute or dtype)
    x = jnp.asarray(rng.standard_normal((2, h, h, cin)), rounded).astype(dt)
    k = jnp.asarray(rng.standard_normal((ksz, ksz, cin, cout)) / np.sqrt(ksz * ksz * cin), rounded)
    k = k.astype(dt)
    dy = jnp.asarray(rng.standard_normal((2, ho, ho, cout)), rounded).astype(dt)

    got = jax.jit(
        lambda x, k, dy: _values_and_grads(
            lambda x, k: onednn_conv.conv2d_onednn(x, k, stride, padding, layout, compute), x, k, dy
        )
    )(x, k, dy)
    # Reference from the same (bf16-rounded) operands, in float32.
    want = _values_and_grads(
        lambda x, k: _reference(x, k, stride, padding),
        x.astype(jnp.float32),
        k.astype(jnp.float32),
        dy.astype(jnp.float32),
    )
    for name, g, w, like in zip(("y", "dx", "dk"), got, want, (dy, x, k), strict=True):
        assert g.shape == w.shape and g.dtype == like.dtype, (name, g.shape, g.dtype)
        assert _rel_err(g, w) < tol, (name, _rel_err(g, w))


def test_bad_shapes_raise():
    x = jnp.zeros((1, 8, 8, 4), jnp.float32)
    with pytest.raises(ValueError):
        onednn_conv.conv2d_onednn(x, jnp.zeros((3, 3, 5, 8), jnp.float32))


def test_info_lists_cached_primitives():
    x = jnp.ones((1, 8, 8, 4), jnp.float32)
    onednn_conv.conv2d_onednn(x, jnp.ones((3, 3, 4, 8), jnp.float32)).block_until_ready()
    assert "fwd n1 8x8x4->8 3x3 s1 p1 in=f32 out=f32 layout=nhwc" in onednn_conv.info()
