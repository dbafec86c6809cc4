"""TensorBoard scalars and a text record of the config, written without TensorFlow.

`SummaryWriter` writes event files with the `tensorboard` package's own writer (the one
PyTorch's `SummaryWriter` uses), so training needs neither TensorFlow nor clu. Every scalar
is also logged. Only process 0 of a multi-process run writes files (`enabled`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

from absl import logging


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
