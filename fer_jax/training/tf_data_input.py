"""The tf.data input (`config.input_pipeline='tf_data'`): `DeviceInput`'s interface over the
pipelines of `data_pipelines` (one batch per training call, prefetched to the devices), which
feed exactly the batches of the on-device input (`data_pipelines.plan.epoch_plan`)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from data_pipelines.crops import NUM_CROPS
from fer_jax.training import metrics
from fer_jax.training.device_input import DeviceInput, TrainCall, augmentation
from fer_jax.training.step import OneDevice, TrainState, ema_view


def prefetch(devices: OneDevice, batches: Iterator[Any], split_axis: int, size: int = 2):
    """The batches, each put on the devices (split along `split_axis`) `size` ahead of use."""
    queue: list[Any] = []
    for batch in batches:
        queue.append(devices.place(batch, split_axis))
        if len(queue) > size:
            yield queue.pop(0)
    yield from queue


class TfDataInput(DeviceInput):
    """The compiled calls of one training job fed by tf.data: one step per training call."""

    input_pipeline = "tf_data"
    steps_per_dispatch = 1

    def train_calls(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        start_step: int,
        total_steps: int,
        steps_per_epoch: int,
    ) -> Iterator[tuple[int, TrainCall]]:
        """`(1, run)` per step from `start_step` on."""
        import data_pipelines

        config = self.config
        del total_steps  # the pipelines end with the last epoch

        def pipeline(seed: int):
            return data_pipelines.train_dataset_from_arrays(
                images,
                labels,
                batch_size=config.batch_size,
                seed=seed,
                start_epoch=start_step // steps_per_epoch,
                start_step=start_step % steps_per_epoch,
                num_epochs=config.num_epochs - start_step // steps_per_epoch,
                normalize=config.normalize,
                **augmentation(config),
            )

        axis = 0 if self.models.count == 1 else 1
        step = self.models.train_step()
        if None not in self._train_fns:
            self._train_fns[None] = self.devices.compile(step, split_axes=(axis,))
        fn = self._train_fns[None]
        batches = self.models.batches(lambda seed: pipeline(seed).as_numpy_iterator())
        for batch in prefetch(self.devices, batches, axis):
            yield 1, lambda s, b=batch: fn(s, b)

    def evaluate(
        self, state: TrainState, images: np.ndarray, labels: np.ndarray, crops: int = NUM_CROPS
    ) -> dict[str, Any]:
        """`DeviceInput.evaluate` over a tf.data pipeline of the split."""
        import data_pipelines

        ds = data_pipelines.eval_dataset_from_arrays(
            images,
            labels,
            batch_size=self.config.eval_batch_size,
            normalize=self.config.normalize,
            crops="ten" if crops == NUM_CROPS else "centre",
        )
        if crops == 1:  # (B, c, c, C) -> (B, 1, c, c, C), as eval_step takes
            ds = ds.map(lambda b: {**b, "image": b["image"][:, None]})
        if crops not in self._eval_fns:
            eval_step = self.models.eval_step()
            compiled = self.devices.compile(eval_step, donate_state=False, replicated_out=1)
            self._eval_fns[crops] = compiled
        fn = self._eval_fns[crops]
        state, totals = ema_view(state), None
        for batch in prefetch(self.devices, ds.as_numpy_iterator(), 0):
            out = fn(state, batch)
            totals = out if totals is None else metrics.merge(totals, out)
        return self.models.report(self.devices.unreplicate(totals), len(labels))
