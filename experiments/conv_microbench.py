"""Microbenchmark of fer_jax.model.conv.conv2d impls vs PyTorch at the CBAM-ResNet18 shapes.

Times forward and forward+backward (grads w.r.t. input and kernel) of every convolution shape of
the network, per impl, interleaved in one run (impls alternate within each repetition; the
machine is shared, so compare columns of one run only), and prints markdown tables of ms per
call, the pick of ``impl="auto"``, and the ratio of the best JAX column to PyTorch. The last row
weights each shape by its uses per forward: the network's convolution time per train step.

    python experiments/conv_microbench.py [--batch 64] [--reps 7] [--shapes 44 22 ...]
        [--impls xla matmul_grad+eigen ...] [--dtype bfloat16] [--stat min] [--no-torch]

Columns ``xla`` / ``matmul_grad`` / ``auto`` are ``conv2d(impl=...)`` under ``jax.jit``; ``+eigen``
is the same jitted with ``compiler_options=fer_jax.model.conv.cpu_compiler_options()``.

What was tried (2-core Xeon, AVX-512/AMX, shared with other jobs at load 3-6, so +-30% noise;
jax 0.10.2, torch 2.13 with 2 threads, B=64, f32, fwd+bwd ms unless noted):
- Cause: jax 0.10's XLA:CPU sends f32 NHWC convolutions to YNNPACK (``__ynn_fusion`` in the
  compiled HLO). Its weight-grad convolution is the slow part (44x44x64: ~440-1100 ms vs
  ~220-310 ms by Eigen, forward ~120). Disabling YNNPACK convolutions
  (``--xla_cpu_experimental_ynn_fusion_type=individual_dot``, or per jit
  ``cpu_compiler_options()``) made every convolution faster (dw 2-4x, fwd/dx 10-40%): summed
  over the network's convs ~16.0 s -> ~8.1 s per step.
- No effect beyond noise: ``xla_cpu_use_onednn``, ``xla_cpu_experimental_onednn_fusion_type=dot``,
  ``xla_cpu_use_xnnpack``, ``xla_cpu_experimental_xnn_fusion_type=dot``,
  ``xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY``,
  ``xla_cpu_multi_thread_eigen=false``, ``xla_cpu_use_thunk_runtime=false``,
  ``xla_cpu_use_fusion_emitters=false`` (the last three only changed elementwise copies).
- im2col weight gradient, whole batch at once: patches of 285 MB at 44x44x64 cost more than the
  GEMM (~400 ms concat vs ~100 ms GEMM): XLA:CPU allocates large buffers fresh per call, and
  first-touch page faults make writing 285 MB ~150 ms (~70 ms with
  GLIBC_TUNABLES=glibc.malloc.hugetlb=1; reading it ~20 ms). What moved it: chunks of 2 images
  per ``lax.scan`` step (2-9 MB of patches; 1.5-2x), channel-major patches (kh*kw*Cin, N) @
  dy (N, Cout), a row-major NN dot that YNNPACK's GEMM takes (~1.5x vs P^T @ dy or dy^T @ P,
  which fall to Eigen's slower GEMM). Per-tap matmuls (9 x (Cin,N)@(N,Cout)), a row-only
  unroll, and ``lax.conv_general_dilated_patches`` (a convolution itself) were slower.
  Result: ~2x XLA's default dw at 44x44 and 22x22, about equal to Eigen's; at 11x11 and 6x6
  no better than Eigen; 1x1 kernels 2-3x faster than both (a single GEMM, no patches).
- Forward as im2col matmul too: ~3.5x slower than XLA's forward at 44x44 (473 vs 127 ms).
- Dodging YNNPACK from inside one op (3-D conv with a dummy axis; swapped operands; a padded
  "kernel" larger than the input) lands in XLA:CPU's generic convolution loop: 3-50x slower.
- bf16: XLA:CPU bf16 convolutions (not taken by YNNPACK) are ~2x slower than f32 forward and
  matmul_grad helps there too (fwd+bwd sum 19.2 s xla vs 12.5 s matmul_grad); f32 is faster.
- ``preferred_element_type``: f32 accumulation for bf16 matmuls; no speed effect for f32.

On a 2-core AMD EPYC (Zen 5: AVX-512, AVX512_BF16, no AMX), quiet, jax 0.10.2 (issue 14):
- f32 forward convolutions by Eigen run at ~360-460 GFLOP/s, about the two cores' FMA peak
  (PyTorch 200-300 per call); the network's forward is compute-bound in both frameworks.
- Stride-2 input gradients: XLA convolves the stride-dilated dy (4x the arithmetic). As four
  stride-1 convolutions, one per phase of the input's pixels (``impl="phase_dx"``, also inside
  ``matmul_grad``), the three 3x3 stride-2 shapes' fwd+bwd went 193 -> 131 ms per net.
- CBAM's 7x7 2->1: XLA's convolution 7.5 ms forward at 44x44 (PyTorch 1.4); as 98 multiply-adds
  of shifted planes (``impl="shifted_sums"``) 0.7 ms. Inside the network XLA fused those 98
  terms into their producers and consumers (recomputed per channel: CBAM fwd+bwd at 22x22 went
  18 -> 34 ms) until both ends went behind optimization barriers. The input gradient as shifted
  sums too (fwd+bwd 5.7 -> 2.0 ms at 44x44) added ~2 s to the train step's compile (9.9 -> 13 s
  with it, 11 s without): XLA's is kept.
- Weight-gradient chunks: 2 images still best (44x44x64: 1, 2, 4, 8 images 63, 39, 59, 81 ms;
  Eigen's 48). At 22x22x128 Eigen's weight gradient was faster (25 vs 29 ms): not adopted.
- Per-tap weight gradients over contiguous row windows of the padded input (9 TN dots, no
  patches): 3-5x slower than the patches.
- A single convolution here is not the network: ``phase_dx`` (XLA's weight gradient) beat
  ``matmul_grad`` on the strided 3x3 shapes alone, but in the train step XLA built the
  transposed x its weight gradient wants as a fusion recomputing x's producers (BatchNorm,
  CBAM, residual) in the forward, ~90 ms per step; ``auto`` now takes ``matmul_grad`` there
  (train step 38.0 -> 39.7 img/s). Judge a change by the whole step (``experiments/benchmark``).
- bf16: XLA's convolutions are slower in bf16 than f32 (Eigen 214 vs 367 GFLOP/s at 44x44x64,
  YNNPACK 120 vs 172); a bf16 matmul with f32 accumulation runs 676 vs 391 GFLOP/s f32, so
  even perfect im2col would cap a bf16 forward at ~1.7x; PyTorch's bf16 convolution 834 vs 209.

Same machine type, session 4 (scratch scripts timing the ops alone, then the whole step in one
process, variants alternating):
- Weight gradient as x shifted along W (kw copies) times dy shifted along H (kh copies),
  ``(kw*Cin, N) @ (N, kh*Cout)``, instead of im2col's kh*kw copies of x: 44x44x64 42.4 -> 37.9
  ms, 22x22x128 31.2 -> 27.4, 11x11x256 31.0 -> 26.9 (4-image chunks); 6x6 worse (N grows by
  (Ho + 2) / Ho). Train step +2.5% (15 of 15 rounds). Row-major patches contracted on rows
  (P^T @ D without the transpose): 40.9 at 44; all nine shifts on dy: 60.1.
- Winograd F(2x2, 3x3) (``impl="winograd"``): 16 matmuls per chunk of images. Forward 44x44x64
  26.3 -> 17.0 ms, 22x22x128 22.7 -> 14.9, 11x11x256 21.7 -> 20.0, 6x6x512 24 -> 39 (not used
  there). Per chunk, the 16 matmuls as 16 plain dots beat one batched dot_general (17.0 vs
  19.9 at 44) and in the step (48.9 vs 46.5 img/s). Chunks below ~1 MB of input per lax.map
  step ran ~1.5x slower (likely their dots ran on one core): 4-8 images at 44x44, 8 at 22x22.
  Whole step (Winograd at 44/22/11): train 44.8 -> 48.2 img/s, ten-crop eval 144 -> 161
  crops/s; ``auto`` uses it at 44 and 22 only (11x11: see ``select_impl``).
- This VM has slow phases (all variants ~10-15% slower at once, for minutes; not CPU steal):
  there Winograd, which moves more bytes per multiply, lost its lead (40.6 vs 41.8 img/s).
- oneDNN dots (``xla_cpu_use_onednn`` with ``LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT``): the weight
  gradient's dot alone 0.65 vs 0.70 ms, the whole step slower (39.3 vs 41.0 img/s: its
  matrix-vector sums are 2-3x slower than YNNPACK's). ``LIBRARY_FUSION_TYPE_DOT`` aborts the
  train step at run time ("partition compile failed", a dot with two multiply post-ops).
  ``xla_cpu_prefer_vector_width=512``, ``xla_cpu_copy_insertion_use_region_analysis``: noise.

bfloat16 on layers 3-4, same machine type (issue 34), shared with other jobs (load 5-7: every
figure 1.5-3x the quiet ones; alternating, min of 7-11; B=64):
- Dots alone: bf16 operands with float32 accumulation (``preferred_element_type``) ~2x float32
  (340-440 vs 160-215 GFLOP/s at the im2col shapes); with a bf16 *output* 0.7-1.0x float32.
- 11x11x256 forward: XLA f32 48-72 ms, im2col bf16 (chunks of >= 256 output pixels) 32-33,
  Winograd bf16 28-35; unchunked im2col 85-130 (the 9-copy concatenation of the whole batch);
  9 per-tap dots summed 57; x shifted along W only, (3Cin) @ (3Cin, 3Cout) and row-shifted
  sums, 71. 6x6x512: XLA 59-79, im2col 33-46, Winograd bf16 56-101, per-tap 42.
- Forward + gradients (``"im2col"``: weight gradient by bf16 ``weight_grad_matmul``):
  11x11x256 205 -> 127 ms, 6x6x512 251 -> 180, s2 11x11x256 -> 6x6x512 122 -> 76 (vs
  ``matmul_grad:bf16``); s2 into 11x11 and 1x1 kernels: no gain (kept ``matmul_grad:bf16``).
  Weight gradient alone at 11x11 and 6x6, bf16 matmuls (shifted copies, 128-4096 rows per
  chunk; im2col NN or TN) vs XLA's f32: within the noise (47-120 vs 64-82 ms).
- XLA's own bf16 convolutions: Eigen 36-71 ms vs 39-66 f32 at 11x11, slower at 6x6 and 44x44;
  YNNPACK does take bf16 convolutions (default options) and is slower still. oneDNN
  (``xla_cpu_use_onednn`` + ``xla_cpu_experimental_onednn_custom_call``): no convolution was
  rewritten to a oneDNN call in this jaxlib (no ``__onednn`` custom call in the compiled HLO).
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from experiments import common
from fer_jax.model import conv

# short name: (H=W, Cin, Cout, k, stride, padding, uses per CBAM-ResNet18 forward). All convs of
# the network, so the weighted sum is its convolution time per train step.
SHAPES: dict[str, tuple[int, int, int, int, int, int, int]] = {
    "stem": (44, 1, 64, 3, 1, 1, 1),
    "44": (44, 64, 64, 3, 1, 1, 4),
    "7x7@44": (44, 2, 1, 7, 1, 3, 2),
    "s2:44": (44, 64, 128, 3, 2, 1, 1),
    "1x1:44": (44, 64, 128, 1, 2, 0, 1),
    "22": (22, 128, 128, 3, 1, 1, 3),
    "7x7@22": (22, 2, 1, 7, 1, 3, 2),
    "s2:22": (22, 128, 256, 3, 2, 1, 1),
    "1x1:22": (22, 128, 256, 1, 2, 0, 1),
    "11": (11, 256, 256, 3, 1, 1, 3),
    "7x7@11": (11, 2, 1, 7, 1, 3, 2),
    "s2:11": (11, 256, 512, 3, 2, 1, 1),
    "1x1:11": (11, 256, 512, 1, 2, 0, 1),
    "6": (6, 512, 512, 3, 1, 1, 3),
    "7x7@6": (6, 2, 1, 7, 1, 3, 2),
}


def describe(name: str) -> str:
    """'44x44x64->64 3x3' style label of a shape."""
    h, cin, cout, k, s, p, _ = SHAPES[name]
    return f"{h}x{h}x{cin}->{cout} {k}x{k}" + (f" s{s}" if s > 1 else "")


JAX_IMPLS = ("xla", "xla+eigen", "matmul_grad", "matmul_grad+eigen", "auto", "auto+eigen")


def _jax_fns(impl: str, stride: int, padding: int) -> tuple[Callable, Callable]:
    """Jitted forward f(x, k) and fwd+bwd f(x, k, dy) -> (dx, dk) for a column of the table."""
    name, _, variant = impl.partition("+")
    opts = conv.cpu_compiler_options() if variant == "eigen" else None

    def fwd(x, k):
        return conv.conv2d(x, k, stride=stride, padding=padding, impl=name)

    def fwd_bwd(x, k, dy):
        y, vjp = jax.vjp(fwd, x, k)
        return y, *vjp(dy)

    return jax.jit(fwd, compiler_options=opts), jax.jit(fwd_bwd, compiler_options=opts)


def _torch_fns(stride: int, padding: int, channels_last: bool):
    import torch
    import torch.nn.functional as F

    def prep(x):
        return x.contiguous(memory_format=torch.channels_last) if channels_last else x

    def fwd(x, k):
        with torch.no_grad():
            return F.conv2d(x, k, stride=stride, padding=padding)

    def fwd_bwd(x, k, dy):
        x.grad = k.grad = None
        y = F.conv2d(x, k, stride=stride, padding=padding)
        y.backward(dy)
        return y, x.grad, k.grad

    return prep, fwd, fwd_bwd


def bench_shape(name: str, args) -> dict[str, tuple[float, float]]:
    """Median (fwd ms, fwd+bwd ms) per impl for one shape."""
    h, cin, cout, k, s, p, _ = SHAPES[name]
    dtype = jnp.dtype(args.dtype)
    ho = conv.output_size(h, k, s, p)
    rng = np.random.default_rng(0)
    x_np = rng.standard_normal((args.batch, h, h, cin), np.float32)
    k_np = (rng.standard_normal((k, k, cin, cout)) / np.sqrt(k * k * cin)).astype(np.float32)
    g_np = rng.standard_normal((args.batch, ho, ho, cout), np.float32)
    x, kern, g = (jnp.asarray(a, dtype) for a in (x_np, k_np, g_np))

    calls: dict[str, tuple[Callable, Callable]] = {}
    for impl in args.impls:
        f, fb = _jax_fns(impl, s, p)
        calls[impl] = (
            lambda f=f: jax.block_until_ready(f(x, kern)),
            lambda fb=fb: jax.block_until_ready(fb(x, kern, g)),
        )
    if args.torch:
        import torch

        tdt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
        prep, tf, tfb = _torch_fns(s, p, args.channels_last)
        tx = prep(torch.from_numpy(x_np.transpose(0, 3, 1, 2).copy()).to(tdt)).requires_grad_()
        tk = torch.from_numpy(k_np.transpose(3, 2, 0, 1).copy()).to(tdt).requires_grad_()
        tg = prep(torch.from_numpy(g_np.transpose(0, 3, 1, 2).copy()).to(tdt))
        calls["torch"] = (lambda: tf(tx, tk), lambda: tfb(tx, tk, tg))

    for fwd, fwd_bwd in calls.values():  # compile + warm up
        fwd(), fwd_bwd(), fwd_bwd()
    times: dict[str, tuple[list[float], list[float]]] = {n: ([], []) for n in calls}
    for _ in range(args.reps):
        for n, pair in calls.items():
            for i, fn in enumerate(pair):
                time.sleep(0.02)  # let the previous impl's worker threads stop spinning
                t0 = time.perf_counter()
                fn()
                times[n][i].append(1e3 * (time.perf_counter() - t0))
    stat = {"median": statistics.median, "min": min}[args.stat]
    return {n: (stat(a), stat(b)) for n, (a, b) in times.items()}


def _auto_pick(name: str, batch: int) -> str:
    """What ``"auto"`` picks for a shape, and ``"auto:bf16"`` where that differs."""
    h, cin, cout, k, s, p, _ = SHAPES[name]
    f32 = conv.select_impl((batch, h, h, cin), (k, k, cin, cout), s, p)
    bf16 = conv.select_impl((batch, h, h, cin), (k, k, cin, cout), s, p, bf16=True)
    return f32 if bf16 == f32 else f"{f32} (bf16: {bf16})"


def _table(results, cols, idx: int, title: str, args) -> str:
    lines = [f"**{title}** (ms per call, {args.stat} of {args.reps})", ""]
    head = ["shape", "auto picks", *cols]
    if "torch" in cols:
        head += ["best jax / torch", "best jax"]
    lines += common.table(head)
    total = dict.fromkeys(cols, 0.0)
    for name, res in results.items():
        row = [f"{name}: {describe(name)}", _auto_pick(name, args.batch)]
        row += [f"{res[c][idx]:.1f}" for c in cols]
        for c in cols:
            total[c] += SHAPES[name][6] * res[c][idx]
        if "torch" in cols:
            jax_cols = [c for c in cols if c != "torch"]
            best = min(jax_cols, key=lambda c: res[c][idx])
            row += [f"{res[best][idx] / res['torch'][idx]:.2f}", best]
        lines.append("| " + " | ".join(row) + " |")
    row = ["**sum x uses per net**", ""] + [f"**{total[c]:.0f}**" for c in cols]
    if "torch" in cols:
        jax_cols = [c for c in cols if c != "torch"]
        best = min(jax_cols, key=lambda c: total[c])
        row += [f"**{total[best] / total['torch']:.2f}**", best]
    lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = common.parser(__doc__)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES), help=f"of {list(SHAPES)}")
    ap.add_argument("--impls", nargs="*", default=list(JAX_IMPLS))
    ap.add_argument("--stat", default="median", choices=["median", "min"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--no-torch", dest="torch", action="store_false")
    ap.add_argument("--channels-last", action="store_true", help="torch tensors in NHWC memory")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
    args = ap.parse_args()
    if args.torch:
        import torch

        torch.set_num_threads(args.threads)
    print(
        f"jax {jax.__version__} backend={jax.default_backend()} cpus={os.cpu_count()} "
        f"batch={args.batch} dtype={args.dtype} reps={args.reps} "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r} loadavg={os.getloadavg()[0]:.1f}"
    )
    results = {}
    for name in args.shapes:
        results[name] = bench_shape(name, args)
        cells = {n: f"{a:.1f}/{b:.1f}" for n, (a, b) in results[name].items()}
        print(name, describe(name), "auto ->", _auto_pick(name, args.batch), cells, flush=True)
    cols = [*args.impls] + (["torch"] if args.torch else [])
    print(f"\nloadavg at end {os.getloadavg()[0]:.1f}\n")
    print(_table(results, cols, 0, "forward", args))
    print()
    print(_table(results, cols, 1, "forward + backward (dx, dk)", args))


if __name__ == "__main__":
    main()
