"""Aggregate training speed of K replicas against one run, side by side in one process.

    python -m experiments.replica_speed                     # full width, K = 1 and 4, batch 64
    python -m experiments.replica_speed --replica_maps vmap unroll   # both ways for K = 4
    python -m experiments.replica_speed --width 16 --replicas 1 2 4 --steps 2 --reps 2

Each K gets the job's own training function (`fer_jax.training.device_input.DeviceInput.train_fn`,
the device input, `steps_per_dispatch` of the platform unless `--steps_per_dispatch`), compiled
and warmed up first on FER2013-sized random uint8 images; then the K's are timed in turn
(`--reps` rounds of `--steps` steps each, median), so load from elsewhere hits all alike.
Reports aggregate training images/s (K x batch per step) and the ratio to K = 1, and writes
the table and raw figures to `--out` (default experiments/results/replicas_<platform>/).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np

from experiments import common, provenance


def _job(k: int, replica_map: str, args: argparse.Namespace):
    from configs import fer2013
    from data_pipelines.plan import epoch_plan
    from fer_jax.training import device_input
    from fer_jax.training.train import create_job

    config = fer2013.get_config()
    config.model.width = args.width
    config.batch_size = args.batch
    config.replicas = k
    config.replica_map = replica_map
    config.steps_per_dispatch = args.steps_per_dispatch
    job = create_job(config)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.images, 48, 48, 1), np.uint8)
    labels = rng.integers(0, 7, args.images).astype(np.int32)
    data = device_input.put_train_arrays(job.devices, images, labels)
    fn = job.train_fn(data.layout)
    steps_per_epoch = args.images // args.batch
    state = job.devices.replicate(job.models.create_state(job.model, 448))
    plan = job.models.epoch_plan(lambda s: epoch_plan(args.images, args.batch, seed=s, epoch=0))
    per_call = job.steps_per_dispatch
    calls = max(1, args.steps // per_call)
    rows = [
        job.devices.place(
            device_input.plan_chunk(plan, (i * per_call) % steps_per_epoch, per_call), None
        )
        for i in range(calls)
    ]

    def run(state):
        for r in rows:
            state, _ = fn(state, data.images, data.labels, r)
        return jax.block_until_ready(state)

    return job, state, run, calls * per_call


def main() -> None:
    ap = common.parser(__doc__)
    ap.add_argument("--replicas", type=int, nargs="+", default=[1, 4])
    ap.add_argument(
        "--replica_maps",
        nargs="+",
        default=[""],
        help="config.replica_map values to time for each K > 1 ('' = the platform's)",
    )
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--batch", type=int, default=64, help="per replica")
    ap.add_argument("--images", type=int, default=1024, help="random training images")
    ap.add_argument("--steps", type=int, default=2, help="steps per timed round")
    ap.add_argument("--reps", type=int, default=3, help="timed rounds (median)")
    ap.add_argument("--steps_per_dispatch", type=int, default=0, help="0: the platform's")
    common.add_out(ap)
    args = ap.parse_args()

    runs = {}
    cases = [(k, m) for k in args.replicas for m in (args.replica_maps if k > 1 else [""])]
    for k, replica_map in cases:
        start = time.perf_counter()
        job, state, run, steps = _job(k, replica_map, args)
        state = run(state)  # compile + warm-up
        name = f"{k}" if k == 1 else f"{k} ({job.models.map_kind})"
        runs[name] = {
            "k": k,
            "job": job,
            "state": state,
            "run": run,
            "steps": steps,
            "setup_s": time.perf_counter() - start,
            "times": [],
        }
        print(f"K={name}: ready in {runs[name]['setup_s']:.1f} s", flush=True)
    for _ in range(args.reps):
        for r in runs.values():
            start = time.perf_counter()
            r["state"] = r["run"](r["state"])
            r["times"].append(time.perf_counter() - start)
    device = jax.devices()[0]
    rows, raw = [], {}
    base = None
    for name, r in runs.items():
        k = r["k"]
        seconds = statistics.median(r["times"])
        ips = k * args.batch * r["steps"] / seconds
        base = base or (ips if k == 1 else None)
        raw[name] = {
            "aggregate_images_per_s": ips,
            "step_seconds": seconds / r["steps"],
            "times": r["times"],
            "steps_per_round": r["steps"],
            "steps_per_dispatch": r["job"].steps_per_dispatch,
            "setup_and_compile_s": r["setup_s"],
            "compile_s": r["job"].compile_seconds["train"],
        }
        ratio = f"{ips / base:.2f}x" if base else "-"
        compile_s = r["job"].compile_seconds["train"]
        rows.append(
            [name, f"{ips:.1f}", f"{1000 * seconds / r['steps']:.0f}", ratio, f"{compile_s:.0f}"]
        )
    common.write_table(
        "replicas",
        f"Device: {device.platform} {device.device_kind}; {provenance.cpu_model()}; "
        f"width {args.width}, batch {args.batch} per replica",
        ["replicas K (map)", "aggregate train images/s", "ms per step", "vs K = 1", "compile s"],
        rows,
        {"args": vars(args), "runs": raw},
        args.out,
    )


if __name__ == "__main__":
    main()
