"""2-D convolution (NHWC / HWIO) with CPU-friendly forms: Winograd, matmul weight gradients.

On CPU (jax 0.10, 2-core x86) a CBAM-ResNet18 train step was dominated by XLA's convolution
weight gradients at large maps (3-4x the forward). `conv2d(impl=...)` offers faster forms, each
described under :data:`IMPLS`; ``impl="auto"`` (:func:`select_impl`) picks one per shape where
it measured faster, plain XLA elsewhere and on GPU/TPU; ``"auto:bf16"`` picks oneDNN's
convolutions (:mod:`fer_jax.model.onednn_conv`) where that library is built.
:func:`cpu_compiler_options` routes XLA:CPU's own convolutions to Eigen instead of YNNPACK
(docs/cpu_performance.md).

All impls agree to float32 rounding. Padding is symmetric and explicit, ``((p, p), (p, p))``,
matching PyTorch ``F.conv2d(stride=s, padding=p)`` (also at stride 2 on even sizes, where XLA's
``"SAME"`` would pad asymmetrically). Measurements: ``experiments/conv_microbench.py``.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from fer_jax.model import mesh_axes, onednn_conv

IMPLS = ("xla", "matmul_grad", "phase_dx", "shifted_sums", "winograd", "im2col", "onednn", "auto")
"""Accepted values of ``conv2d(impl=...)``.

- ``"xla"``: ``lax.conv_general_dilated``; its autodiff rules give both gradients.
- ``"matmul_grad"``: XLA forward; weight gradient by matmuls of shifted copies of x and dy
  (:func:`weight_grad_matmul`), input gradient as ``"phase_dx"``, through a ``jax.custom_vjp``.
- ``"phase_dx"``: XLA forward and weight gradient; the input gradient of a strided convolution
  by :func:`input_grad_phases` (stride**2 plain convolutions), XLA's at stride 1.
- ``"shifted_sums"``: stride 1, square kernels, a few channels: forward as scalar multiply-adds
  of shifted planes (:func:`conv_shifted_sums`), XLA's gradients.
- ``"winograd"``: stride 1, 3x3, padding 1: forward and input gradient by Winograd's
  F(2x2, 3x3) (:func:`conv_winograd`: 16 matmuls where a direct convolution does 36 multiply-adds
  per 2x2 output tile), weight gradient as ``"matmul_grad"``.
- ``"im2col"``: forward and input gradient as chunked patch matmuls (:func:`conv_im2col`; at
  stride > 1 the input gradient per phase as in ``"phase_dx"``), weight gradient as
  ``"matmul_grad"``. Slower than XLA's convolution in float32; ``"auto:bf16"`` takes it for
  the stride-1 convolutions on small maps (11x11, 6x6).
- ``"onednn"``: forward and both gradients by oneDNN's convolution primitives through the XLA
  FFI (:func:`fer_jax.model.onednn_conv.conv2d_onednn`); CPU only, float32 or bfloat16 x, and
  only once built (``python -m fer_jax.model.onednn_conv``; an error otherwise).
- ``"auto"``: :func:`select_impl` at trace time.

``"winograd"``, ``"matmul_grad"``, ``"im2col"``, ``"onednn"`` and ``"auto"`` also take the suffix
:data:`BF16_SUFFIX` (``"auto:bf16"``): the operands of their matmuls (Winograd's 16 per tile,
im2col's, the weight gradient's; oneDNN's convolutions) are rounded to bfloat16 and accumulated
in float32 (``preferred_element_type``); ``"auto:bf16"`` also picks those forms on more shapes
(:func:`select_impl` with ``bf16=True``: oneDNN's where built, else the 256- and 512-channel
layers too); everything else, transforms included, stays in the input's dtype. That pays only
where the CPU multiplies bfloat16 natively (AMX: 2-5x at 256-512 channels);
``fer_jax.model.resnet``'s ``matmul_dtype='auto'`` picks it there alone.
"""

BF16_SUFFIX = ":bf16"
BF16_IMPLS = ("winograd", "matmul_grad", "im2col", "onednn", "auto")  # take BF16_SUFFIX

_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")

# "auto" uses the custom weight gradient on CPU for 3x3 (and larger) kernels only when the output
# map has at least this many pixels (Ho*Wo); see select_impl.
AUTO_MIN_OUTPUT_PIXELS = 22 * 22
# ... and "winograd" for stride-1 3x3 convolutions on maps of at least this many pixels.
WINOGRAD_MIN_OUTPUT_PIXELS = 22 * 22
# ... and "shifted_sums" for stride-1 convolutions with at most this many (Cin, Cout) pairs on
# maps of at least this many pixels (CBAM's 7x7 2 -> 1 at 44, 22 and 11, not at 6).
SHIFTED_MAX_CHANNEL_PAIRS = 4
SHIFTED_MIN_OUTPUT_PIXELS = 100
# ... and with bfloat16 matmul operands ("auto:bf16"), "im2col" for strided kernels into maps of
# at most this many pixels (layer 4's 11x11x256 -> 6x6x512; into 11x11 it did not pay).
IM2COL_BF16_MAX_STRIDED_OUTPUT_PIXELS = 6 * 6


CPU_COMPILER_OPTIONS = {
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"
}


def cpu_compiler_options(backend: str | None = None) -> dict[str, str]:
    """``jax.jit(..., compiler_options=...)`` that route XLA:CPU convolutions to Eigen.

    jax 0.10's XLA:CPU runs f32 convolutions through YNNPACK by default, whose weight-gradient
    convolution at 44x44 is 3-4x slower than Eigen's (and its forward ~10-40% slower on a 2-core
    x86). This keeps YNNPACK for dots only; same as ``XLA_FLAGS=
    --xla_cpu_experimental_ynn_fusion_type=individual_dot``. The training and evaluation steps
    (``fer_jax.training.parallel``) and the recognizer compile with it. Empty (no-op) off CPU, and
    where this XLA does not know the (experimental) option: it is probed once with a tiny compile.
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


