"""oneDNN convolutions (``conv2d(impl="onednn...")``) vs fer_jax's other forms vs PyTorch, per
network shape.

    python -m fer_jax.model.onednn_conv          # build the library once
    PYTHONPATH=$PWD python -m experiments.onednn_conv.microbench [--batch 64] [--reps 7]
        [--shapes 44 22 ...] [--cols auto+eigen auto:bf16+eigen onednn:bf16 ...] [--no-torch]

Times forward and forward+backward (dx, dk) of the CBAM-ResNet18 convolution shapes
(``experiments.conv_microbench.SHAPES``), every column alternating within each repetition
(``experiments.conv_microbench``'s method: 20 ms sleep before each call, min or median of the
reps). Columns, all jitted, float32 arrays in and out unless noted:

- any ``fer_jax.model.conv.conv2d`` impl, ``+eigen`` with ``cpu_compiler_options()``, as
  ``experiments.conv_microbench`` times them: ``auto+eigen`` / ``auto:bf16+eigen`` are what
  fer_jax trains with in float32 / bfloat16 (``auto:bf16`` is oneDNN's where built: use
  ``auto:bf16+eigen+no_onednn`` for fer_jax's own bf16 forms), ``onednn`` oneDNN in float32,
  ``onednn:bf16`` float32 in/out with bfloat16 compute (bf16 primitives writing f32);
- ``onednn:bf16io``: bfloat16 arrays in and out (as autocast's tensors);
- ``torch:bf16``: ``F.conv2d`` on bfloat16 NCHW tensors, ``torch.set_num_threads(2)``
  (autocast's convolution), ``torch:bf16cl`` the same channels-last.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from experiments import common, conv_microbench
from fer_jax.model import conv, onednn_conv

SHAPES = conv_microbench.SHAPES
COLS = ("auto+eigen", "auto:bf16+eigen+no_onednn", "onednn", "onednn:bf16", "onednn:bf16io")


def _jax_fns(col: str, stride: int, padding: int) -> tuple[Callable, Callable, jnp.dtype]:
    """Jitted forward f(x, k), fwd+bwd f(x, k, dy), and the dtype of the arrays it takes."""
    if col == "onednn:bf16io":  # bfloat16 arrays: oneDNN in bfloat16 throughout
        return (*conv_microbench._jax_fns("onednn", stride, padding), jnp.bfloat16)
    name, _, variants = col.partition("+")
    if "no_onednn" in variants.split("+"):  # fer_jax's own forms, as without the library
        variants = "+".join(v for v in variants.split("+") if v != "no_onednn")
        f, fb = conv_microbench._jax_fns(f"{name}+{variants}", stride, padding)
        return _without_onednn(f), _without_onednn(fb), jnp.float32
    return (*conv_microbench._jax_fns(col, stride, padding), jnp.float32)


def _without_onednn(fn: Callable) -> Callable:
    """`fn` traced (at its first call) with oneDNN's convolutions unavailable."""

    def call(*args):
        real = onednn_conv.available
        onednn_conv.available = lambda backend=None: False
        try:
            return fn(*args)
        finally:
            onednn_conv.available = real

    return call


