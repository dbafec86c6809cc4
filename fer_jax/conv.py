"""2-D convolution (NHWC / HWIO) with a CPU-friendly weight gradient.

XLA:CPU lowers the weight gradient of a convolution with a large spatial extent (e.g. 44x44x64 ->
64, 3x3, stride 1) to a "convolution" whose kernel is the whole 44x44 feature map; on CPU that
costs ~10x the forward pass. :func:`conv2d` with ``impl="matmul_grad"`` keeps XLA's forward and
input gradient but computes the weight gradient through a ``jax.custom_vjp`` as one im2col
matmul ``patches(B*Ho*Wo, kh*kw*Cin)^T @ dy(B*Ho*Wo, Cout)``; ``impl="auto"`` uses it only where
it is faster (CPU, large maps) and the plain XLA convolution everywhere else (GPU/TPU).

All impls agree to float32 rounding. Padding is symmetric and explicit, ``((p, p), (p, p))``,
matching PyTorch ``F.conv2d(stride=s, padding=p)`` (also at stride 2 on even sizes, where XLA's
``"SAME"`` would pad asymmetrically). Benchmarks: ``experiments/conv_microbench.py``.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

IMPLS = ("xla", "matmul_grad", "im2col", "auto")
"""Accepted values of ``conv2d(impl=...)``.

