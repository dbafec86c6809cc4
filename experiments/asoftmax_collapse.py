"""A-Softmax's feature-norm collapse: short FER2013 trainings at fixed lambda, next to softmax.

    python -m experiments.asoftmax_collapse --csv=/tmp/fer2013/fer2013.csv

Why: the paper recipe with SphereFace's per-step lambda schedule (lambda at its floor 5 after ~7
FER2013 epochs) trained to only 36.0% PrivateTest on an H200 (results/gpu_run_h200/), while the
softmax head learned normally. The A-Softmax target logit `|x| (lam cos + psi) / (1 + lam)` is
below the others until the features are discriminative, and this network's classifier input
(post-ReLU, average-pooled) can lower the loss to log K by shrinking |x| to 0, which kills the
final ReLUs for good. This script shows where that happens: every variant starts from the same
seed and sees the same batches (the real input pipeline, on the first `--examples` Training
rows); it logs loss, training accuracy and mean |x| every `--log_every` steps.

Variants `NAME=FIELD=VALUE,...` (config overrides of configs/fer2013.py, `--variant` repeatable).
Default: softmax, and A-Softmax (m=4) at lambda fixed to 48 (the end value of the default per-
epoch schedule at epoch 300), 15 and 5 (SphereFace's floor). Writes
experiments/results/asoftmax_collapse/asoftmax_collapse.{md,json}.
"""

from __future__ import annotations

import argparse
import functools
import os
import time
from typing import Any

import numpy as np

from experiments import paper_tables, provenance

DEFAULT_VARIANTS = (
    "softmax=model.head=softmax",
    "lambda48=loss.lambda_base=48,loss.lambda_gamma=0",
    "lambda15=loss.lambda_base=15,loss.lambda_gamma=0",
    "lambda5=loss.lambda_base=5,loss.lambda_gamma=0",
)


def parse_variant(spec: str) -> tuple[str, list[str]]:
    """'name=a.b=1,c.d=2' -> ('name', ['a.b=1', 'c.d=2'])."""
    name, sep, overrides = spec.partition("=")
    if not sep or not name:
        raise ValueError(f"--variant {spec!r}: expected NAME=FIELD=VALUE[,FIELD=VALUE...]")
    return name, [o for o in overrides.split(",") if o]


def variant_config(overrides: list[str], args: argparse.Namespace):
    from configs import fer2013

    config = fer2013.get_config()
    config.model.width = args.width
    config.batch_size = args.batch_size
    config.seed = args.seed
    for assignment in overrides:
        paper_tables.set_config_field(config, assignment)
    return config


def train_variant(config, images: np.ndarray, labels: np.ndarray, args) -> list[dict[str, Any]]:
    """`args.steps` training steps; one log row per `args.log_every` steps (means over them)."""
    import jax

    import data_pipelines
    from fer_jax import train

    model = train.create_model(config)
    steps_per_epoch = data_pipelines.steps_per_epoch(len(labels), config.batch_size)
    state = train.create_train_state(config, model, steps_per_epoch)
    step = jax.jit(
        functools.partial(train.train_step, config=config, axis_name=None), donate_argnums=0
    )
    batches = data_pipelines.train_dataset_from_arrays(
        images, labels, batch_size=config.batch_size, seed=config.seed
    ).as_numpy_iterator()
    rows, window, start = [], [], time.perf_counter()
    for i in range(args.steps):
        state, metrics = step(state, next(batches))
        window.append(metrics)
        if (i + 1) % args.log_every == 0 or i + 1 == args.steps:
            got = jax.device_get(window)
            row = {"step": i + 1, "seconds": round(time.perf_counter() - start, 1)}
            for key in ("loss", "accuracy", "feature_norm", "lambda"):
                row[key] = float(np.mean([m[key] for m in got]))
            rows.append(row)
            window = []
            print(
                f"  step {row['step']}: loss {row['loss']:.4f} acc {row['accuracy']:.3f} "
                f"|x| {row['feature_norm']:.4g} lambda {row['lambda']:.1f} ({row['seconds']} s)",
                flush=True,
            )
    return rows


def markdown(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> str:
    steps = [r["step"] for r in next(iter(results.values()))["log"]]
    head = "| variant | overrides | " + " | ".join(f"step {s}" for s in steps) + " |"
    lines = [
        "# A-Softmax feature-norm collapse: loss / mean |x| of the classifier input",
        f"Width {args.width}, batch {args.batch_size}, first {args.examples} FER2013 Training "
        f"rows, seed {args.seed}; each cell: training loss (mean over the last {args.log_every} "
        "steps) / mean |x|. log 7 = 1.946 is the loss of all-zero logits.",
        "",
        head,
        "|" + "---|" * (len(steps) + 2),
    ]
    for name, res in results.items():
        cells = [f"{r['loss']:.3f} / {r['feature_norm']:.3g}" for r in res["log"]]
        lines.append(
            f"| {name} | `{','.join(res['overrides']) or '-'}` | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--csv", required=True, help="fer2013.csv (or .tar.gz), see README")
    ap.add_argument("--examples", type=int, default=8000, help="first N Training rows")
    ap.add_argument("--variant", action="append", help="NAME=FIELD=VALUE,... (repeatable)")
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--batch_size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--log_every", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.path.join(paper_tables.REPO, "experiments", "results"))
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> str:
    from data_pipelines import fer2013_csv

    args = parse_args(argv)
    variants = [parse_variant(v) for v in (args.variant or DEFAULT_VARIANTS)]
    configs = {name: variant_config(overrides, args) for name, overrides in variants}
    prov = provenance.provenance()
    rows = fer2013_csv.read_fer2013(args.csv)
    train_rows = np.flatnonzero(rows.splits == "train")[: args.examples]
    images = rows.images[train_rows][..., None]
    labels = rows.labels[train_rows].astype(np.int32)
    results = {}
    for name, overrides in variants:
        print(f"{name}: {','.join(overrides)}", flush=True)
        log = train_variant(configs[name], images, labels, args)
        results[name] = {"overrides": overrides, "log": log}
    path = paper_tables.write_results(
        os.path.join(args.out, "asoftmax_collapse"),
        "asoftmax_collapse",
        markdown(results, args),
        {"settings": vars(args), "variants": results},
        prov,
    )
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
