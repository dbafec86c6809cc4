"""Faces per second of the recogniser, ten crops against the centre crop, side by side.

    python -m experiments.predict_speed                 # full width, 64 faces per call
    python -m experiments.predict_speed --width 16 --faces 16 --reps 3

A randomly initialised full-width model (`fer_jax.resnet.ResNet18`; speed does not depend on
the weights) in `fer_jax.recognizer.Recognizer` with `crops=10` and `crops=1`, each compiled
and warmed up first, then timed in turn (`--reps` rounds, median) on the same `--faces`
random 48x48 faces, one `predict_faces` call of `--faces` faces per round. Writes the table
to `--out` (default experiments/results/predict_speed_<platform>/).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments import provenance


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--faces", type=int, default=64, help="faces per call (the batch size)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", help="results folder")
    args = ap.parse_args()

    from fer_jax.recognizer import CROP_CHOICES, Recognizer
    from fer_jax.resnet import ResNet18

    model = ResNet18(width=args.width, cbam="channel_first", head="a_softmax")
    variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 44, 44, 1)))
    faces = np.random.default_rng(0).integers(0, 256, (args.faces, 48, 48), np.uint8)
    recognizers = {
        c: Recognizer(model, variables, batch_size=args.faces, crops=c) for c in CROP_CHOICES
    }
    times: dict[int, list[float]] = {c: [] for c in CROP_CHOICES}
    for r in recognizers.values():
        r.predict_faces(faces)  # compile + warm-up
    for _ in range(args.reps):
        for c, r in recognizers.items():
            start = time.perf_counter()
            r.predict_faces(faces)
            times[c].append(time.perf_counter() - start)
    device = jax.devices()[0]
    rates = {c: args.faces / statistics.median(t) for c, t in times.items()}
    provenance.write_table(
        "predict_speed",
        f"Device: {device.platform} {device.device_kind}; {provenance.cpu_model()}; "
        f"width {args.width}, {args.faces} faces per call, median of {args.reps}",
        ["crops", "faces/s", "vs ten crops"],
        [[c, f"{rates[c]:.1f}", f"{rates[c] / rates[10]:.2f}x"] for c in CROP_CHOICES],
        {"args": vars(args), "seconds": times},
        args.out,
    )


if __name__ == "__main__":
    main()