- ``"xla"``: ``lax.conv_general_dilated``; its autodiff rules give both gradients.
- ``"matmul_grad"``: XLA forward and input gradient, weight gradient as one im2col matmul.
- ``"im2col"``: forward as im2col matmul too; the patches are kept for the weight gradient
  (kh*kw x the input's memory); input gradient by XLA's transposed convolution.
- ``"auto"``: :func:`select_impl` at trace time.
"""

_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")

# "auto" uses the custom weight gradient on CPU only for outputs with at least this many pixels
# (Ho*Wo). Measured (experiments/conv_microbench.py, 2-core x86): 44x44 and 22x22 maps gain
# 2-10x on fwd+bwd; at 11x11 and 6x6 XLA's own weight gradient is as fast or faster.
AUTO_MIN_OUTPUT_PIXELS = 22 * 22


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
    zero = jnp.zeros((), x.dtype)
    pad_cfg = ((0, 0, 0), (padding, padding, 0), (padding, padding, 0), (0, 0, 0))
    xp = lax.pad(x, zero, pad_cfg) if padding else x
    if kh == kw == 1 and stride == 1:
        return xp
    cols = [
        lax.slice(
            xp,
            (0, i, j, 0),
            (b, i + stride * (ho - 1) + 1, j + stride * (wo - 1) + 1, c),
            (1, stride, stride, 1),
        )
        for i in range(kh)
        for j in range(kw)
    ]
    return cols[0] if len(cols) == 1 else jnp.concatenate(cols, axis=-1)


def _acc_dtype(dtype: jnp.dtype) -> jnp.dtype:
    """Accumulation dtype of the matmuls: float32 for bf16/f16, else the input dtype."""
    return jnp.promote_types(dtype, jnp.float32)


def _patches_t_matmul(patches: jax.Array, dy: jax.Array, kernel_shape: tuple[int, ...]) -> jax.Array:
    """Weight gradient patches(N, K)^T @ dy(N, Cout) -> HWIO kernel_shape, accumulated in f32+."""
    kh, kw, cin, cout = kernel_shape
    p2 = patches.reshape(-1, kh * kw * cin)
    g2 = dy.reshape(-1, cout)
    dw = lax.dot_general(
        p2, g2, (((0,), (0,)), ((), ())), preferred_element_type=_acc_dtype(dy.dtype)
    )
    return dw.reshape(kernel_shape)


def _input_grad(dy: jax.Array, kernel: jax.Array, x_aval, stride: int, padding: int) -> jax.Array:
    """dL/dx by XLA's transposed convolution (the transpose of :func:`_conv_xla`)."""
    (dx,) = jax.linear_transpose(lambda x_: _conv_xla(x_, kernel, stride, padding), x_aval)(dy)
    return dx


# --- "matmul_grad": XLA forward and input gradient, im2col-matmul weight gradient ---------------


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_matmul_grad(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
    return _conv_xla(x, kernel, stride, padding)


def _conv_matmul_grad_fwd(x, kernel, stride, padding):
    return _conv_xla(x, kernel, stride, padding), (x, kernel)


def _conv_matmul_grad_bwd(stride, padding, res, dy):
    x, kernel = res
    kh, kw = kernel.shape[:2]
    dx = _input_grad(dy, kernel, jax.ShapeDtypeStruct(x.shape, x.dtype), stride, padding)
    dw = _patches_t_matmul(im2col(x, kh, kw, stride, padding), dy, kernel.shape)
    return dx, dw.astype(kernel.dtype)


_conv_matmul_grad.defvjp(_conv_matmul_grad_fwd, _conv_matmul_grad_bwd)


# --- "im2col": forward as a matmul as well, patches kept as the residual -------------------------


def _conv_im2col_fwd_value(x, kernel, stride, padding):
    kh, kw, cin, cout = kernel.shape
    patches = im2col(x, kh, kw, stride, padding)
    y = lax.dot_general(
        patches,
        kernel.reshape(kh * kw * cin, cout),
        (((3,), (0,)), ((), ())),
        preferred_element_type=_acc_dtype(x.dtype),
    )
    return y.astype(x.dtype), patches


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_im2col(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
    return _conv_im2col_fwd_value(x, kernel, stride, padding)[0]


def _conv_im2col_fwd(x, kernel, stride, padding):
    y, patches = _conv_im2col_fwd_value(x, kernel, stride, padding)
    return y, (patches, kernel, jax.ShapeDtypeStruct(x.shape, x.dtype))


def _conv_im2col_bwd(stride, padding, res, dy):
    patches, kernel, x_aval = res
    dx = _input_grad(dy, kernel, x_aval, stride, padding)
    dw = _patches_t_matmul(patches, dy, kernel.shape)
    return dx, dw.astype(kernel.dtype)


_conv_im2col.defvjp(_conv_im2col_fwd, _conv_im2col_bwd)


# --- public API ---------------------------------------------------------------------------------


def select_impl(
    x_shape: tuple[int, ...],
    kernel_shape: tuple[int, ...],
    stride: int = 1,
    padding: int = 1,
    backend: str | None = None,
) -> str:
    """The impl ``"auto"`` resolves to for this shape on ``backend`` (default: jax's default).

    ``"matmul_grad"`` on CPU when the output map has >= AUTO_MIN_OUTPUT_PIXELS pixels (there
    XLA:CPU's weight-gradient convolution is several times slower than a matmul); ``"xla"``
    otherwise and on every other backend (GPU/TPU convolutions are already fast).
    """
    backend = jax.default_backend() if backend is None else backend
    if backend != "cpu":
        return "xla"
    kh, kw = kernel_shape[:2]
    ho = output_size(x_shape[-3], kh, stride, padding)
    wo = output_size(x_shape[-2], kw, stride, padding)
    return "matmul_grad" if ho * wo >= AUTO_MIN_OUTPUT_PIXELS else "xla"


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
    if output_size(x.shape[1], kh, stride, padding) < 1 or output_size(
        x.shape[2], kw, stride, padding
    ) < 1:
        raise ValueError(f"kernel {kernel.shape[:2]} larger than padded input {x.shape[1:3]}")
    kernel = kernel.astype(x.dtype)
    if impl == "auto":
        impl = select_impl(x.shape, kernel.shape, stride, padding)
    if impl == "xla":
        return _conv_xla(x, kernel, stride, padding)
    if impl == "matmul_grad":
        return _conv_matmul_grad(x, kernel, stride, padding)
    if impl == "im2col":
        return _conv_im2col(x, kernel, stride, padding)
    raise ValueError(f"unknown impl {impl!r}; expected one of {IMPLS}")
