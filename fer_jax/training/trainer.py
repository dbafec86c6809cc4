"""`Trainer`: the compiled steps of one training job (train chunks, split evaluation) for
either input mode, shared by training and the cross-validation folds."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import ml_collections
import numpy as np

from data_pipelines.crops import NUM_CROPS
from fer_jax.model.resnet import ResNet18
from fer_jax.training import (
    device_input,
    metrics,
    replicas,
)
from fer_jax.training.parallel import Compiled, DataParallel
from fer_jax.training.state import TrainState, create_model, ema_view
from fer_jax.training.steps import eval_step, replica_eval_step, train_step

INPUT_PIPELINES = ("device", "tf_data")


def select_crops(config: ml_collections.ConfigDict) -> int:
    """Crops of the per-epoch model-selection evaluation (`config.select_crops`): 10, as the
    report, or 1, the centre crop: a tenth of the compute, for CPU runs where ten-crop
    selection would cost a third of each epoch. The final report is ten-crop either way."""
    return config.get("select_crops", NUM_CROPS)


def input_pipeline(config: ml_collections.ConfigDict) -> str:
    """`config.input_pipeline`, '' meaning 'device': the fast path on an H200, and as fast as
    tf.data on CPU (experiments/results/input_pipeline_cpu/), with no TensorFlow needed."""
    return config.get("input_pipeline", "") or "device"


@dataclasses.dataclass
class Trainer:
    """The compiled steps of one training job, shared by training and CV folds.

    With `input_pipeline == 'device'` the data live on the devices
    (`fer_jax.training.device_input`): a training call runs a chunk of steps and an evaluation call
    a whole split; with 'tf_data' the tf.data pipelines feed one batch per call.
    """

    config: ml_collections.ConfigDict
    parallel: DataParallel
    model: ResNet18
    input_pipeline: str
    _train_fns: dict[Any, Compiled] = dataclasses.field(default_factory=dict)
    _eval_fns: dict[Any, Compiled] = dataclasses.field(default_factory=dict)
    _eval_arrays: list[tuple[np.ndarray, np.ndarray, Any]] = dataclasses.field(default_factory=list)

    @classmethod
    def create(cls, config: ml_collections.ConfigDict) -> Trainer:
        parallel = DataParallel(config.parallelism)
        n = parallel.num_devices
        if config.batch_size % n or config.eval_batch_size % n:
            raise ValueError(
                f"config.batch_size ({config.batch_size}) and config.eval_batch_size "
                f"({config.eval_batch_size}) must be divisible by the {parallel.num_devices} "
                "devices"
            )
        model = create_model(config, axis_name=parallel.axis_name)
        return cls(config, parallel, model, input_pipeline(config))

    @property
    def replicas(self) -> int:
        """K: the number of replicas the steps run over (1: no replica axis)."""
        return replicas.count(self.config)

    @property
    def replica_map(self) -> str:
        """'vmap' or 'unroll' (`fer_jax.training.replicas.map_kind`)."""
        return replicas.map_kind(self.config, self.parallel.devices[0].platform)

    def _over_replicas(self, step: Callable[..., Any]) -> Callable[..., Any]:
        """`step(state, batch, *, axis_name)` of one replica -> of the stacked state and
        per-replica batches (leading axis K), when there are replicas."""
        if self.replicas == 1:
            return step
        kind = self.replica_map

        def over_replicas(state, batch, *, axis_name):
            one = functools.partial(step, axis_name=axis_name)
            return replicas.map_over(one, kind, (0, 0))(state, batch)

        return over_replicas

    @property
    def steps_per_dispatch(self) -> int:
        """Training steps per call: 1 with tf.data; `config.steps_per_dispatch` on the device,
        0 meaning 64 on accelerators and 1 on CPU (`configs/common.py`)."""
        if self.input_pipeline == "tf_data":
            return 1
        if self.config.steps_per_dispatch:
            return self.config.steps_per_dispatch
        return 1 if self.parallel.devices[0].platform == "cpu" else 64

    def train_fn(self, layout: device_input.Layout | None = None) -> Compiled:
        """tf_data: `fn(state, batch)`; device: `fn(state, images, labels, plan)` for data of
        `layout`. Both return `(state, metrics)`. With replicas the batch is `(K, B, ...)` and
        the plan `(L, K, B)`, and metrics have a trailing replica axis."""
        fn = self._train_fns.get(layout)
        if fn is None:
            step = self._over_replicas(functools.partial(train_step, config=self.config))
            if layout is None:
                fn = self.parallel.compile(step, split_axes=(0 if self.replicas == 1 else 1,))
            else:
                chunk = device_input.train_chunk_fn(step, layout)
                fn = self.parallel.compile(chunk, split_axes=(0, None, None))
            self._train_fns[layout] = fn
        return fn

    def _eval_fn(self, layout: device_input.Layout | None, crops: int) -> Compiled:
        fn = self._eval_fns.get((layout, crops))
        if fn is None:
            step = eval_step
            if self.replicas > 1:
                step = functools.partial(replica_eval_step, replica_map=self.replica_map)
            if layout is None:
                fn = self.parallel.compile(step, donate_state=False, replicated_out=1)
            else:
                evaluate_split = device_input.eval_split_fn(step, layout, crops)
                fn = self.parallel.compile(
                    evaluate_split, split_axes=(1, 1, 1), donate_state=False, replicated_out=1
                )
            self._eval_fns[(layout, crops)] = fn
        return fn

    @property
    def compile_seconds(self) -> dict[str, float]:
        """Seconds spent compiling so far: {'train': ..., 'eval': ...}."""
        return {
            "train": sum(f.compile_seconds for f in self._train_fns.values()),
            "eval": sum(f.compile_seconds for f in self._eval_fns.values()),
        }

    def _device_eval_arrays(self, images: np.ndarray, labels: np.ndarray):
        for held_images, held_labels, arrays in self._eval_arrays:
            if held_images is images and held_labels is labels:
                return arrays
        arrays = device_input.put_eval_arrays(
            self.parallel,
            images,
            labels,
            self.config.eval_batch_size,
            normalize=self.config.normalize,
        )
        # Keep the few splits in use (select, report, a CV fold) on the devices.
        self._eval_arrays = [*self._eval_arrays[-2:], (images, labels, arrays)]
        return arrays

    def evaluate(
        self, state: TrainState, images: np.ndarray, labels: np.ndarray, crops: int = NUM_CROPS
    ) -> dict:
        """The report (`metrics.report`) of replicated `state` on the ten crops
        (`crops=10`) or the centre crop alone (`crops=1`); with replicas
        `{'replicas': [metrics of each], 'ensemble': metrics}`. With a moving average of the
        weights (`config.ema_decay`) it is the average that is evaluated."""
        state = ema_view(state)
        if self.input_pipeline == "device":
            arrays = self._device_eval_arrays(images, labels)
            fn = self._eval_fn(arrays.layout, crops)
            totals = fn(state, arrays.images, arrays.labels, arrays.mask)
        else:
            import data_pipelines

            ds = data_pipelines.eval_dataset_from_arrays(
                images,
                labels,
                batch_size=self.config.eval_batch_size,
                num_devices=self.parallel.batch_shape_devices,
                normalize=self.config.normalize,
                crops="ten" if crops == NUM_CROPS else "centre",
            )
            if crops == 1:  # (..., B, c, c, C) -> (..., B, 1, c, c, C), as eval_step takes
                ds = ds.map(lambda b: {**b, "image": b["image"][..., None, :, :, :]})
            fn = self._eval_fn(None, crops)
            totals = None
            for batch in self.parallel.prefetch(ds.as_numpy_iterator()):
                out = fn(state, batch)
                totals = out if totals is None else metrics.merge(totals, out)
        return metrics.report(self.parallel.unreplicate(totals), len(labels))
