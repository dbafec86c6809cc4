"""Where a train step's (and a ten-crop eval batch's) CPU time goes, fer_jax next to PyTorch.

    python -m experiments.profile_step                  # full width, batch 64, train and eval
    python -m experiments.profile_step --width 16 --steps 1 --no_eval   # quick look

Builds the same workloads as `experiments/benchmark.py` (its `JaxContestant` with
`conv_impl=auto` and the training step's XLA:CPU options; its `TorchContestant`: the reference
network, loss and optimizer, eager), warms them up, then profiles `--steps` steps of each in
turn, in this process:

- JAX: `jax.profiler` trace (perfetto JSON). XLA:CPU records every thunk's start and, for the
  asynchronous ones (convolutions), an `end:` mark; at each instant the wall time is split
  evenly between the thunks in flight, so the per-thunk times add up to the step's wall time.
  Each thunk gets a layer kind from its HLO `op_name` metadata (`conv` / `bn` / `cbam` / `relu`
  module paths, forward or backward).
- PyTorch: `torch.profiler`, self CPU time per `aten::` op, mapped to the same kinds by op name
  (its elementwise `mul` / `add`, e.g. CBAM's gating and the residual sums, land in "other").

"convolution backward" is, for fer_jax, the input and weight gradients XLA runs as convolutions
and the Winograd input gradients (`fer_jax.model.conv`'s `winograd` name scope; its forwards count
as "convolution forward"); the rest of the weight gradients are the matmul row
(`weight_grad_matmul` scope). For PyTorch: its whole convolution backward.
XLA's weight-gradient convolutions carry no op_name; a convolution without one counts as backward.
The JAX profiler slows the step by ~15%: the table's wall times are the profiled ones. The
JaxContestant calls `fer_jax.host_memory.reuse_scratch_memory()`, so PyTorch, in the same
process, runs with glibc's mmap off too.

Prints and writes (`--out`, default experiments/results/profile_step_cpu/) a table of ms per
step by kind for both, and the top thunks / ops. Only kinds, not single ops, compare across the
two: XLA fuses several operations into one thunk and the BatchNorm backward's sums are dots.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time
from typing import Any

from experiments import benchmark, common, provenance

KINDS = (
    "convolution forward",
    "convolution backward",
    "weight gradient as matmuls (fer_jax)",
    "BatchNorm",
    "CBAM pooling, MLP and gates",
    "ReLU",
    "other: loss, head, optimizer (PyTorch: also every elementwise mul/add)",
    "no source recorded",
)


def jax_kind(thunk: str, op_name: str) -> str:
    """The layer kind of one XLA thunk, from its name and its HLO `op_name` metadata."""
    backward = "transpose(" in op_name
    path = op_name.split("/")
    if "winograd" in path:  # fer_jax.model.conv's Winograd forward and input gradient
        return "convolution backward" if backward else "convolution forward"
    if "weight_grad_matmul" in path or "/while" in op_name or thunk.startswith("while"):
        return "weight gradient as matmuls (fer_jax)"
    if thunk.startswith(("conv", "convolution")):
        # XLA drops the op_name of the weight-gradient convolutions it builds from transposes
        # (`convolution.N`, `convolution-window-dilated`): no source means backward too.
        return "convolution backward" if backward or not op_name else "convolution forward"
    if not op_name:
        return "no source recorded"
    if any(p in ("bn", "bn1", "bn2", "shortcut_bn") for p in path):
        return "BatchNorm"
    if "cbam" in path:
        return "CBAM pooling, MLP and gates"
    if "relu" in op_name or "select_n" in op_name:
        return "ReLU"
    return KINDS[-2]


def torch_kind(op: str) -> str:
    """The layer kind of one PyTorch op (self time)."""
    if op in ("aten::mkldnn_convolution", "aten::_convolution", "aten::convolution"):
        return "convolution forward"
    if op == "aten::convolution_backward" or "ConvolutionBackward" in op:
        return "convolution backward"
    if "batch_norm" in op or "BatchNorm" in op:
        return "BatchNorm"
    if op in ("aten::max", "aten::max_pool2d_with_indices", "aten::avg_pool2d", "aten::sigmoid"):
        return "CBAM pooling, MLP and gates"
    if "threshold" in op or "relu" in op.lower() or op == "aten::clamp_min":
        return "ReLU"
    return KINDS[-2]


def _thunk_intervals(events: list[dict]) -> list[tuple[float, float, str]]:
    """(start, end, name) in microseconds of every thunk that has an `end:` mark."""
    ends = collections.defaultdict(list)
    for e in events:
        if e["name"].startswith("end: "):
            ends[e["name"][5:]].append(e["ts"])
    for times in ends.values():
        times.sort()
    out = []
    for e in events:
        times = ends.get(e["name"])
        if times:
            later = [t for t in times if t >= e["ts"]]
            if later:
                out.append((e["ts"], later[0], e["name"]))
    return out


def split_wall_time(intervals: list[tuple[float, float, str]]) -> tuple[dict[str, float], float]:
    """Each thunk's share of the wall time (us; concurrent thunks split it evenly) and the time
    with none in flight."""
    marks = sorted([(s, 1, n) for s, _, n in intervals] + [(e, -1, n) for _, e, n in intervals])
    active: collections.Counter = collections.Counter()
    share: dict[str, float] = collections.defaultdict(float)
    idle, last = 0.0, None
    for t, delta, name in marks:
        if last is not None and t > last:
            k = sum(active.values())
            if k:
                for n, c in active.items():
                    share[n] += (t - last) * c / k
            else:
                idle += t - last
        active[name] += delta
        if not active[name]:
            del active[name]
        last = t
    return dict(share), idle


def profile_jax(contestant: benchmark.JaxContestant, what: str, steps: int) -> dict[str, Any]:
    """ms per step by kind and the top thunks for `what` ('train' or 'eval')."""
    import jax

    fn = contestant.train_fn if what == "train" else contestant.eval_fn
    metadata = {
        m.group(1): m.group(2)
        for m in re.finditer(
            r"^\s*(?:ROOT )?%?([\w.\-]+) = [^\n]*?metadata=\{op_name=\"([^\"]+)\"",
            fn.as_text(),
            re.M,
        )
    }
    run = {"train": contestant.train, "eval": contestant.evaluate}[what]
    run(1)
    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d, create_perfetto_trace=True)
        t = time.perf_counter()
        run(steps)
        wall = time.perf_counter() - t
        jax.profiler.stop_trace()
        (path,) = glob.glob(os.path.join(d, "**", "perfetto_trace.json.gz"), recursive=True)
        with gzip.open(path) as f:
            trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    share, idle = split_wall_time(_thunk_intervals([e for e in events if e.get("ph") == "X"]))
    by_kind: dict[str, float] = collections.defaultdict(float)
    for name, us in share.items():
        by_kind[jax_kind(name, metadata.get(name, ""))] += us / 1e3 / steps
    top = sorted(share.items(), key=lambda kv: -kv[1])[:15]
    return {
        "wall_ms_per_step": 1e3 * wall / steps,
        "idle_ms_per_step": idle / 1e3 / steps,
        "by_kind": dict(by_kind),
        "top": [(n, us / 1e3 / steps, metadata.get(n, "")) for n, us in top],
    }


def profile_torch(contestant: benchmark.TorchContestant, what: str, steps: int) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile

    run = {"train": contestant.train, "eval": contestant.evaluate}[what]
    run(1)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        run(steps)
        wall = time.perf_counter() - t
    by_kind: dict[str, float] = collections.defaultdict(float)
    ops = []
    for avg in prof.key_averages():
        ms = avg.self_cpu_time_total / 1e3 / steps
        by_kind[torch_kind(avg.key)] += ms
        ops.append((avg.key, ms, ""))
    return {
        "wall_ms_per_step": 1e3 * wall / steps,
        "by_kind": dict(by_kind),
        "top": sorted(ops, key=lambda o: -o[1])[:15],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = common.parser(__doc__)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--eval_batch", type=int, default=16, help="images (x10 crops) per batch")
    ap.add_argument("--steps", type=int, default=2, help="profiled steps (and eval batches)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--no_eval", dest="eval", action="store_false")
    ap.add_argument("--no_torch", dest="torch", action="store_false")
    common.add_out(ap, help="default: experiments/results/profile_step_<platform>/")
    args = ap.parse_args(argv)
    bench_args = argparse.Namespace(**vars(args), cbam="channel_first", head="a_softmax")
    contestants = {"fer_jax": benchmark.JaxContestant("auto+eigen", bench_args)}
    if args.torch:
        sys.path.insert(0, provenance.REPO)
        contestants["torch"] = benchmark.TorchContestant(bench_args)
    results: dict[str, Any] = {}
    for what in ("train", "eval") if args.eval else ("train",):
        for name, c in contestants.items():
            profile = profile_jax if name == "fer_jax" else profile_torch
            results[f"{what}/{name}"] = profile(c, what, args.steps)
            print(f"{what} {name}: {results[f'{what}/{name}']['wall_ms_per_step']:.0f} ms/step")

    header = ["kind (ms per step)"] + list(results)
    rows = [
        [kind] + [f"{r['by_kind'].get(kind, 0.0):.0f}" for r in results.values()] for kind in KINDS
    ]
    rows.append(["**wall time**"] + [f"**{r['wall_ms_per_step']:.0f}**" for r in results.values()])
    heading = (
        f"Per-kind time of a train step (batch {args.batch}) and a ten-crop eval batch "
        f"({args.eval_batch} x 10 crops), width {args.width}, float32, {provenance.cpu_model()}, "
        f"mean of {args.steps} profiled steps."
    )
    out = common.write_table(
        "profile_step", heading, header, rows, {"args": vars(args), "results": results}, args.out
    )
    with open(os.path.join(out, "table.md"), "a") as f:
        for key, r in results.items():
            f.write(f"\nTop items, {key} (ms per step):\n\n")
            for name, ms, source in r["top"]:
                f.write(f"- {ms:.1f} `{name}` {source}\n")
    return results


if __name__ == "__main__":
    main()
