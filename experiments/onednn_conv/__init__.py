"""oneDNN convolutions in JAX through the XLA FFI (issue 34 prototype; see NOTES.md).

    experiments/onednn_conv/build.sh        # -> experiments/onednn_conv/libonednn_conv.so

    from experiments.onednn_conv import conv2d_onednn
    y = conv2d_onednn(x, kernel, stride=1, padding=1)   # x (B,H,W,Cin), kernel HWIO

:func:`conv2d_onednn` is a ``jax.custom_vjp`` over three ``jax.ffi.ffi_call`` targets (forward,
backward-data, backward-weights) implemented by oneDNN primitives in ``onednn_conv.cc``;
CPU only, float32 or bfloat16.
"""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

import jax
import numpy as np

HERE = Path(__file__).resolve().parent
LIB_PATH = Path(os.environ.get("ONEDNN_CONV_LIB", HERE / "libonednn_conv.so"))
"""The library: ``build.sh``'s default output, or ``$ONEDNN_CONV_LIB`` (e.g. a second build
against another oneDNN, ``OUT=.../libonednn_conv_v3.so build.sh``)."""
PREFIX_PATH = LIB_PATH.with_suffix(".prefix")  # build.sh writes the oneDNN prefix it used

LAYOUTS = {"nhwc": 0, "any": 1}
"""``layout`` of :func:`conv2d_onednn`: ``"nhwc"`` hands oneDNN the activations in the NHWC
order JAX holds them (weights still in oneDNN's preferred layout, reordered from HWIO per call);
``"any"`` lets oneDNN choose every layout (``format_tag::any``: blocked ``nChw16c``-style) and
reorders activations in and out around each call."""

TARGETS = {
    "fwd": "onednn_conv_fwd",
    "bwd_data": "onednn_conv_bwd_data",
    "bwd_weights": "onednn_conv_bwd_weights",
}
_SYMBOLS = {
    "fwd": "OnednnConvFwd",
    "bwd_data": "OnednnConvBwdData",
    "bwd_weights": "OnednnConvBwdWeights",
}


def available() -> bool:
    """Whether ``build.sh`` has produced the shared library."""
    return LIB_PATH.exists()


@functools.cache
def load() -> ctypes.CDLL:
    """Loads the library and registers its three FFI targets for the CPU platform (once).

    Debian's libdnnl (OpenMP) needs nothing more. The ``onednn`` wheel's libdnnl runs on a SYCL
    CPU device, found through the OpenCL ICD loader: unless ``OCL_ICD_FILENAMES`` is set, it is
    pointed at the wheel's ``libintelocl.so`` (before the first call, when SYCL enumerates its
    platforms; harmless when the prefix has none, e.g. /usr).
    """
    if not available():
        raise FileNotFoundError(f"{LIB_PATH} not built: run {HERE / 'build.sh'}")
    if PREFIX_PATH.exists() and "OCL_ICD_FILENAMES" not in os.environ:
        ocl = Path(PREFIX_PATH.read_text().strip()) / "lib" / "libintelocl.so"
        if ocl.exists():
            os.environ["OCL_ICD_FILENAMES"] = str(ocl)
    lib = ctypes.cdll.LoadLibrary(str(LIB_PATH))
    for op, target in TARGETS.items():
        fn = getattr(lib, _SYMBOLS[op])
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(fn), platform="cpu")
    for name in ("onednn_conv_info", "onednn_conv_version"):
        getattr(lib, name).argtypes = [ctypes.c_char_p, ctypes.c_int]
        getattr(lib, name).restype = ctypes.c_int
    lib.onednn_conv_max_threads.restype = ctypes.c_int
    return lib


def version() -> str:
    """The loaded oneDNN's version and CPU runtime, e.g. ``"2.6.3 omp"`` (Debian's) or
    ``"3.13.2 sycl"`` (the ``onednn`` wheel)."""
    buf = ctypes.create_string_buffer(64)
    load().onednn_conv_version(buf, 64)
    return buf.value.decode()


def max_threads() -> int:
    """Threads oneDNN uses for a call from the calling thread (OpenMP runtime: its
    ``omp_get_max_threads()`` after ``ONEDNN_CONV_NUM_THREADS``); -1 for the TBB/SYCL ones."""
    return load().onednn_conv_max_threads()