def tap_row_patches(
    x: jax.Array, kh: int, kw: int, stride: int, padding: int, ho: int, wo: int
) -> list[tuple[range, jax.Array]]:
    """Column-shifted copies of x, one per phase of the kernel rows, for :func:`weight_grad_matmul`.

    x (B, H, W, C). For each phase r in range(stride) that some kernel row i = r (mod stride)
    reaches: (taps, P_r) with taps = range(r, kh, stride) and P_r (kw*C, B*Q*Wo), channel-major,
    Q = Ho + len(taps) - 1, P_r[(j, c), (b, q, w)] = x_padded[b, stride*q + r, stride*w + j, c].
    Tap row i = r + stride*t meets dy's row h at P_r's row q = h + t: a row shift, which the
    weight gradient puts on dy instead of copying x once per tap row (3 copies of x, not 9).
    """
    b, _, _, c = x.shape
    xt = jnp.pad(jnp.transpose(x, (3, 0, 1, 2)), ((0, 0), (0, 0), (padding,) * 2, (padding,) * 2))
    out = []
    for r in range(min(stride, kh)):
        taps = range(r, kh, stride)
        q = ho + len(taps) - 1
        rows = xt[:, :, r : r + stride * (q - 1) + 1 : stride]
        cols = [rows[..., j : j + stride * (wo - 1) + 1 : stride] for j in range(kw)]
        out.append((taps, jnp.concatenate(cols, axis=0).reshape(kw * c, b * q * wo)))
    return out


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
    x: jax.Array,
    dy: jax.Array,
    kernel_shape: tuple[int, ...],
    stride: int,
    padding: int,
    bf16: bool = False,
) -> jax.Array:
    """dL/dkernel (kh, kw, Cin, Cout) of :func:`conv2d` as matmuls, accumulated in f32+.

    x (B, H, W, Cin), dy (B, Ho, Wo, Cout). Per phase of the kernel rows (one at stride 1):
    ``P_r (kw*Cin, N) @ D_r (N, m*Cout)``, with P_r x's column-shifted copies
    (:func:`tap_row_patches`) and D_r dy's m row-shifted copies, one per tap row of the phase;
    the product holds every (tap, Cin, Cout) of those rows. Versus im2col (kh*kw copies of x,
    ``(kh*kw*Cin, N) @ (N, Cout)``), this copies kw*Cin + kh*Cout values per pixel instead of
    kh*kw*Cin, and the matmul is squarer: the 44x44x64 weight gradient 42.4 -> 37.9 ms, 22x22x128
    31.2 -> 27.4 ms (2-core AMD EPYC, Zen 5; ``experiments/conv_microbench.py``). The price:
    m - 1 extra rows of dy zeros per image (Q = Ho + m - 1). Summed over chunks of a few images
    (``lax.scan``), so the copies stay in cache. `bf16`: x and dy rounded to bfloat16 first
    (half the copy traffic), products accumulated in float32.
    """
    with jax.named_scope("weight_grad_matmul"):  # profiles tell it apart
        kh, kw, cin, cout = kernel_shape
        b = x.shape[0]
        ho, wo = dy.shape[1:3]
        acc_dtype = _acc_dtype(dy.dtype)
        if bf16:
            x, dy = x.astype(jnp.bfloat16), dy.astype(jnp.bfloat16)

        def chunk_dw(xc: jax.Array, dyc: jax.Array) -> jax.Array:
            dw = jnp.zeros((kh, kw, cin, cout), acc_dtype)
            for taps, patches in tap_row_patches(xc, kh, kw, stride, padding, ho, wo):
                m = len(taps)
                shifted = jnp.concatenate(
                    [jnp.pad(dyc, ((0, 0), (t, m - 1 - t), (0, 0), (0, 0))) for t in range(m)],
                    axis=-1,
                )  # (c, Ho + m - 1, Wo, m*Cout): rows q hold dy[q - t] for tap row t
                prod = lax.dot_general(
                    patches,
                    shifted.reshape(-1, m * cout),
                    (((1,), (0,)), ((), ())),
                    preferred_element_type=acc_dtype,
                )  # (kw*Cin, m*Cout)
                dw = dw.at[taps.start :: stride].set(
                    prod.reshape(kw, cin, m, cout).transpose(2, 0, 1, 3)
                )
            return dw

        c = _batch_chunk(b, ho * wo)
        if c == b:
            dw = chunk_dw(x, dy)
        else:
            xs = x.reshape(b // c, c, *x.shape[1:])
            dys = dy.reshape(b // c, c, *dy.shape[1:])
            dw, _ = lax.scan(
                lambda acc, xd: (acc + chunk_dw(*xd), None),
                jnp.zeros(kernel_shape, acc_dtype),
                (xs, dys),
            )
        return dw


def _input_grad(
    dy: jax.Array, kernel: jax.Array, x: jax.Array, stride: int, padding: int
) -> jax.Array:
    """dL/dx of :func:`_conv_xla`: XLA's transposed convolution at stride 1, and at stride > 1
    :func:`input_grad_phases` (x's values are unused: it gives the shape, dtype and, inside
    shard_map, the varying mesh axes)."""
    if stride > 1:
        return input_grad_phases(dy, kernel, x.shape, stride, padding).astype(x.dtype)
    (dx,) = jax.linear_transpose(lambda x_: _conv_xla(x_, kernel, stride, padding), x)(dy)
    return dx


def _weight_grad_xla(
    x: jax.Array, dy: jax.Array, kernel: jax.Array, stride: int, padding: int
) -> jax.Array:
    """dL/dkernel by XLA's convolution (the transpose of :func:`_conv_xla` in the kernel; the
    kernel's values are unused)."""
    (dw,) = jax.linear_transpose(lambda k: _conv_xla(x, k, stride, padding), kernel)(dy)
    return dw


def _saving_inputs(primal: jax.custom_vjp) -> Callable[..., Any]:
    """The forward rule of a ``custom_vjp`` convolution: its output, (x, kernel) as residuals."""
    return lambda x, kernel, *static: (primal.fun(x, kernel, *static), (x, kernel))


def input_grad_phases(
    dy: jax.Array,
    kernel: jax.Array,
    x_shape: tuple[int, ...],
    stride: int,
    padding: int,
    bf16: bool | None = None,
) -> jax.Array:
    """dL/dx (B, H, W, Cin) of a strided convolution as stride**2 stride-1 convolutions.

    XLA's transposed convolution of a strided one convolves the stride-dilated dy (zeros
    between its pixels): on CPU, at stride 2, that is 4x the arithmetic, and the input gradient
    of the 44x44x64 -> 22x22x128 convolution cost ~5x its forward. Instead: input pixel i
    (per axis) only meets the kernel taps t with t = i + p (mod s), so each residue class ("phase")
    of x's pixels is a plain correlation of dy with the taps of its class, flipped; the phases
    are then interleaved. dy (B, Ho, Wo, Cout), kernel (kh, kw, Cin, Cout). `bf16` not None:
    each phase by :func:`conv_im2col` (bfloat16 matmul operands if True) instead of XLA's
    convolution.
    """
    _, h, w, cin = x_shape
    kh, kw = kernel.shape[:2]
    s, p = stride, padding
    hq, wq = -(-h // s), -(-w // s)  # pixels per phase (x padded up to a multiple of s)

    def taps(a: int, k: int) -> tuple[int, int]:
        """For x's pixels i = a (mod s): their first kernel tap and dy's pad before them."""
        r = (a + p) % s  # the taps t = r, r + s, ...
        m = len(range(r, k, s))
        q_lo = (a + p - r) // s  # dy index of tap r for pixel i = a
        return r, m - 1 - q_lo

    rows = []
    for a in range(s):
        cols = []
        for b in range(s):
            (rh, pad_h), (rw, pad_w) = taps(a, kh), taps(b, kw)
            k = kernel[rh::s, rw::s]  # (mh, mw, Cin, Cout)
            if k.shape[0] == 0 or k.shape[1] == 0:  # no tap reaches this phase
                cols.append(jnp.zeros((dy.shape[0], hq, wq, cin), dy.dtype))
                continue
            k = jnp.flip(k, (0, 1)).transpose(0, 1, 3, 2)  # correlation kernel dy -> dx
            pads = [
                (pad, n_out - n_in - pad + len_k - 1)
                for pad, n_out, n_in, len_k in (
                    (pad_h, hq, dy.shape[1], k.shape[0]),
                    (pad_w, wq, dy.shape[2], k.shape[1]),
                )
            ]
            if bf16 is None:
                cols.append(
                    lax.conv_general_dilated(
                        dy, k, (1, 1), pads, dimension_numbers=_DIMENSION_NUMBERS
                    )
                )
            else:
                cols.append(conv_im2col(dy, k, 1, pads, bf16))
        rows.append(jnp.stack(cols, axis=3))  # (B, hq, wq, s, Cin)
    dx = jnp.stack(rows, axis=2)  # (B, hq, s, wq, s, Cin): pixel (hq * s + a, wq * s + b)
    return dx.reshape(dy.shape[0], hq * s, wq * s, cin)[:, :h, :w]


# --- "im2col": convolutions as chunked patch matmuls (bfloat16 on small maps) ----------------

# Output pixels (images x Ho x Wo) per im2col matmul: at least this many. Measured (2-core AMD
# EPYC, Zen 5, bf16 operands, B=64): 6x6x512 -> 512 forward 35 / 37 / 37 / 49 ms at 2 / 4 / 8 /
# 16 images per chunk; 11x11x256 -> 6x6x512 s2 19 / 11 / 11 / 18 ms.
_IM2COL_MIN_CHUNK_ROWS = 256


def conv_im2col(
    x: jax.Array,
    kernel: jax.Array,
    stride: int,
    pads: tuple[tuple[int, int], tuple[int, int]],
    bf16: bool = False,
) -> jax.Array:
    """:func:`_conv_xla` with padding `pads` ((top, bottom), (left, right); negative crops) as
    im2col matmuls, a few images at a time.

    x (B, H, W, Cin), kernel (kh, kw, Cin, Cout) -> (B, Ho, Wo, Cout) in x's dtype. Per chunk of
    images (``lax.map``; patches of ~1-2 MB stay in cache): the kh*kw shifted (strided) windows
    of x side by side, ``(c*Ho*Wo, kh*kw*Cin) @ (kh*kw*Cin, Cout)``. `bf16`: patches and kernel
    rounded to bfloat16, products accumulated in float32. In float32 XLA's convolution is
    faster; with bfloat16 operands this runs at 2x float32's multiply rate on AVX512-BF16:
    6x6x512 -> 512 forward ~2x XLA's float32 (2-core AMD EPYC, Zen 5;
    ``experiments/conv_microbench.py``).
    """
    with jax.named_scope("im2col"):  # profiles tell it apart
        b, h, w, cin = x.shape
        kh, kw, _, cout = kernel.shape
        (pt, pb), (pl, pr) = pads
        ho = (h + pt + pb - kh) // stride + 1
        wo = (w + pl + pr - kw) // stride + 1
        dtype = x.dtype
        op_dtype = jnp.bfloat16 if bf16 else dtype
        acc_dtype = _acc_dtype(op_dtype)
        zero = jnp.zeros((), op_dtype)
        xp = lax.pad(x.astype(op_dtype), zero, ((0, 0, 0), (pt, pb, 0), (pl, pr, 0), (0, 0, 0)))
        k2 = kernel.astype(op_dtype).reshape(kh * kw * cin, cout)

        def chunk(xc: jax.Array) -> jax.Array:
            rows, cols = stride * (ho - 1) + 1, stride * (wo - 1) + 1
            windows = [
                xc[:, i : i + rows : stride, j : j + cols : stride]
                for i in range(kh)
                for j in range(kw)
            ]
            patches = jnp.concatenate(windows, axis=-1).reshape(-1, kh * kw * cin)
            y = lax.dot_general(
                patches, k2, (((1,), (0,)), ((), ())), preferred_element_type=acc_dtype
            )
            return y.reshape(xc.shape[0], ho, wo, cout).astype(dtype)

        want = -(-_IM2COL_MIN_CHUNK_ROWS // (ho * wo))
        c = next((d for d in range(want, b + 1) if b % d == 0), b)
        if c == b:
            return chunk(xp)
        y = lax.map(chunk, xp.reshape(b // c, c, *xp.shape[1:]))
        return y.reshape(b, ho, wo, cout)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv_im2col(
    x: jax.Array, kernel: jax.Array, stride: int, padding: int, bf16: bool
) -> jax.Array:
    return conv_im2col(x, kernel, stride, ((padding, padding),) * 2, bf16)


def _conv_im2col_bwd(stride, padding, bf16, res, dy):
    x, kernel = res
    kh, kw = kernel.shape[:2]
    if stride == 1:  # dy correlated with the flipped kernel, Cin <-> Cout
        flipped = jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)
        pads = ((kh - 1 - padding,) * 2, (kw - 1 - padding,) * 2)
        dx = conv_im2col(dy, flipped, 1, pads, bf16)
    else:
        dx = input_grad_phases(dy, kernel, x.shape, stride, padding, bf16)
    dw = weight_grad_matmul(x, dy, kernel.shape, stride, padding, bf16)
    return dx.astype(x.dtype), dw.astype(kernel.dtype)


_conv_im2col.defvjp(_saving_inputs(_conv_im2col), _conv_im2col_bwd)


# --- custom gradients: "matmul_grad" and "phase_dx" --------------------------------------------


@partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _conv_custom_grad(
    x: jax.Array, kernel: jax.Array, stride: int, padding: int, dw_by_matmul: bool, bf16: bool
) -> jax.Array:
    return _conv_xla(x, kernel, stride, padding)


def _conv_custom_grad_bwd(stride, padding, dw_by_matmul, bf16, res, dy):
    x, kernel = res
    dx = _input_grad(dy, kernel, x, stride, padding)
    if dw_by_matmul:
        dw = weight_grad_matmul(x, dy, kernel.shape, stride, padding, bf16)
    else:
        dw = _weight_grad_xla(x, dy, kernel, stride, padding)
    return dx, dw.astype(kernel.dtype)


_conv_custom_grad.defvjp(_saving_inputs(_conv_custom_grad), _conv_custom_grad_bwd)


# --- "shifted_sums": convolutions between a few channels -------------------------------------


def conv_shifted_sums(x: jax.Array, kernel: jax.Array, padding: int) -> jax.Array:
    """Stride-1 :func:`_conv_xla` as kh*kw*Cin*Cout scalar multiply-adds of shifted planes.

    For a few channels (CBAM's 7x7 2 -> 1) XLA:CPU's convolution runs a generic loop (7.5 ms at
    (64, 44, 44, 2)); as one elementwise fusion over channel-major planes, W minor, it
    vectorises (0.8 ms, 2-core AMD EPYC).
    """
    kh, kw, cin, cout = kernel.shape
    ho = output_size(x.shape[1], kh, 1, padding)
    wo = output_size(x.shape[2], kw, 1, padding)
    # The barrier makes XLA store the planes once: fused into the kh*kw*Cin reads below, x's
    # producer (e.g. CBAM's pooling, or a gradient) would be recomputed at every tap.
    planes = jnp.pad(jnp.moveaxis(x, -1, 0), ((0, 0), (0, 0), (padding,) * 2, (padding,) * 2))
    planes = lax.optimization_barrier(planes)
    outs = []
    for o in range(cout):
        terms = [
            planes[c, :, i : i + ho, j : j + wo] * kernel[i, j, c, o]
            for c in range(cin)
            for i in range(kh)
            for j in range(kw)
        ]
        outs.append(functools.reduce(jnp.add, terms))
    # ... and store the result once: fused into a consumer (a reduction over channels, say) the
    # kh*kw*Cin terms would be recomputed for every element that reads them.
    return lax.optimization_barrier(jnp.stack(outs, axis=-1))


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv_shifted(x: jax.Array, kernel: jax.Array, padding: int) -> jax.Array:
    return conv_shifted_sums(x, kernel, padding)


def _conv_shifted_bwd(padding, res, dy):
    # XLA's gradients: shifted sums for dx too ran ~2 ms faster per train step but took ~2 s
    # more to compile (each sum is one large fusion).
    x, kernel = res
    return _input_grad(dy, kernel, x, 1, padding), _weight_grad_xla(x, dy, kernel, 1, padding)


_conv_shifted.defvjp(_saving_inputs(_conv_shifted), _conv_shifted_bwd)


# --- "winograd": F(2x2, 3x3) for stride-1 3x3 convolutions ----------------------------------

# Y = A^T [(G g G^T) * (B^T d B)] A per 4x4 input tile d and 3x3 kernel g (Lavin & Gray 2016).
_WINO_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))
# Multiply-adds (images x tiles x Cin x Cout) per Winograd matmul: at least this many. Smaller
# chunks ran ~1.5x slower at 44x44 and 22x22 (likely: XLA:CPU ran their dots on one core).
_WINO_MIN_CHUNK_MACS = 2**23


def _wino_in(d: list[jax.Array]) -> list[jax.Array]:
    """B^T along one axis: 4 rows of a tile -> 4 transformed rows."""
    return [d[0] - d[2], d[1] + d[2], d[2] - d[1], d[1] - d[3]]


def _wino_out(m: list[jax.Array]) -> list[jax.Array]:
    """A^T along one axis: 4 rows of a product tile -> 2 output rows."""
    return [m[0] + m[1] + m[2], m[1] - m[2] - m[3]]


def _dot(a: jax.Array, b: jax.Array) -> jax.Array:
    """`a @ b`; with a bfloat16 `b`, `a` rounded to bfloat16 too and the products accumulated
    in `a`'s dtype (a float32 `b` leaves the dot exactly as a plain `jnp.dot`)."""
    if b.dtype == a.dtype:
        return jnp.dot(a, b)
    return jnp.dot(a.astype(b.dtype), b, preferred_element_type=a.dtype)


def _winograd_chunk(x: jax.Array, u: jax.Array) -> jax.Array:
    """x (b, 2*th, 2*tw, Cin), u (4, 4, Cin, Cout) the transformed kernel -> (b, 2th, 2tw, Cout).

    The matmuls take their operands in u's dtype (bfloat16 for ``":bf16"``) and accumulate in
    x's."""
    b, h, w, cin = x.shape
    th, tw = h // 2, w // 2
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    # Input tiles: 4x4 windows at stride 2, as 16 maps (b, th, tw, Cin) of B^T d B.
    rows = _wino_in([xp[:, k : k + 2 * th : 2] for k in range(4)])
    v = [t for r in rows for t in _wino_in([r[:, :, k : k + 2 * tw : 2] for k in range(4)])]
    m = [
        _dot(vi.reshape(-1, cin), u[i // 4, i % 4]).reshape(b, th, tw, -1) for i, vi in enumerate(v)
    ]
    cols = [_wino_out([m[4 * i + j] for i in range(4)]) for j in range(4)]  # A^T along rows
    y = [jnp.stack(_wino_out([cols[j][a] for j in range(4)]), axis=3) for a in range(2)]
    y = jnp.stack(y, axis=2)  # (b, th, 2, tw, 2, Cout): output pixel (2 * ty + a, 2 * tx + a')
    return y.reshape(b, h, w, -1)


def conv_winograd(x: jax.Array, kernel: jax.Array, bf16: bool = False) -> jax.Array:
    """Stride-1, padding-1 3x3 :func:`_conv_xla` by Winograd's F(2x2, 3x3).

    x (B, H, W, Cin) (odd H or W: padded by one zero row/column and cropped back), kernel
    (3, 3, Cin, Cout). Each 2x2 output tile is A^T [U * (B^T d B)] A of its 4x4 input tile d,
    U = G g G^T: 16 (tiles, Cin) @ (Cin, Cout) matmuls, 2.25x fewer multiply-adds than the
    direct convolution, for a few adds per element. The tiles are transformed a few images at a
    time (``lax.map``), so they stay in cache. Float32 error ~1e-6 of the output's magnitude.
    (64, 44, 44, 64) -> 64: 26.3 -> 17.0 ms, (64, 22, 22, 128) -> 128: 22.7 -> 14.9 ms, vs XLA
    with Eigen (2-core AMD EPYC, Zen 5). `bf16`: the matmul operands (transformed tiles and
    kernel) rounded to bfloat16, accumulated in float32.
    """
    with jax.named_scope("winograd"):  # profiles tell it apart
        b, h, w, cin = x.shape
        cout = kernel.shape[-1]
        dtype = x.dtype
        # Transforms and matmuls in float32 (or wider) whatever x's dtype: bf16 adds would cost
        # Winograd's accuracy, and on CPU a bf16 path is no faster here.
        x = x.astype(_acc_dtype(dtype))
        u = jnp.einsum(
            "ai,ijco,bj->abco",
            jnp.asarray(_WINO_G, x.dtype),
            kernel.astype(x.dtype),
            jnp.asarray(_WINO_G, x.dtype),
        )
        if bf16:
            u = u.astype(jnp.bfloat16)
        hp, wp = h + h % 2, w + w % 2
        if (hp, wp) != (h, w):
            x = jnp.pad(x, ((0, 0), (0, hp - h), (0, wp - w), (0, 0)))
        per_image = (hp // 2) * (wp // 2) * cin * cout
        c = next(
            (d for d in range(1, b + 1) if b % d == 0 and d * per_image >= _WINO_MIN_CHUNK_MACS), b
        )
        if c == b:
            y = _winograd_chunk(x, u)
        else:
            xs = x.reshape(b // c, c, hp, wp, cin)
            y = lax.map(lambda xc: _winograd_chunk(xc, u), xs).reshape(b, hp, wp, cout)
        return y[:, :h, :w].astype(dtype)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_wino(x: jax.Array, kernel: jax.Array, dw_by_matmul: bool, bf16: bool) -> jax.Array:
    return conv_winograd(x, kernel, bf16)


def _conv_wino_bwd(dw_by_matmul, bf16, res, dy):
    x, kernel = res
    # At stride 1 and padding 1, dx is dy convolved with the flipped kernel, Cin <-> Cout.
    dx = conv_winograd(dy, jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2), bf16)
    if dw_by_matmul:
        dw = weight_grad_matmul(x, dy, kernel.shape, 1, 1, bf16)
    else:
        dw = _weight_grad_xla(x, dy, kernel, 1, 1)
    return dx, dw.astype(kernel.dtype)


_conv_wino.defvjp(_saving_inputs(_conv_wino), _conv_wino_bwd)


# --- public API ---------------------------------------------------------------------------------


def select_impl(
    x_shape: tuple[int, ...],
    kernel_shape: tuple[int, ...],
    stride: int = 1,
    padding: int = 1,
    backend: str | None = None,
    bf16: bool = False,
    onednn: bool | None = None,
) -> str:
    """The impl ``"auto"`` (``bf16``: ``"auto:bf16"``, without the suffix) resolves to for this
    shape on ``backend`` (default: jax's default).

    On CPU, ``"shifted_sums"`` for stride-1 square kernels between a few channels
    (<= SHIFTED_MAX_CHANNEL_PAIRS (Cin, Cout) pairs) on maps of >= SHIFTED_MIN_OUTPUT_PIXELS
    (CBAM's 7x7 2->1: forward 2.5-10x faster than XLA's); ``"xla"`` when Cout < 16 (a
    thinner matmul is slower than XLA's); otherwise:

    - with ``bf16`` where oneDNN's convolutions are built and have bfloat16 on this CPU
      (``onednn``; None: asks :func:`fer_jax.model.onednn_conv.available`; oneDNN 2.x has none
      on AVX2 CPUs), ``"onednn"``: the whole train step 47.1 ->
      79.9 images/s (1.69x, 1.07x PyTorch's bf16 autocast), ten-crop evaluation 1.47x (2-core
      AMD EPYC, Zen 5, AVX512_BF16, quiet; experiments/results/onednn_conv_quiet_epyc_zen5/);
    - else fer_jax's own forms (:func:`_select_form`).

    ``"xla"`` on every other backend (GPU/TPU convolutions are fast).
    """
    backend = jax.default_backend() if backend is None else backend
    kh, kw, cin, cout = kernel_shape
    ho = output_size(x_shape[-3], kh, stride, padding)
    wo = output_size(x_shape[-2], kw, stride, padding)
    if backend != "cpu":
        return "xla"
    if (
        stride == 1
        and kh == kw
        and cin * cout <= SHIFTED_MAX_CHANNEL_PAIRS
        and ho * wo >= SHIFTED_MIN_OUTPUT_PIXELS
    ):
        return "shifted_sums"
    if cout < 16:
        return "xla"
    if bf16 and (onednn_conv.available(backend, bf16=True) if onednn is None else onednn):
        return "onednn"
    return _select_form(kh, kw, cin, stride, padding, ho * wo, bf16)


def _select_form(
    kh: int, kw: int, cin: int, stride: int, padding: int, pixels: int, bf16: bool
) -> str:
    """:func:`select_impl`'s pick among fer_jax's own forms, on CPU, Cout >= 16, for a
    kh x kw kernel from Cin channels into an output map of `pixels` (Ho*Wo):

    - ``"winograd"`` for stride-1, padding-1 3x3 kernels with Cin >= 16 on maps of
      >= WINOGRAD_MIN_OUTPUT_PIXELS (44x44, 22x22): the whole train step 44.8 -> 46.5
      images/s, ten-crop evaluation 146 -> 162 crops/s (one-process A/B, 2-core AMD EPYC,
      Zen 5). Not at 6x6 (slower). Not at 11x11 either: +1.6% more, but there two compiles of
      the same steps (one scanned, one per call) drifted apart 100x more than with any other
      impl (4.7e-5 vs 3e-7 after two steps), unexplained;
    - ``"matmul_grad"`` for 1x1 kernels (the weight gradient is one plain matmul; 2-3x faster
      than XLA's at the shortcut shapes);
    - ``"matmul_grad"`` for the other strided kernels too (the 3x3 stride-2 ones). Alone,
      ``"phase_dx"`` (XLA's weight gradient) was 1.1-1.7x faster there; in the network it was
      not: XLA's weight gradient wants x transposed, and XLA built that transpose in the forward
      as a fusion recomputing x's producers (BatchNorm, CBAM gates, residual), ~60 ms at 44x44.
      The whole train step: 38.0 -> 39.7 images/s (2-core AMD EPYC, Zen 5);
    - ``"matmul_grad"`` for output maps of >= AUTO_MIN_OUTPUT_PIXELS pixels (44x44, 22x22:
      2-3x faster than XLA:CPU's default YNNPACK weight gradient, on par with its Eigen one);
    - ``"xla"`` otherwise.

    With ``bf16`` (bfloat16 matmul operands, where the CPU multiplies them at twice float32's
    rate), the same, except ``"im2col"`` for kernels larger than 1x1 with Cin >= 16 at stride 1
    on output maps below AUTO_MIN_OUTPUT_PIXELS (11x11x256, 6x6x512) and strided into maps of
    <= IM2COL_BF16_MAX_STRIDED_OUTPUT_PIXELS (11x11x256 -> 6x6x512 s2), where float32 takes
    XLA's convolutions or ``"matmul_grad"``. Forward + both gradients, B=64, 2-core AMD EPYC
    (Zen 5) shared with other jobs (load 5-7; alternating, min of 9-11): 11x11x256 205 -> 127
    ms and 6x6x512 251 -> 180 (vs XLA float32), 11x11x256 -> 6x6x512 s2 122 -> 76 (vs
    ``"matmul_grad:bf16"``). Not taken: bf16 Winograd at 11x11 (as fast as im2col, not faster)
    and 6x6 (slower than XLA's float32); im2col into 11x11 at stride 2 and for 1x1 kernels
    (no faster than ``"matmul_grad:bf16"``).
    """
    if (
        bf16
        and cin >= 16
        and kh * kw > 1
        and (
            (stride == 1 and pixels < AUTO_MIN_OUTPUT_PIXELS)
            or pixels <= IM2COL_BF16_MAX_STRIDED_OUTPUT_PIXELS
        )
    ):
        return "im2col"
    if (
        (kh, kw, stride, padding) == (3, 3, 1, 1)
        and cin >= 16
        and pixels >= WINOGRAD_MIN_OUTPUT_PIXELS
    ):
        return "winograd"
    if kh == kw == 1 or stride > 1:
        return "matmul_grad"
    return "matmul_grad" if pixels >= AUTO_MIN_OUTPUT_PIXELS else "xla"


def split_impl(impl: str) -> tuple[str, bool]:
    """``"auto:bf16"`` -> ``("auto", True)``, ``"xla"`` -> ``("xla", False)``; a suffix on an
    impl without matmuls, or an unknown suffix, is an error."""
    base, sep, suffix = impl.partition(":")
    if not sep:
        return impl, False
    if sep + suffix != BF16_SUFFIX or base not in BF16_IMPLS:
        raise ValueError(
            f"unknown impl {impl!r}; the suffix {BF16_SUFFIX!r} goes with one of {BF16_IMPLS}"
        )
    return base, True


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
        One of :data:`BF16_IMPLS` + :data:`BF16_SUFFIX`: bfloat16 matmul operands (above).

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
    impl, bf16 = split_impl(impl)
    if impl == "auto":
        onednn = None if x.dtype in onednn_conv.DTYPES else False  # float16, float64: not it
        impl = select_impl(x.shape, kernel.shape, stride, padding, bf16=bf16, onednn=onednn)
    if impl == "onednn":
        x, kernel = mesh_axes.match_varying_axes(x, kernel)
        return onednn_conv.conv2d_onednn(x, kernel, stride, padding, bf16)
    if impl == "xla":
        return _conv_xla(x, kernel, stride, padding)
    if impl == "shifted_sums":
        if stride != 1 or kh != kw:
            raise ValueError(
                f"impl 'shifted_sums' needs stride 1 and a square kernel, got {stride=}"
            )
        return _conv_shifted(*mesh_axes.match_varying_axes(x, kernel), padding)
    if impl == "winograd":
        if stride != 1 or padding != 1 or (kh, kw) != (3, 3):
            raise ValueError(
                f"impl 'winograd' needs a 3x3 kernel, stride 1 and padding 1, got "
                f"{kernel.shape[:2]}, {stride=}, {padding=}"
            )
        x, kernel = mesh_axes.match_varying_axes(x, kernel)
        ho, wo = x.shape[1:3]
        return _conv_wino(x, kernel, ho * wo >= AUTO_MIN_OUTPUT_PIXELS, bf16)
    if impl == "im2col":
        x, kernel = mesh_axes.match_varying_axes(x, kernel)
        return _conv_im2col(x, kernel, stride, padding, bf16)
    if impl in ("matmul_grad", "phase_dx"):
        x, kernel = mesh_axes.match_varying_axes(x, kernel)
        return _conv_custom_grad(x, kernel, stride, padding, impl == "matmul_grad", bf16)
    raise ValueError(f"unknown impl {impl!r}; expected one of {IMPLS}")
