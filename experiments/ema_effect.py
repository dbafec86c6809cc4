"""What the moving average of the weights adds: a checkpoint's raw and averaged weights compared.

    python -m experiments.ema_effect --run=runs/fer2013_cpu_cycle6 --manual_dir=/path/to/fer2013 \
        [--crops 1 10] [--out=experiments/results/NAME]

A run trained with `config.ema_decay > 0` saves both the weights SGD reached and their moving
average ('ema'); selection, the report and everything that reads the checkpoint use the
average. This scores both, from the run's selected checkpoint (`best/`, else its latest), on
PublicTest and PrivateTest (accuracy and mean per-class recall, the recognizer's ten crops
and/or centre crop, float32), so that the average's share of a cycle's gain is a measured
figure. Writes table.md and raw.json to `--out`.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from experiments import common

SPLITS = ("public_test", "private_test")


def restore(run: str) -> tuple[int, dict[str, Any], dict[str, Any]]:
    """`(step, {'raw': variables, 'ema': variables}, meta)` of the run's selected checkpoint
    (`checkpoint.load_variables`: `best/`, else the latest).

    Raises SystemExit when there is no checkpoint, or it has no moving average."""
    from fer_jax.training import checkpoint

    try:
        ema, meta, source = checkpoint.load_variables(run)
        raw, _, _ = checkpoint.load_variables(source, average=False)
    except (FileNotFoundError, checkpoint.CheckpointError) as e:
        raise SystemExit(f"error: {run}: {e}") from e
    if not meta.get("ema"):
        raise SystemExit(f"error: {source} has no moving average: the run had no ema_decay")
    return meta["step"], {"raw": raw, "ema": ema}, meta


def score(probabilities: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Accuracy, mean per-class recall and per-class recall of `(N, K)` probabilities
    (`prior_adjustment.recalls`)."""
    from fer_jax.inference.prior_adjustment import recalls

    accuracy, recall = recalls(probabilities, labels)
    return {
        "accuracy": accuracy,
        "mean_class_accuracy": float(np.mean(recall)),
        "per_class_accuracy": [float(r) for r in recall],
        "num_examples": int(np.size(labels)),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = common.parser(__doc__)
    ap.add_argument("--run", required=True, help="a workdir trained with config.ema_decay > 0")
    common.add_manual_dir(ap, help="folder with fer2013.csv")
    ap.add_argument("--crops", type=int, nargs="+", default=[1], choices=[1, 10])
    common.add_out(ap, help="results folder (default: experiments/results/ema_effect_<platform>)")
    args = ap.parse_args(argv)

    from data_pipelines.files import load_split_from_files
    from data_pipelines.labels import CLASS_NAMES
    from fer_jax import host_memory
    from fer_jax.inference.recognizer import Recognizer
    from fer_jax.model.resnet import model_from_config

    host_memory.reuse_scratch_memory()
    step, weights, meta = restore(args.run)
    model = model_from_config(meta["model"], dropout_rate=0.0)
    data = {s: load_split_from_files("fer2013", s, args.manual_dir) for s in SPLITS}
    results: dict[str, Any] = {}
    for kind, variables in weights.items():
        for crops in args.crops:
            recognizer = Recognizer(model, variables, crops=crops, matmul_dtype="float32")
            for split in SPLITS:
                faces, labels = data[split]["image"][..., 0], data[split]["label"]
                metrics = score(recognizer.predict_faces(faces), labels)
                results[f"{kind}/{split}/{crops}"] = metrics
                print(
                    f"{kind} {split} crops={crops}: {100 * metrics['accuracy']:.2f}% "
                    f"(mean class recall {100 * metrics['mean_class_accuracy']:.2f}%)",
                    flush=True,
                )
    header = [
        "weights",
        "crops",
        "PublicTest",
        "PrivateTest",
        "PublicTest mean recall",
        "PrivateTest mean recall",
    ]
    rows = []
    for kind in weights:
        for crops in args.crops:
            r = [results[f"{kind}/{s}/{crops}"] for s in SPLITS]
            rows.append(
                [kind, crops]
                + [f"{100 * x['accuracy']:.2f}%" for x in r]
                + [f"{100 * x['mean_class_accuracy']:.2f}%" for x in r]
            )
    raw = {
        "run": os.path.abspath(args.run),
        "step": step,
        "results": results,
        "class_names": list(CLASS_NAMES),
    }
    heading = f"Raw and averaged (EMA) weights of {args.run}, step {step} (float32)"
    common.write_table("ema_effect", heading, header, rows, raw, args.out)
    return raw


if __name__ == "__main__":
    main()
