"""2-D convolution (NHWC / HWIO) with a CPU-friendly weight gradient.

On CPU (jax 0.10, 2-core x86), a CBAM-ResNet18 train step was dominated by convolution weight
gradients at large maps (44x44x64 -> 64, 3x3): XLA:CPU hands f32 convolutions to YNNPACK, whose
weight-gradient convolution (a "convolution" whose kernel is the whole 44x44 map) costs 3-4x
the forward. Two remedies, usable together:

- ``conv2d(impl="matmul_grad")``: XLA forward and input gradient, weight gradient through a
  ``jax.custom_vjp`` as im2col matmuls ``patches^T (kh*kw*Cin, N) @ dy (N, Cout)``, N = B*Ho*Wo,
  chunked over a few images at a time. ``impl="auto"`` (:func:`select_impl`) uses it where it
  measured faster (CPU, large maps and 1x1 kernels) and plain XLA elsewhere and on GPU/TPU.
- ``jax.jit(step, compiler_options=cpu_compiler_options())``: XLA:CPU convolutions by Eigen
  instead of YNNPACK (all shapes, forward and both gradients); the Trainer's steps and the
  recognizer compile with it.

All impls agree to float32 rounding. Padding is symmetric and explicit, ``((p, p), (p, p))``,
matching PyTorch ``F.conv2d(stride=s, padding=p)`` (also at stride 2 on even sizes, where XLA's
``"SAME"`` would pad asymmetrically). Measurements: ``experiments/conv_microbench.py``.
"""

from __future__ import annotations

import functools
import logging
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from fer_jax import mesh_axes

IMPLS = ("xla", "matmul_grad", "auto")
"""Accepted values of ``conv2d(impl=...)``.

- ``"xla"``: ``lax.conv_general_dilated``; its autodiff rules give both gradients.
- ``"matmul_grad"``: XLA forward and input gradient; weight gradient by im2col matmuls
  (:func:`weight_grad_matmul`) through a ``jax.custom_vjp``.
- ``"auto"``: :func:`select_impl` at trace time.
"""

_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")

# "auto" uses the custom weight gradient on CPU for 3x3 (and larger) kernels only when the output
# map has at least this many pixels (Ho*Wo); see select_impl.
AUTO_MIN_OUTPUT_PIXELS = 22 * 22


CPU_COMPILER_OPTIONS = {
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"
}


def cpu_compiler_options(backend: str | None = None) -> dict[str, str]:
    """``jax.jit(..., compiler_options=...)`` that route XLA:CPU convolutions to Eigen.

    jax 0.10's XLA:CPU runs f32 convolutions through YNNPACK by default, whose weight-gradient
    convolution at 44x44 is 3-4x slower than Eigen's (and its forward ~10-40% slower on a 2-core
    x86). This keeps YNNPACK for dots only; same as ``XLA_FLAGS=
    --xla_cpu_experimental_ynn_fusion_type=individual_dot``. The training and evaluation steps
    (``fer_jax.parallel``) and the recognizer compile with it. Empty (no-op) off CPU, and where
    this XLA does not know the (experimental) option: it is probed once with a tiny compile.
    """
    backend = jax.default_backend() if backend is None else backend
    if backend != "cpu" or not _cpu_options_supported():
        return {}
    return dict(CPU_COMPILER_OPTIONS)


@functools.cache
def _cpu_options_supported() -> bool:
    try:
        x = jax.device_put(jnp.zeros(()), jax.local_devices(backend="cpu")[0])
        jax.jit(lambda x: x + 1, compiler_options=CPU_COMPILER_OPTIONS).lower(x).compile()
    except Exception as e:  # noqa: BLE001 - any rejection means: compile without it
        logging.getLogger(__name__).warning(
            "XLA:CPU does not accept %s (%s); convolutions stay with its default library",
            CPU_COMPILER_OPTIONS,
            e,
        )
        return False
    return True


def output_size(size: int, k: int, stride: int, padding: int) -> int:
    """Output length of a convolution along one spatial axis (PyTorch/XLA floor convention)."""
    return (size + 2 * padding - k) // stride + 1


def _conv_xla(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
    """Plain XLA convolution: x (B, H, W, Cin), kernel (kh, kw, Cin, Cout) -> (B, Ho, Wo, Cout)."""
    return lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(stride, stride),
        padding=((padding, padding), (padding, padding)),
        dimension_numbers=_DIMENSION_NUMBERS,
    )


