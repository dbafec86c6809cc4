"""JAFFE k-fold cross-validation: fine-tune from a FER2013 run on each fold, test on the rest.

Each fold trains in its own sub-workdir `fold_<k>/` (resuming independently, like any run)
and is evaluated once, at the end, on its held-out images: there is no validation split, so
nothing is selected on the test fold. The summary (`summary.json`, `confusion.png`) gives
per-fold accuracy, their mean and standard deviation, and the pooled confusion matrix.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from fer_jax.training import checkpoint, evaluate, input_data
from fer_jax.training.loop import fit
from fer_jax.training.trainer import Trainer


def config_from_parent(
    config: ml_collections.ConfigDict, workdir: str
) -> ml_collections.ConfigDict:
    """The CV config of a FER2013 run: `config.jaffe`, fine-tuning that run's model."""
    cv = ml_collections.ConfigDict(config.jaffe.to_dict())
    cv.model = ml_collections.ConfigDict(config.model.to_dict())
    cv.init_from = cv.init_from or workdir
    cv.data_dir = cv.data_dir or config.data_dir
    cv.data_source = config.data_source
    cv.input_pipeline = config.input_pipeline
    cv.steps_per_dispatch = config.steps_per_dispatch
    cv.half_precision = config.half_precision
    cv.parallelism = config.parallelism
    return cv


def _fold_result(path: str) -> dict[str, Any] | None:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Runs (or resumes) every fold of `config` in `workdir`; returns the summary."""
    import data_pipelines

    if not config.init_from:
        raise ValueError(
            "config.init_from must name the FER2013 run (workdir or checkpoint) to fine-tune"
        )
    workdir = checkpoint.prepare_workdir(workdir)
    is_main = jax.process_index() == 0  # every process trains; process 0 writes the reports
    arrays = input_data.load_split_arrays(config, "train")
    images, labels = arrays["image"], arrays["label"]
    folds = data_pipelines.jaffe_folds(
        labels, arrays["subject"], k=config.folds, protocol=config.fold_protocol, seed=config.seed
    )
    trainer = Trainer.create(config)
    fold_results = []
    for k, (train_idx, test_idx) in enumerate(folds):
        fold_dir = os.path.join(workdir, f"fold_{k}")
        result_path = os.path.join(fold_dir, "result.json")
        result = _fold_result(result_path)
        if result is None:
            logging.info(
                "Fold %d/%d: %d training, %d test images.",
                k + 1,
                len(folds),
                len(train_idx),
                len(test_idx),
            )
            out = fit(trainer, fold_dir, images[train_idx], labels[train_idx])
            state = trainer.parallel.replicate(out["state"])
            metrics = trainer.evaluate(state, images[test_idx], labels[test_idx])
            result = {"fold": k, "test_indices": np.asarray(test_idx).tolist(), **metrics}
            if is_main:
                evaluate.write_report(os.path.join(fold_dir, "eval"), "test_fold", metrics)
                evaluate.write_json(result_path, result)
        logging.info("Fold %d accuracy: %.4f", k, result["accuracy"])
        fold_results.append(result)

    accuracies = np.array([r["accuracy"] for r in fold_results])
    pooled = np.sum([np.asarray(r["confusion_counts"]) for r in fold_results], axis=0)
    pooled_metrics = evaluate.metrics_from_confusion(pooled)
    summary = {
        "protocol": config.fold_protocol,
        "folds": len(folds),
        "fold_accuracy": accuracies.tolist(),
        "mean_accuracy": float(accuracies.mean()),
        "std_accuracy": float(accuracies.std(ddof=1)) if len(accuracies) > 1 else 0.0,
        "pooled": pooled_metrics,
        "init_from": config.init_from,
    }
    if is_main:
        evaluate.write_json(os.path.join(workdir, "summary.json"), summary)
        evaluate.plot_confusion(
            pooled_metrics["confusion_normalized"],
            pooled_metrics["class_names"],
            os.path.join(workdir, "confusion.png"),
            f"{config.folds}-fold CV ({config.fold_protocol}): "
            f"{100 * summary['mean_accuracy']:.2f} ± {100 * summary['std_accuracy']:.2f}%",
        )
    logging.info(
        "Cross-validation: %.4f ± %.4f over %d folds",
        summary["mean_accuracy"],
        summary["std_accuracy"],
        len(folds),
    )
    return summary
