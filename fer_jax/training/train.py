"""`train_and_evaluate(config, workdir)`: a whole training job (in the style of
flax/examples/imagenet), resumed after any interruption from the checkpoints in `workdir`;
`evaluate_checkpoint`: a trained model's report on one split (`fer_jax.main --mode=evaluate`).

It loads the splits, trains (`loop.fit`: the state and steps of `state` and `steps`, compiled
by `trainer.Trainer`), then evaluates the model chosen on the select split on the report split
(ten-crop and centre crop) and writes `results.json`.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from fer_jax import host_memory
from fer_jax.model.resnet import matmul_bf16
from fer_jax.training import (
    checkpoint,
    config_schema,
    evaluate,
    input_data,
    replicas,
    run_config,
)
from fer_jax.training.loop import fit
from fer_jax.training.metrics import per_replica
from fer_jax.training.run_writers import write_final_reports
from fer_jax.training.state import create_train_state
from fer_jax.training.trainer import Trainer


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, *, allow_config_changes: bool = False
) -> dict[str, Any]:
    """Trains `config` in `workdir`, resuming from its latest checkpoint if there is one.

    Validates `config` first (`config_schema.validate`: a `UserError` naming the field) and,
    in a single process, keeps XLA:CPU's scratch memory mapped (`fer_jax.host_memory`; both
    harmless when already done). Writes TensorBoard events, per-evaluation JSON metrics and
    confusion-matrix PNGs, and Orbax checkpoints (latest few + best by `config.select_split`
    accuracy). Returns the final summary (also `workdir/results.json`): the selected model's
    `config.report_split` metrics, and where it came from. (The JAFFE cross-validation that
    may follow: `cross_validate.train_then_cross_validate`.)
    """
    config_schema.validate(config)
    if not jax.distributed.is_initialized():  # multi-process: left as JAX has it
        host_memory.reuse_scratch_memory()
    workdir = checkpoint.prepare_workdir(workdir)
    is_main = jax.process_index() == 0
    # config.json: written at the first start; a resume with another recipe is refused.
    run_config.save_or_compare(config, workdir, allow_changes=allow_config_changes)
    splits = input_data.load_splits(
        config, [config.train_split, config.select_split, config.report_split]
    )
    train_images, train_labels = splits[config.train_split]
    trainer = Trainer.create(config)
    summary = fit(
        trainer,
        workdir,
        train_images,
        train_labels,
        select=splits[config.select_split],
        select_name=config.select_split,
    )
    best = checkpoint.restore_best_or_latest(workdir, summary["template"])
    state = trainer.parallel.replicate(best.state)
    report = trainer.evaluate(state, *splits[config.report_split])
    centre = trainer.evaluate(state, *splits[config.report_split], crops=1)
    performance = summary["performance"]
    if performance is None:  # finished before this call: keep the figures of the run that trained
        performance = _previous_performance(workdir)
    results = _results(config, best, report, performance, centre=centre)
    if is_main:
        write_final_reports(workdir, config.report_split, results, report)
    logging.info(
        "%s accuracy of the model chosen on %s (step %d): %.4f (mean class accuracy %.4f)",
        config.report_split,
        config.select_split,
        results["selected_step"],
        results[config.report_split]["accuracy"],
        results[config.report_split].get("mean_class_accuracy", float("nan")),
    )
    if trainer.replicas > 1:
        logging.info(
            "%d replicas: %s accuracy %.4f +- %.4f (ensemble %.4f)",
            trainer.replicas,
            config.report_split,
            results["mean_accuracy"],
            results["std_accuracy"],
            results["ensemble_accuracy"],
        )
    return results


def evaluate_checkpoint(
    config: ml_collections.ConfigDict, workdir: str, path: str, split: str, crops: int = 10
) -> dict[str, Any]:
    """Ten-crop (or `crops=1`: centre-crop) metrics of a checkpoint on `split`, written to
    `workdir/eval/` (`<split>_evaluate[_centre_crop].json` and its confusion-matrix PNG).

    With `config.replicas = K` matching a replica run: each replica's and the ensemble's;
    with K = 1, a replica run's replica chosen on its select split (`checkpoint.init_from`).
    """
    trainer = Trainer.create(config)
    template = create_train_state(config, trainer.model, steps_per_epoch=1)
    state = trainer.parallel.replicate(checkpoint.init_from(path, template, config))
    images, labels = input_data.load_splits(config, [split])[split]
    metrics = trainer.evaluate(state, images, labels, crops=crops)
    suffix = "" if crops == 10 else "_centre_crop"
    reports = {f"{split}_evaluate{suffix}": metrics}
    if "replicas" in metrics:
        reports = {
            f"{split}_evaluate_replica_{k}{suffix}": m for k, m in enumerate(metrics["replicas"])
        }
        reports[f"{split}_evaluate_ensemble{suffix}"] = metrics["ensemble"]
    if jax.process_index() == 0:
        for name, report in reports.items():
            evaluate.write_report(os.path.join(workdir, "eval"), name, report)
    for name, report in reports.items():
        logging.info("%s of %s: accuracy %.4f", name, path, report["accuracy"])
        print(
            f"{name}: {100 * report['accuracy']:.2f}% ({report['num_examples']} images; "
            f"mean class accuracy {100 * report['mean_class_accuracy']:.2f}%)"
        )
    return metrics


def _results(
    config: ml_collections.ConfigDict,
    best: checkpoint.Restored,
    report: dict[str, Any],
    performance: dict[str, Any] | None,
    *,
    centre: dict[str, Any],
) -> dict[str, Any]:
    """`results.json`: the report split's ten-crop metrics of the model chosen on the select
    split (with replicas: of the replica that scored best there), its centre-crop metrics
    ('centre_crop', from `centre`), and per replica, their mean, standard deviation (ddof=1;
    None for one) and the ensemble's accuracy."""
    per = per_replica(report)
    selections = checkpoint.replica_selections(best)
    chosen = checkpoint.chosen_replica(best.meta)
    entries = [
        {
            "replica": k,
            "seed": seed,
            "overrides": fields,
            **selections[k],
            config.report_split: metrics,
        }
        for k, (seed, fields, metrics) in enumerate(
            zip(replicas.seeds(config), replicas.overrides(config), per, strict=True)
        )
    ]
    accuracies = np.array([m["accuracy"] for m in per])
    results = {
        "report_split": config.report_split,
        "selected_on": config.select_split,
        **selections[chosen],
        config.report_split: per[chosen],
        "centre_crop": per_replica(centre)[chosen],
        "replicas": entries,
        "mean_accuracy": float(accuracies.mean()),
        "std_accuracy": float(accuracies.std(ddof=1)) if len(accuracies) > 1 else None,
        "ensemble_accuracy": report.get("ensemble", per[0])["accuracy"],
        # What `model.matmul_dtype` ('auto' depends on the CPU) resolved to where this ran.
        "matmul_dtype_resolved": (
            "bfloat16" if matmul_bf16(config.model.get("matmul_dtype", "float32")) else "float32"
        ),
        "performance": performance,
    }
    if len(per) > 1:
        results["selected_replica"] = chosen
        results["ensemble"] = report["ensemble"]
    return results


def _previous_performance(workdir: str) -> dict[str, Any] | None:
    """`results.json`'s speed figures from the call that trained (None if there are none)."""
    try:
        return (evaluate.read_json(os.path.join(workdir, "results.json")) or {}).get("performance")
    except (OSError, ValueError):
        return None