def im2col(x: jax.Array, kh: int, kw: int, stride: int, padding: int) -> jax.Array:
    """Patches of x (B, H, W, C) -> (B, Ho, Wo, kh*kw*C), ordered (i, j, c) like HWIO kernels.

    Built from kh*kw strided slices of the zero-padded input (no convolution involved), so
    ``im2col(x).reshape(-1, kh*kw*C) @ kernel.reshape(kh*kw*C, Cout)`` is the convolution.
    """
    b, h, w, c = x.shape
    ho, wo = output_size(h, kh, stride, padding), output_size(w, kw, stride, padding)
    xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    cols = [
        xp[:, i : i + stride * (ho - 1) + 1 : stride, j : j + stride * (wo - 1) + 1 : stride, :]
        for i in range(kh)
        for j in range(kw)
    ]
    return cols[0] if len(cols) == 1 else jnp.concatenate(cols, axis=-1)


def im2col_t(x: jax.Array, kh: int, kw: int, stride: int, padding: int) -> jax.Array:
    """Transposed patches of x (B, H, W, C) -> (kh*kw*C, B*Ho*Wo), rows ordered (i, j, c).

    Channel-major, so that ``im2col_t(x) @ dy.reshape(-1, Cout)`` is a plain (row-major) matmul;
    equal to ``im2col(x).reshape(-1, kh*kw*C).T``.
    """
    b, h, w, c = x.shape
    ho, wo = output_size(h, kh, stride, padding), output_size(w, kw, stride, padding)
    xt = jnp.pad(jnp.transpose(x, (3, 0, 1, 2)), ((0, 0), (0, 0), (padding,) * 2, (padding,) * 2))
    cols = [
        xt[:, :, i : i + stride * (ho - 1) + 1 : stride, j : j + stride * (wo - 1) + 1 : stride]
        for i in range(kh)
        for j in range(kw)
    ]
    return jnp.stack(cols, axis=0).reshape(kh * kw * c, b * ho * wo)


def _acc_dtype(dtype: jnp.dtype) -> jnp.dtype:
    """Accumulation dtype of the matmuls: float32 for bf16/f16, else the input dtype."""
    return jnp.promote_types(dtype, jnp.float32)


# Rows (output pixels) per weight-gradient matmul chunk: at least this many, and at least 2
# images. Measured (2-core x86, B=64): 2 images per chunk is best at 44x44..11x11 (patches of
# 2-9 MB stay in cache; whole-batch patches, 285 MB at 44x44, cost 2x in page faults and memory
# traffic), 4 at 6x6.
_MIN_CHUNK_ROWS = 128


