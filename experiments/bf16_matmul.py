"""bfloat16 vs float32 matmuls at the Winograd shapes of the four stages: does this CPU pay?

    python -m experiments.bf16_matmul [--reps 5] [--out experiments/results/bf16_matmul_<cpu>]

For each stage (batch 64: 44x44x64, 22x22x128, 11x11x256, 6x6x512) it times the 16 batched
`(tiles, C) @ (C, C)` matmuls of one Winograd convolution, as `fer_jax.model.conv` runs them:
float32, and bfloat16 operands with float32 accumulation (`preferred_element_type`, what
`conv_impl='...:bf16'` / `model.matmul_dtype` select). Prints GFLOP/s and the ratio, names the
CPU and its bf16 flags (amx_bf16, avx512_bf16), and writes `results.json` + `results.md`.
Median of `--reps` timed calls after one warm-up; run it on a quiet machine.
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments import common, provenance
from fer_jax.model import resnet

# (tiles = 64 images x (H/2)^2, channels) of the stride-1 3x3 convolutions of each stage.
SHAPES = ((64 * 22 * 22, 64), (64 * 11 * 11, 128), (64 * 6 * 6, 256), (64 * 3 * 3, 512))


def _time(fn, *args, reps: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def measure(reps: int) -> list[dict]:
    rows = []
    for tiles, c in SHAPES:
        rng = np.random.default_rng(0)
        a = jnp.asarray(rng.standard_normal((16, tiles, c)), jnp.float32)
        b = jnp.asarray(rng.standard_normal((16, c, c)), jnp.float32)
        f32 = jax.jit(lambda x, y: jnp.matmul(x, y))
        bf16 = jax.jit(
            lambda x, y: jnp.matmul(
                x.astype(jnp.bfloat16), y.astype(jnp.bfloat16), preferred_element_type=jnp.float32
            )
        )
        flops = 2 * 16 * tiles * c * c
        t32, t16 = _time(f32, a, b, reps=reps), _time(bf16, a, b, reps=reps)
        rows.append(
            {
                "shape": f"16 x ({tiles}x{c}) @ ({c}x{c})",
                "float32_gflops": flops / t32 / 1e9,
                "bfloat16_gflops": flops / t16 / 1e9,
                "ratio": t32 / t16,
            }
        )
        print(
            f"{rows[-1]['shape']:>32}: float32 {rows[-1]['float32_gflops']:7.1f}  "
            f"bf16->f32 {rows[-1]['bfloat16_gflops']:7.1f} GFLOP/s  ({rows[-1]['ratio']:.2f}x)"
        )
    return rows


def main() -> None:
    parser = common.parser(__doc__)
    parser.add_argument("--reps", type=int, default=5)
    common.add_out(parser, help="results folder (default: none written)")
    args = parser.parse_args()
    flags = resnet.cpu_flags()
    bf16_flags = sorted(f for f in flags if "bf16" in f)
    print(
        f"bf16 flags of this CPU: {bf16_flags or 'none'}; matmul_dtype='auto' -> "
        f"{'bfloat16' if resnet.matmul_bf16('auto') else 'float32'}"
    )
    rows = measure(args.reps)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        data = {"rows": rows, "bf16_flags": bf16_flags, "provenance": provenance.provenance()}
        common.save_json(os.path.join(args.out, "results.json"), data, indent=2)
        lines = common.table(
            ["matmuls", "float32 GFLOP/s", "bf16 operands, f32 accumulation", "ratio"],
            [
                [r["shape"], f"{r['float32_gflops']:.1f}", f"{r['bfloat16_gflops']:.1f}"]
                + [f"{r['ratio']:.2f}x"]
                for r in rows
            ],
        )
        with open(os.path.join(args.out, "results.md"), "w") as f:
            f.write(f"bf16 CPU flags: {bf16_flags or 'none'}\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