def bench_shape(name: str, args: argparse.Namespace) -> dict[str, tuple[float, float]]:
    """(fwd ms, fwd+bwd ms) per column for one shape (``args.stat`` of ``args.reps``)."""
    h, cin, cout, k, s, p, _ = SHAPES[name]
    ho = conv.output_size(h, k, s, p)
    rng = np.random.default_rng(0)
    x_np = rng.standard_normal((args.batch, h, h, cin), np.float32)
    k_np = (rng.standard_normal((k, k, cin, cout)) / np.sqrt(k * k * cin)).astype(np.float32)
    g_np = rng.standard_normal((args.batch, ho, ho, cout), np.float32)
    calls: dict[str, tuple[Callable, Callable]] = {}
    for col in args.cols:
        if col.startswith("torch"):
            import torch

            cl = col.endswith("cl")
            _, tf, tfb = conv_microbench._torch_fns(s, p, channels_last=cl)

            def prep(a, cl=cl):
                t = torch.from_numpy(a.copy()).to(torch.bfloat16)
                return t.contiguous(memory_format=torch.channels_last) if cl else t

            tx = prep(x_np.transpose(0, 3, 1, 2)).requires_grad_()
            tk = torch.from_numpy(k_np.transpose(3, 2, 0, 1).copy()).to(torch.bfloat16)
            tk.requires_grad_()
            tg = prep(g_np.transpose(0, 3, 1, 2))
            calls[col] = (
                lambda tx=tx, tk=tk, tf=tf: tf(tx, tk),
                lambda tx=tx, tk=tk, tg=tg, tfb=tfb: tfb(tx, tk, tg),
            )
            continue
        f, fb, dt = _jax_fns(col, s, p)
        x, kern, g = (jnp.asarray(a, dt) for a in (x_np, k_np, g_np))
        calls[col] = (
            lambda f=f, x=x, kern=kern: jax.block_until_ready(f(x, kern)),
            lambda fb=fb, x=x, kern=kern, g=g: jax.block_until_ready(fb(x, kern, g)),
        )
    for fwd, fwd_bwd in calls.values():  # compile + warm up (oneDNN: primitive creation)
        fwd(), fwd_bwd(), fwd_bwd()
    times: dict[str, tuple[list[float], list[float]]] = {n: ([], []) for n in calls}
    for _ in range(args.reps):
        for n, pair in calls.items():
            for i, fn in enumerate(pair):
                time.sleep(0.02)
                t0 = time.perf_counter()
                fn()
                times[n][i].append(1e3 * (time.perf_counter() - t0))
    stat = {"median": statistics.median, "min": min}[args.stat]
    return {n: (stat(a), stat(b)) for n, (a, b) in times.items()}


def table(results: dict, cols: list[str], idx: int, title: str, args) -> str:
    """Markdown table of ms per call, ratios to the first column, and the uses-weighted sum."""
    base = cols[0]
    lines = [f"**{title}** (ms per call, {args.stat} of {args.reps}; ratio = {base} / column)", ""]
    lines += common.table(["shape", *cols, *(f"{base} / {c}" for c in cols[1:])])
    total = dict.fromkeys(cols, 0.0)
    for name, res in results.items():
        row = [f"{name}: {conv_microbench.describe(name)}"]
        row += [f"{res[c][idx]:.1f}" for c in cols]
        row += [f"{res[base][idx] / res[c][idx]:.2f}" for c in cols[1:]]
        for c in cols:
            total[c] += SHAPES[name][6] * res[c][idx]
        lines.append("| " + " | ".join(row) + " |")
    row = ["**sum x uses per net**", *(f"**{total[c]:.0f}**" for c in cols)]
    row += [f"**{total[base] / total[c]:.2f}**" for c in cols[1:]]
    lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = common.parser(__doc__)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES), help=f"of {list(SHAPES)}")
    ap.add_argument("--cols", nargs="*", default=[*COLS, "torch:bf16"])
    ap.add_argument("--stat", default="min", choices=["median", "min"])
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    args = ap.parse_args()
    if any(c.startswith("torch") for c in args.cols):
        import torch

        torch.set_num_threads(args.threads)
    print(
        f"jax {jax.__version__} cpus={os.cpu_count()} batch={args.batch} reps={args.reps} "
        f"stat={args.stat} loadavg={os.getloadavg()[0]:.1f}",
        flush=True,
    )
    results = {}
    for name in args.shapes:
        results[name] = bench_shape(name, args)
        cells = {n: f"{a:.1f}/{b:.1f}" for n, (a, b) in results[name].items()}
        print(name, conv_microbench.describe(name), cells, flush=True)
    print(f"\nloadavg at end {os.getloadavg()[0]:.1f}\n")
    print(table(results, args.cols, 0, "forward", args))
    print()
    print(table(results, args.cols, 1, "forward + backward (dx, dk)", args))
    print("\noneDNN primitives (op, shape, dtypes, implementation, operand strides, calls):\n")
    print(onednn_conv.info())


if __name__ == "__main__":
    main()
