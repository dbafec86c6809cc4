"""A-Softmax's feature-norm collapse: short FER2013 trainings at fixed lambda, next to softmax.

    python -m experiments.asoftmax_collapse --csv=/tmp/fer2013/fer2013.csv

Why: the paper recipe with SphereFace's per-step lambda schedule (lambda at its floor 5 after ~7
FER2013 epochs) trained to only 36.0% PrivateTest on an H200 (results/gpu_run_h200/), while the
softmax head learned normally. The A-Softmax target logit `|x| (lam cos + psi) / (1 + lam)` is
below the others until the features are discriminative, and this network's classifier input
(post-ReLU, average-pooled) can lower the loss to log K by shrinking |x| to 0, which kills the
final ReLUs for good. This script shows where that happens: every variant starts from the same
seed and sees the same batches, and trains `--steps` steps through the repository's training
loop, `fer_jax.training.train.fit` (no evaluation, no JAFFE cross-validation), in its own workdir
(under
`--workdir_root`, else a temporary directory). The table is read back from the TensorBoard
scalars `fit` logs every `--log_every` steps (`experiments.tb_curves.read_scalars`): loss,
training accuracy and mean |x| at each logged step, each the mean over the steps since the
previous logged step (as the earlier, hand-written loop of this script logged them).

`fit` trains whole epochs, so the epoch is shortened until it divides `--steps`: of the first
`--examples` FER2013 Training rows, the first `steps_per_epoch * batch_size` are trained on, with
`steps_per_epoch` the largest divisor of `--steps` that fits in them and is a multiple of
`--log_every` (or is `--steps` itself), so that every window but the last is `--log_every` steps
(`epoch_steps`). Defaults: 8000 rows, batch 64 -> 100 steps (the first 6400 rows) per epoch,
4 epochs for the 400 steps. The earlier loop went on through the 8000 rows (125 steps per epoch),
so its batches (epoch permutations of 8000 rows, not 6400) differ from these. Epoch-based
schedules (learning rate, `loss.lambda_per='epoch'`) count these shorter epochs.

Variants `NAME=FIELD=VALUE,...` (config overrides of configs/fer2013.py, `--variant` repeatable).
Default: softmax, and A-Softmax (m=4) at lambda fixed to 48 (the end value of the default per-
epoch schedule at epoch 300), 15 and 5 (SphereFace's floor). Writes
experiments/results/asoftmax_collapse/asoftmax_collapse.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from typing import Any

import numpy as np

from experiments import common, paper_tables, provenance, tb_curves

DEFAULT_VARIANTS = (
    "softmax=model.head=softmax",
    "lambda48=loss.lambda_base=48,loss.lambda_gamma=0",
    "lambda15=loss.lambda_base=15,loss.lambda_gamma=0",
    "lambda5=loss.lambda_base=5,loss.lambda_gamma=0",
)
# The metrics of `steps.train_step` that `fit` logs as `train_<key>` scalars, kept per log row.
LOGGED = ("loss", "accuracy", "feature_norm", "lambda", "learning_rate")
SETTINGS_FILE = "asoftmax_collapse_run.json"


def parse_variant(spec: str) -> tuple[str, list[str]]:
    """'name=a.b=1,c.d=2' -> ('name', ['a.b=1', 'c.d=2'])."""
    name, sep, overrides = spec.partition("=")
    if not sep or not name:
        raise ValueError(f"--variant {spec!r}: expected NAME=FIELD=VALUE[,FIELD=VALUE...]")
    if "/" in name or name in (".", ".."):
        raise ValueError(f"--variant {spec!r}: NAME names the variant's workdir, no '/'")
    return name, [o for o in overrides.split(",") if o]


def variant_config(overrides: list[str], args: argparse.Namespace):
    """configs/fer2013.py at the script's width, batch and seed, then the variant's overrides."""
    from configs import fer2013

    config = fer2013.get_config()
    config.model.width = args.width
    config.batch_size = args.batch_size
    config.seed = args.seed
    for assignment in overrides:
        paper_tables.set_config_field(config, assignment)
    return config


def epoch_steps(steps: int, full_batches: int, log_every: int) -> int:
    """Steps per epoch for `fit` to train exactly `steps` steps on at most `full_batches` batches.

    The largest divisor of `steps` up to `full_batches` that is a multiple of `log_every` or is
    `steps` itself (whole log windows); else the largest divisor up to `full_batches`. Raises
    ValueError when that would train on under half of the batches there are room for.
    """
    if steps < 1 or log_every < 1 or full_batches < 1:
        raise ValueError(
            f"steps ({steps}), log_every ({log_every}) and the full batches of the examples "
            f"({full_batches}) must be >= 1"
        )
    divisors = [d for d in range(1, min(steps, full_batches) + 1) if steps % d == 0]
    whole = [d for d in divisors if d == steps or d % log_every == 0]
    best = max(whole or divisors)
    if 2 * best < min(steps, full_batches):
        raise ValueError(
            f"--steps={steps}: fit trains whole epochs, and the largest divisor of {steps} up to "
            f"{full_batches} (full batches in the examples) is {best}; choose a step count with "
            f"a divisor near {full_batches}"
        )
    return best


def _largest_divisor_at_most(n: int, cap: int) -> int:
    return max(d for d in range(1, min(n, max(cap, 1)) + 1) if n % d == 0)


def _claim_workdir(workdir: str, settings: dict[str, Any]) -> None:
    """Records `settings` in `workdir`; refuses one that holds a run of other settings (so that
    `fit` resumes only the same run)."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, SETTINGS_FILE)
    text = json.dumps(settings, sort_keys=True, indent=1, default=str)
    if os.path.exists(path):
        with open(path) as f:
            if f.read() != text:
                raise ValueError(f"{workdir} holds a run with other settings ({path}); move it")
        return
    if os.listdir(workdir):
        raise ValueError(f"{workdir} is not empty and holds no {SETTINGS_FILE}; choose another")
    with open(path, "w") as f:
        f.write(text)


