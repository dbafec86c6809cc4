"""The two input modes of `fer_jax.training.train.fit` side by side: training and ten-crop
evaluation speed.

    python -m experiments.input_modes [--width 64] [--batch 64] [--steps 12] [--reps 2] \
        [--modes device tf_data device:8] [--out experiments/results/input_pipeline_cpu]

A mode is `device` or `tf_data`, `device:K` with K steps per call (`config.steps_per_dispatch`;
plain `device` takes the platform's default).

Each repetition runs, for each mode in turn, one epoch of `--steps` steps of the paper's
network (FER2013-sized 48x48 uint8 images, generated) through the product's own `fit`, and
takes its `performance` figures (training images/s without compiles, saves or evaluations),
then times two ten-crop evaluations of `--eval_images` images (`job.evaluate`,
`fer_jax.training.train.create_job`; the second one counted). Modes alternate within a
repetition, so machine noise hits both alike; the median over repetitions is reported. Writes
`results.md` and `results.json` under `--out`, with the CPU model and load averages.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from typing import Any

MODES = ("device", "tf_data")


def run_mode(mode: str, args: argparse.Namespace, data: dict, eval_data: dict) -> dict[str, Any]:
    """One epoch of training and two evaluations with `config.input_pipeline = mode`."""
    from configs import fer2013
    from fer_jax.training.train import create_job, fit

    config = fer2013.get_config()
    config.input_pipeline, _, steps_per_dispatch = mode.partition(":")
    config.steps_per_dispatch = int(steps_per_dispatch or 0)
    config.model.width = args.width
    config.batch_size = args.batch
    config.eval_batch_size = args.eval_batch
    config.num_epochs = 1
    config.log_every_steps = args.steps
    config.cross_validate = False
    job = create_job(config)
    with tempfile.TemporaryDirectory() as workdir:
        out = fit(job, workdir, data["image"], data["label"])
    state = job.devices.replicate(out["state"])
    seconds = []
    for _ in range(2):
        start = time.perf_counter()
        job.evaluate(state, eval_data["image"], eval_data["label"])
        seconds.append(time.perf_counter() - start)
    perf = out["performance"]
    return {
        "train_images_per_s": perf["train_images_per_s"],
        "compile_train_s": perf["compile_seconds"]["train"],
        "tencrop_crops_per_s": 10 * len(eval_data["label"]) / seconds[-1],
        "steps_per_dispatch": perf["steps_per_dispatch"],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=12, help="training steps per measurement")
    parser.add_argument("--eval_images", type=int, default=512)
    parser.add_argument("--eval_batch", type=int, default=128)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--modes", nargs="+", default=list(MODES), help="device[:K], tf_data")
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    for mode in args.modes:
        name, colon, steps = mode.partition(":")
        if name not in MODES or (colon and (name != "device" or not steps.isdigit())):
            parser.error(f"--modes: {mode!r} is not device, device:K or tf_data")

    from experiments import common, provenance
    from fer_jax.training import synthetic_data

    data = synthetic_data.make_split(args.batch * args.steps, seed=0)
    eval_data = synthetic_data.make_split(args.eval_images, seed=1)
    load_before = os.getloadavg()
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in args.modes}
    for rep in range(args.reps):
        for mode in args.modes:
            result = run_mode(mode, args, data, eval_data)
            runs[mode].append(result)
            print(f"rep {rep} {mode}: {json.dumps(result)}", flush=True)
    summary = {
        mode: {
            key: statistics.median(r[key] for r in results)
            for key in ("train_images_per_s", "tencrop_crops_per_s", "compile_train_s")
        }
        for mode, results in runs.items()
    }
    report = {
        "provenance": provenance.provenance(argv=argv),
        "load_average_before_after": [load_before, os.getloadavg()],
        "args": vars(args),
        "runs": runs,
        "median": summary,
    }
    lines = [
        f"Input modes of `fer_jax.training.train.fit`, width {args.width}, batch {args.batch}, "
        f"{args.steps} steps x {args.reps} repetitions (median), CPU: "
        f"{report['provenance']['hardware']['cpu_model']}",
        "",
        *common.table(
            ["mode", "steps per call", "training images/s", "ten-crop crops/s", "train compile s"],
            [
                [mode, runs[mode][0]["steps_per_dispatch"], f"{med['train_images_per_s']:.2f}"]
                + [f"{med['tencrop_crops_per_s']:.1f}", f"{med['compile_train_s']:.1f}"]
                for mode, med in summary.items()
            ],
        ),
    ]
    if set(MODES) <= set(summary):
        ratio = summary["device"]["train_images_per_s"] / summary["tf_data"]["train_images_per_s"]
        eval_ratio = (
            summary["device"]["tencrop_crops_per_s"] / summary["tf_data"]["tencrop_crops_per_s"]
        )
        lines += ["", f"device / tf_data: training {ratio:.2f}x, ten-crop {eval_ratio:.2f}x"]
    lines += ["", f"load average before, after: {load_before}, {os.getloadavg()}"]
    text = "\n".join(lines)
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        common.save_json(os.path.join(args.out, "results.json"), report, default=str)
        with open(os.path.join(args.out, "results.md"), "w") as f:
            f.write(text + "\n\n" + provenance.markdown(report["provenance"]) + "\n")
    return report


if __name__ == "__main__":
    main()
