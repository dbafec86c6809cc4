"""Where a training run writes what it measures: TensorBoard scalars and hparams, and the
per-evaluation JSON reports and confusion-matrix PNGs, in `workdir` and `workdir/eval`
(`replicas.RunWriters`: a replica run's layout).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
from clu import parameter_overview

from fer_jax.training import evaluate
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
        self.writers = [self.main]

    def write_start(self, params: Any) -> None:
        """A fresh run's parameter table (in the log) and hparams."""
        parameter_overview.log_parameter_overview(params)
        self.main.write_hparams(flat_hparams(self.config))

    def write_train(
        self, step: int, summaries: Sequence[Mapping[str, float]], images_per_s: float
    ) -> None:
        """`metrics.train_summaries` (one) and the images/s."""
        (summary,) = summaries
        self.main.write_scalars(step, {**summary, "train_images_per_second": images_per_s})

    def write_evaluation(self, step: int, split: str, epoch: int, report: dict[str, Any]) -> None:
        """A selection evaluation's report (`eval/<split>_epochNNN.json`, PNG) and scalars."""
        self.write_report(self.main, "", step, f"{split}_epoch{epoch:03d}", split, report)

    def write_report(
        self, writer: SummaryWriter, directory: str, step: int, name: str, split: str, report
    ) -> None:
        """`report` as `eval/<directory>/<name>.json` (and PNG) and `split`'s scalars."""
        if self.enabled:
            evaluate.write_report(os.path.join(self.workdir, "eval", directory), name, report)
        scalars = evaluate.scalar_metrics(report)
        writer.write_scalars(step, {f"{split}_{k}": v for k, v in scalars.items()})

    def flush(self) -> None:
        for writer in self.writers:
            writer.flush()

    def close(self) -> None:
        for writer in self.writers:
            writer.close()


def write_final_reports(workdir: str, split: str, results: dict[str, Any]) -> None:
    """The selected model's `eval/<split>_selected[_centre_crop].json` and `results.json`."""
    eval_dir = os.path.join(workdir, "eval")
    evaluate.write_report(eval_dir, f"{split}_selected", results[split])
    evaluate.write_report(eval_dir, f"{split}_selected_centre_crop", results["centre_crop"])
    evaluate.write_json(os.path.join(workdir, "results.json"), results)
