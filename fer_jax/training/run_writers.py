"""Where a training run writes what it measures: TensorBoard scalars and hparams, and the
per-evaluation JSON reports and confusion-matrix PNGs.

Replicas are laid out here and only here: a run of K > 1 replicas has one TensorBoard run and
one report directory per replica (`workdir/replica_<k>`, `workdir/eval/replica_<k>`) beside
the main writer (hparams, the ensemble's accuracy, performance); a plain run writes everything
to `workdir` and `workdir/eval`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
from clu import parameter_overview

from fer_jax.training import evaluate, replicas
from fer_jax.training.metrics import per_replica
from fer_jax.training.summary_writer import SummaryWriter


def flat_hparams(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """`config` as `{'dotted.name': scalar}` (other values as JSON), for TensorBoard hparams."""
    flat = {}

    def walk(prefix, node):
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, ml_collections.ConfigDict):
                walk(name + ".", value)
            elif isinstance(value, int | float | str | bool):
                flat[name] = value
            else:
                flat[name] = json.dumps(value, default=str)

    walk("", config)
    return flat


class RunWriters:
    """The writers of one run in `workdir`; only the main process (`enabled`) writes."""

    def __init__(self, workdir: str, config: ml_collections.ConfigDict, *, enabled: bool):
        self.workdir, self.config, self.enabled = workdir, config, enabled
        self.main = SummaryWriter(workdir, enabled=enabled)
        self.num_replicas = replicas.count(config)
        self.replica_dirs = [""]  # relative to workdir and workdir/eval
        self.curves = [self.main]  # one training-curve writer per replica
        if self.num_replicas > 1:
            self.replica_dirs = [f"replica_{k}" for k in range(self.num_replicas)]
            self.curves = [
                SummaryWriter(os.path.join(workdir, d), enabled=enabled) for d in self.replica_dirs
            ]

    @property
    def _all(self) -> list[SummaryWriter]:
        return [self.main] + [c for c in self.curves if c is not self.main]

    def write_start(self, params: Any) -> None:
        """A fresh run's parameter table (in the log) and hparams (each replica's own)."""
        if self.num_replicas > 1:
            params = replicas.take(params, 0)
        parameter_overview.log_parameter_overview(params)
        self.main.write_hparams(flat_hparams(self.config))
        if self.num_replicas > 1:
            configs = replicas.replica_configs(self.config)
            for curve, one in zip(self.curves, configs, strict=True):
                curve.write_hparams(flat_hparams(one))

    def write_train(
        self, step: int, summaries: Sequence[Mapping[str, float]], images_per_s: float
    ) -> None:
        """Each replica's `metrics.train_summaries` and the images/s (all replicas'
        throughput shared out among them)."""
        for curve, summary in zip(self.curves, summaries, strict=True):
            per_replica_speed = images_per_s / self.num_replicas
            curve.write_scalars(step, {**summary, "train_images_per_second": per_replica_speed})

    def write_evaluation(self, step: int, split: str, epoch: int, report: dict[str, Any]) -> None:
        """A selection evaluation after `epoch` epochs: its reports
        (`eval/<replica>/<split>_epochNNN.json` and the confusion PNG) and scalars."""
        name = f"{split}_epoch{epoch:03d}"
        for metrics, curve, directory in zip(
            per_replica(report), self.curves, self.replica_dirs, strict=True
        ):
            if self.enabled:
                evaluate.write_report(os.path.join(self.workdir, "eval", directory), name, metrics)
            scalars = evaluate.scalar_metrics(metrics)
            curve.write_scalars(step, {f"{split}_{k}": v for k, v in scalars.items()})
        if "ensemble" in report:
            accuracy = report["ensemble"]["accuracy"]
            self.main.write_scalars(step, {f"{split}_ensemble_accuracy": accuracy})

    def flush(self) -> None:
        for writer in self._all:
            writer.flush()

    def close(self) -> None:
        for writer in self._all:
            writer.close()


def write_final_reports(
    workdir: str, split: str, results: dict[str, Any], report: dict[str, Any]
) -> None:
    """The end of a run: the selected model's `eval/<split>_selected.json` (and
    `_centre_crop`), with replicas each one's and the ensemble's, and `results.json`."""
    eval_dir = os.path.join(workdir, "eval")
    name = f"{split}_selected"
    evaluate.write_report(eval_dir, name, results[split])
    evaluate.write_report(eval_dir, f"{name}_centre_crop", results["centre_crop"])
    if "ensemble" in report:
        for k, metrics in enumerate(report["replicas"]):
            evaluate.write_report(os.path.join(eval_dir, f"replica_{k}"), name, metrics)
        evaluate.write_report(eval_dir, f"{split}_ensemble", report["ensemble"])
    evaluate.write_json(os.path.join(workdir, "results.json"), results)