def info() -> str:
    """One line per cached oneDNN primitive: op, shape, dtypes, oneDNN's implementation, the
    strides of its operands/result (``REORDER:`` where they differ from NHWC/HWIO), calls."""
    lib = load()
    n = lib.onednn_conv_info(None, 0)
    buf = ctypes.create_string_buffer(n + 1)
    lib.onednn_conv_info(buf, n + 1)
    return buf.value.decode()


def output_size(size: int, k: int, stride: int, padding: int) -> int:
    """Output length of a convolution along one axis (floor, as PyTorch and oneDNN)."""
    return (size + 2 * padding - k) // stride + 1


def _call(
    op: str,
    a: jax.Array,
    b: jax.Array,
    out: jax.ShapeDtypeStruct,
    stride: int,
    padding: int,
    layout: int,
) -> jax.Array:
    load()
    return jax.ffi.ffi_call(TARGETS[op], out, vmap_method="sequential")(
        a, b, stride=np.int64(stride), padding=np.int64(padding), layout=np.int64(layout)
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _conv(
    x: jax.Array, kernel: jax.Array, stride: int, padding: int, layout: int, compute: str | None
) -> jax.Array:
    return _conv_fwd(x, kernel, stride, padding, layout, compute)[0]


def _conv_fwd(x, kernel, stride, padding, layout, compute):
    b, h, w, _ = x.shape
    kh, kw, _, cout = kernel.shape
    ho, wo = output_size(h, kh, stride, padding), output_size(w, kw, stride, padding)
    out = jax.ShapeDtypeStruct((b, ho, wo, cout), x.dtype)
    if compute is not None:  # operands rounded to `compute`, results in x's dtype
        x, kernel = x.astype(compute), kernel.astype(compute)
    return _call("fwd", x, kernel, out, stride, padding, layout), (x, kernel)


def _conv_bwd(stride, padding, layout, compute, res, dy):
    x, kernel = res  # in the compute dtype; results in dy's (= the caller's x and kernel dtype)
    out_dtype = dy.dtype
    dy = dy.astype(x.dtype)
    dx = _call(
        "bwd_data", dy, kernel, jax.ShapeDtypeStruct(x.shape, out_dtype), stride, padding, layout
    )
    dk = _call(
        "bwd_weights", x, dy, jax.ShapeDtypeStruct(kernel.shape, out_dtype), stride, padding, layout
    )
    return dx, dk


_conv.defvjp(_conv_fwd, _conv_bwd)


def conv2d_onednn(
    x: jax.Array,
    kernel: jax.Array,
    stride: int = 1,
    padding: int = 1,
    layout: str = "nhwc",
    compute_dtype: str | None = None,
) -> jax.Array:
    """2-D cross-correlation by oneDNN, like ``fer_jax.model.conv.conv2d`` (no bias).

    Args:
      x: (B, H, W, Cin), float32 or bfloat16; the result is in ``x.dtype``.
      kernel: (kh, kw, Cin, Cout) HWIO; cast to ``x.dtype``.
      stride: spatial stride (both axes).
      padding: zeros on each side of H and W.
      layout: a key of :data:`LAYOUTS`.
      compute_dtype: e.g. ``"bfloat16"`` with float32 x: the operands (and, in the backward,
        dy) are rounded to it and oneDNN writes float32 results directly (bf16 primitives with
        f32 dst / diff_src / diff_weights; oneDNN accumulates in f32). None: x's dtype.

    Returns:
      (B, Ho, Wo, Cout), Ho = (H + 2 padding - kh) // stride + 1. Differentiable in x and kernel
      (backward-data and backward-weights primitives; both gradients in x's dtype).
    """
    if x.ndim != 4 or kernel.ndim != 4 or x.shape[-1] != kernel.shape[2]:
        raise ValueError(f"want x (B,H,W,C) and HWIO kernel, got {x.shape} and {kernel.shape}")
    compute = None if compute_dtype in (None, str(x.dtype)) else str(jax.numpy.dtype(compute_dtype))
    return _conv(x, kernel.astype(x.dtype), int(stride), int(padding), LAYOUTS[layout], compute)
