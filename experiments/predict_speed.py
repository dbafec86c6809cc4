"""Faces per second of the recogniser (ten crops, the centre crop) and of its StableHLO export.

    python -m experiments.predict_speed                 # full width, 64 faces per call
    python -m experiments.predict_speed --width 16 --faces 16 --reps 3

A randomly initialised full-width model (`fer_jax.model.resnet.ResNet18`; speed does not depend on
the weights) in `fer_jax.inference.recognizer.Recognizer` with `crops=10` and `crops=1`, each
compiled and warmed up first, then timed in turn (`--reps` rounds, median) on the same `--faces`
random 48x48 faces, one `predict_faces` call of `--faces` faces per round. Alongside, the same
model exported by `fer_jax.inference.export` (ten crops, `model.stablehlo`), serialised,
deserialised and run as a user without this code would, `jax.jit(exported.call)`, and with the
XLA:CPU option the recogniser compiles with (`fer_jax.model.conv.cpu_compiler_options()`, i.e.
`XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=individual_dot`); and the recogniser called
with one face at a time (as video frames arrive: would batching faces across frames pay?).
Writes the table to
`--out` (default experiments/results/predict_speed_<platform>/).
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments import common, provenance


def main() -> None:
    ap = common.parser(__doc__)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--faces", type=int, default=64, help="faces per call (the batch size)")
    ap.add_argument("--reps", type=int, default=5)
    common.add_out(ap)
    args = ap.parse_args()

    from data_pipelines.crops import CROP_CHOICES
    from fer_jax.inference import export
    from fer_jax.inference.recognizer import Recognizer
    from fer_jax.model import conv
    from fer_jax.model.resnet import ResNet18

    model = ResNet18(width=args.width, cbam="channel_first", head="a_softmax")
    variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 44, 44, 1)))
    faces = np.random.default_rng(0).integers(0, 256, (args.faces, 48, 48), np.uint8)
    recognizers = {
        f"recognizer, {c} crop{'s' * (c > 1)}": Recognizer(
            model, variables, batch_size=args.faces, crops=c
        ).predict_faces
        for c in sorted(CROP_CHOICES, reverse=True)
    }
    # One face per call, as a video's frames come one at a time: does batching faces pay?
    one_at_a_time = recognizers["recognizer, 10 crops"]
    recognizers["recognizer, 10 crops, one face per call"] = lambda f: [
        one_at_a_time(f[i : i + 1]) for i in range(len(f))
    ]
    exported = jax.export.deserialize(export.export_stablehlo(model, variables).serialize())
    as_input = jax.jit(lambda f: f[..., None].astype(jnp.float32) / 255.0)
    for name, opts in (("default", None), ("Eigen option", conv.cpu_compiler_options())):
        call = jax.jit(exported.call, compiler_options=opts)
        recognizers[f"StableHLO export, 10 crops, {name}"] = lambda f, call=call: np.asarray(
            call(as_input(f))
        )
    times: dict[str, list[float]] = {name: [] for name in recognizers}
    for predict in recognizers.values():
        predict(faces)  # compile + warm-up
    for _ in range(args.reps):
        for name, predict in recognizers.items():
            start = time.perf_counter()
            predict(faces)
            times[name].append(time.perf_counter() - start)
    device = jax.devices()[0]
    rates = {name: args.faces / statistics.median(t) for name, t in times.items()}
    ten = rates["recognizer, 10 crops"]
    common.write_table(
        "predict_speed",
        f"Device: {device.platform} {device.device_kind}; {provenance.cpu_model()}; "
        f"width {args.width}, {args.faces} faces per call, median of {args.reps}",
        ["contestant", "faces/s", "vs the recogniser's ten crops"],
        [[name, f"{rate:.1f}", f"{rate / ten:.2f}x"] for name, rate in rates.items()],
        {"args": vars(args), "seconds": times},
        args.out,
    )


if __name__ == "__main__":
    main()