def logged_rows(workdir: str) -> list[dict[str, float]]:
    """One row per logged step: `{'step', *LOGGED}` from the `train_*` scalars in `workdir`
    (the last value of a step logged twice, as after a resume)."""
    scalars = tb_curves.read_scalars(workdir)
    missing = [f"train_{k}" for k in LOGGED if f"train_{k}" not in scalars]
    if missing:
        raise RuntimeError(f"{workdir}: no {', '.join(missing)} scalars")
    per_key = {k: dict(zip(*scalars[f"train_{k}"], strict=True)) for k in LOGGED}
    steps = sorted(per_key["loss"])
    return [{"step": int(s), **{k: float(per_key[k][s]) for k in LOGGED}} for s in steps]


def train_variant(
    config, workdir: str, images: np.ndarray, labels: np.ndarray, args: argparse.Namespace
) -> dict[str, Any]:
    """`args.steps` steps of `loop.fit` in `workdir`; its logged rows and the epoch shape."""
    from data_pipelines.plan import steps_per_epoch
    from fer_jax.training.train import create_job, fit

    full_batches = steps_per_epoch(len(labels), config.batch_size)
    per_epoch = epoch_steps(args.steps, full_batches, args.log_every)
    used = per_epoch * config.batch_size
    config.num_epochs = args.steps // per_epoch
    config.log_every_steps = args.log_every
    config.cross_validate = False
    job = create_job(config)
    # Dispatches of several steps (accelerators) end on the log steps.
    config.steps_per_dispatch = _largest_divisor_at_most(
        math.gcd(args.log_every, per_epoch), job.steps_per_dispatch
    )
    _claim_workdir(
        workdir,
        {"csv": os.path.abspath(args.csv), "train_examples": used, "config": config.to_dict()},
    )
    start = time.perf_counter()
    fit(job, workdir, images[:used], labels[:used])
    seconds = time.perf_counter() - start
    log = logged_rows(workdir)
    for row in log:
        print(
            f"  step {row['step']}: loss {row['loss']:.4f} acc {row['accuracy']:.3f} "
            f"|x| {row['feature_norm']:.4g} lambda {row['lambda']:.1f}",
            flush=True,
        )
    return {
        "log": log,
        "train_examples": used,
        "steps_per_epoch": per_epoch,
        "num_epochs": config.num_epochs,
        "seconds": round(seconds, 1),
    }


