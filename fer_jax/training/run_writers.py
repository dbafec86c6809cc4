"""Where a training run writes what it measures: TensorBoard scalars and hparams, and the
per-evaluation JSON reports and confusion-matrix PNGs, in `workdir` and `workdir/eval`
(`replicas.RunWriters`: a replica run's layout).

`SummaryWriter` writes event files with the `tensorboard` package's own writer (the one
PyTorch's `SummaryWriter` uses), so training needs neither TensorFlow nor clu. Every scalar
is also logged. Only process 0 of a multi-process run writes files (`enabled`).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
from absl import logging
from clu import parameter_overview

from fer_jax.training import evaluate


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


class SummaryWriter:
    """Scalars per step, and the run's hyperparameters once, into `logdir`'s event file."""

    def __init__(self, logdir: str, *, enabled: bool = True):
        self._writer = None
        if enabled:
            from tensorboard.summary.writer.event_file_writer import EventFileWriter

            self._writer = EventFileWriter(logdir)

    def _add(self, step: int, values: list[Any]) -> None:
        from tensorboard.compat.proto import event_pb2, summary_pb2

        if self._writer is None:
            return
        event = event_pb2.Event(
            wall_time=time.time(), step=int(step), summary=summary_pb2.Summary(value=values)
        )
        self._writer.add_event(event)

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        """`{tag: value}` at `step`, as TensorBoard scalars and one log line."""
        from tensorboard.compat.proto import summary_pb2

        logging.info("[%d] %s", step, ", ".join(f"{k}={float(v):.6g}" for k, v in scalars.items()))
        self._add(
            step,
            [summary_pb2.Summary.Value(tag=k, simple_value=float(v)) for k, v in scalars.items()],
        )

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        """The flat config as a markdown table (TensorBoard's text tab, tag 'hparams')."""
        from tensorboard.compat.proto import summary_pb2, tensor_pb2, tensor_shape_pb2

        rows = ["| field | value |", "|---|---|"]
        rows += [f"| {k} | {json.dumps(v, default=str)} |" for k, v in sorted(hparams.items())]
        tensor = tensor_pb2.TensorProto(
            dtype=7,  # DT_STRING
            string_val=["\n".join(rows).encode()],
            tensor_shape=tensor_shape_pb2.TensorShapeProto(),
        )
        metadata = summary_pb2.SummaryMetadata(
            plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="text")
        )
        self._add(0, [summary_pb2.Summary.Value(tag="hparams", tensor=tensor, metadata=metadata)])

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


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