def _batch_chunk(batch: int, pixels: int) -> int:
    """Images per weight-gradient chunk: the smallest divisor of batch >= max(2, 128/pixels)."""
    want = max(2, -(-_MIN_CHUNK_ROWS // pixels))
    return next((d for d in range(want, batch + 1) if batch % d == 0), batch)


def weight_grad_matmul(
    x: jax.Array, dy: jax.Array, kernel_shape: tuple[int, ...], stride: int, padding: int
) -> jax.Array:
    """dL/dkernel (kh, kw, Cin, Cout) of :func:`conv2d` as im2col matmuls, accumulated in f32+.

    x (B, H, W, Cin), dy (B, Ho, Wo, Cout). Sums ``im2col_t(x_c) @ dy_c`` over chunks of a few
    images (``lax.scan``), so the patches stay small.
    """
    kh, kw, cin, cout = kernel_shape
    b = x.shape[0]
    ho, wo = dy.shape[1:3]
    acc_dtype = _acc_dtype(dy.dtype)

    def chunk_dw(xc: jax.Array, dyc: jax.Array) -> jax.Array:
        patches = im2col_t(xc, kh, kw, stride, padding)
        return lax.dot_general(
            patches,
            dyc.reshape(-1, cout),
            (((1,), (0,)), ((), ())),
            preferred_element_type=acc_dtype,
        )

    c = _batch_chunk(b, ho * wo)
    if c == b:
        dw = chunk_dw(x, dy)
    else:
        xs = x.reshape(b // c, c, *x.shape[1:])
        dys = dy.reshape(b // c, c, *dy.shape[1:])
        dw, _ = lax.scan(
            lambda acc, xd: (acc + chunk_dw(*xd), None),
            jnp.zeros((kh * kw * cin, cout), acc_dtype),
            (xs, dys),
        )
    return dw.reshape(kernel_shape)


def _input_grad(
    dy: jax.Array, kernel: jax.Array, x: jax.Array, stride: int, padding: int
) -> jax.Array:
    """dL/dx by XLA's transposed convolution (the transpose of :func:`_conv_xla`; x's values
    are unused, it gives the shape, dtype and, inside shard_map, the varying mesh axes)."""
    (dx,) = jax.linear_transpose(lambda x_: _conv_xla(x_, kernel, stride, padding), x)(dy)
    return dx


# --- "matmul_grad": XLA forward and input gradient, im2col-matmul weight gradient ---------------


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_matmul_grad(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
    return _conv_xla(x, kernel, stride, padding)


def _conv_matmul_grad_fwd(x, kernel, stride, padding):
    return _conv_xla(x, kernel, stride, padding), (x, kernel)


def _conv_matmul_grad_bwd(stride, padding, res, dy):
    x, kernel = res
    dx = _input_grad(dy, kernel, x, stride, padding)
    dw = weight_grad_matmul(x, dy, kernel.shape, stride, padding)
    return dx, dw.astype(kernel.dtype)


_conv_matmul_grad.defvjp(_conv_matmul_grad_fwd, _conv_matmul_grad_bwd)


# --- public API ---------------------------------------------------------------------------------


def select_impl(
    x_shape: tuple[int, ...],
    kernel_shape: tuple[int, ...],
    stride: int = 1,
    padding: int = 1,
    backend: str | None = None,
) -> str:
    """The impl ``"auto"`` resolves to for this shape on ``backend`` (default: jax's default).

    ``"matmul_grad"`` on CPU for 1x1 kernels (the weight gradient is one plain matmul; 2-3x
    faster than XLA's at the shortcut shapes) and for output maps of >= AUTO_MIN_OUTPUT_PIXELS
    pixels (44x44, 22x22: 2-3x faster than XLA:CPU's default YNNPACK weight gradient, on par
    with its Eigen one), when Cout >= 16 (a thinner matmul, e.g. CBAM's 7x7 2->1, is slower
    than XLA's). ``"xla"`` otherwise and on every other backend (GPU/TPU convolutions are fast).
    """
    backend = jax.default_backend() if backend is None else backend
    kh, kw, _, cout = kernel_shape
    if backend != "cpu" or cout < 16:
        return "xla"
    ho = output_size(x_shape[-3], kh, stride, padding)
    wo = output_size(x_shape[-2], kw, stride, padding)
    big_map = ho * wo >= AUTO_MIN_OUTPUT_PIXELS
    return "matmul_grad" if kh == kw == 1 or big_map else "xla"


def conv2d(
    x: jax.Array,
    kernel: jax.Array,
    *,
    stride: int = 1,
    padding: int = 1,
    impl: str = "xla",
) -> jax.Array:
    """2-D cross-correlation, no bias, like PyTorch ``F.conv2d(x, w, stride=s, padding=p)``.

    Args:
      x: (B, H, W, Cin) activations; the computation runs in ``x.dtype``.
      kernel: (kh, kw, Cin, Cout) HWIO weights; cast to ``x.dtype`` (its gradient is returned in
        the kernel's own dtype). Matmul paths accumulate bf16/f16 in float32.
      stride: spatial stride (both axes).
      padding: zeros added on each side of H and W, ``((p, p), (p, p))``.
      impl: one of :data:`IMPLS`; all give the same values and gradients (to rounding).

    Returns:
      (B, Ho, Wo, Cout) with Ho = (H + 2p - kh) // stride + 1 (likewise Wo).
    """
    if x.ndim != 4 or kernel.ndim != 4:
        raise ValueError(f"want x (B,H,W,C) and HWIO kernel, got {x.shape} and {kernel.shape}")
    if x.shape[-1] != kernel.shape[2]:
        raise ValueError(f"x has {x.shape[-1]} channels, kernel expects {kernel.shape[2]}")
    if stride < 1 or padding < 0:
        raise ValueError(f"need stride >= 1 and padding >= 0, got {stride=} {padding=}")
    kh, kw = kernel.shape[:2]
    if (
        output_size(x.shape[1], kh, stride, padding) < 1
        or output_size(x.shape[2], kw, stride, padding) < 1
    ):
        raise ValueError(f"kernel {kernel.shape[:2]} larger than padded input {x.shape[1:3]}")
    kernel = kernel.astype(x.dtype)
    if impl == "auto":
        impl = select_impl(x.shape, kernel.shape, stride, padding)
    if impl == "xla":
        return _conv_xla(x, kernel, stride, padding)
    if impl == "matmul_grad":
        return _conv_matmul_grad(*mesh_axes.match_varying_axes(x, kernel), stride, padding)
    raise ValueError(f"unknown impl {impl!r}; expected one of {IMPLS}")