def markdown(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> str:
    """The loss / mean |x| table, a column per logged step of the first variant."""
    steps = [r["step"] for r in next(iter(results.values()))["log"]]
    shapes = sorted(
        {
            f"first {r['train_examples']} rows, {r['steps_per_epoch']} steps x "
            f"{r['num_epochs']} epochs"
            for r in results.values()
        }
    )
    lines = [
        "# A-Softmax feature-norm collapse: loss / mean |x| of the classifier input",
        f"Width {args.width}, batch {args.batch_size}, {args.steps} steps of "
        f"fer_jax.training.train.fit on FER2013 Training rows ({'; '.join(shapes)}; of the first "
        f"{args.examples}), seed "
        f"{args.seed}; each cell: training loss (mean over the steps since the previous column, "
        f"at most {args.log_every}) / mean |x|. log 7 = 1.946 is the loss of "
        "all-zero logits.",
        "",
    ]
    rows = [
        [name, f"`{','.join(res['overrides']) or '-'}`"]
        + [f"{r['loss']:.3f} / {r['feature_norm']:.3g}" for r in res["log"]]
        for name, res in results.items()
    ]
    lines += common.table(["variant", "overrides", *(f"step {s}" for s in steps)], rows)
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = common.parser(__doc__)
    ap.add_argument("--csv", required=True, help="fer2013.csv (or .tar.gz), see README")
    ap.add_argument("--examples", type=int, default=8000, help="first N Training rows")
    ap.add_argument("--variant", action="append", help="NAME=FIELD=VALUE,... (repeatable)")
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--batch_size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--log_every", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    common.add_out(ap, help=None, default=os.path.join(paper_tables.REPO, "experiments", "results"))
    ap.add_argument(
        "--workdir_root",
        default="",
        help="keep each variant's fit workdir (events, checkpoints) in ROOT/NAME; resumes there. "
        "Default: a temporary directory, removed at the end",
    )
    return ap.parse_args(argv)


def _train_all(
    variants: list[tuple[str, list[str]]],
    configs: dict[str, Any],
    root: str,
    images: np.ndarray,
    labels: np.ndarray,
    args: argparse.Namespace,
) -> dict[str, dict[str, Any]]:
    results = {}
    for name, overrides in variants:
        print(f"{name}: {','.join(overrides)}", flush=True)
        res = train_variant(configs[name], os.path.join(root, name), images, labels, args)
        results[name] = {"overrides": overrides, **res}
    return results


def main(argv: list[str] | None = None) -> str:
    from data_pipelines import fer2013_csv

    args = parse_args(argv)
    variants = [parse_variant(v) for v in (args.variant or DEFAULT_VARIANTS)]
    names = [name for name, _ in variants]
    if len(set(names)) != len(names):
        raise ValueError(f"--variant names must differ, got {names}")
    configs = {name: variant_config(overrides, args) for name, overrides in variants}
    prov = provenance.provenance()
    rows = fer2013_csv.read_fer2013(args.csv)
    train_rows = np.flatnonzero(rows.splits == "train")[: args.examples]
    images = rows.images[train_rows][..., None]
    labels = rows.labels[train_rows].astype(np.int32)
    if args.workdir_root:
        results = _train_all(variants, configs, args.workdir_root, images, labels, args)
    else:
        with tempfile.TemporaryDirectory(prefix="asoftmax_collapse_") as root:
            results = _train_all(variants, configs, root, images, labels, args)
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
