"""What the loop feeds the compiled training function: the calls of a run from any step on
(`dispatches`) and their batches, from device-resident data or tf.data (`train_feed`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import ml_collections
import numpy as np

from data_pipelines.plan import epoch_plan
from fer_jax.training import (
    device_input,
    replicas,
)
from fer_jax.training.device_input import plan_chunk
from fer_jax.training.state import TrainState
from fer_jax.training.trainer import Trainer


def dispatches(
    start_step: int,
    total_steps: int,
    steps_per_epoch: int,
    steps_per_dispatch: int,
    checkpoint_every_steps: int,
) -> Iterator[tuple[int, int]]:
    """`(first global step, steps)` of each device-mode call: at most `steps_per_dispatch`
    steps, ending at every epoch end and every multiple of `checkpoint_every_steps` (if > 0).
    A function of the step alone: a resumed run makes the same calls as an uninterrupted one
    from there on (so it ends bit-identical)."""
    step = start_step
    every = checkpoint_every_steps
    while step < total_steps:
        end = min(step + steps_per_dispatch, (step // steps_per_epoch + 1) * steps_per_epoch)
        if every > 0:
            end = min(end, (step // every + 1) * every)
        yield step, end - step
        step = end


def augmentation(config: ml_collections.ConfigDict) -> dict[str, float]:
    """`epoch_plan`'s `zoom`, `rotate` and `erase` from `config.augment` (a field or section
    absent, as in configs from before it: 0, none)."""
    augment = config.get("augment", {})
    return {k: float(augment.get(k, 0.0)) for k in ("zoom", "rotate", "erase")}


def train_feed(
    trainer: Trainer,
    images: np.ndarray,
    labels: np.ndarray,
    start_step: int,
    total_steps: int,
    steps_per_epoch: int,
) -> Iterator[tuple[int, Callable[[TrainState], tuple[TrainState, dict]]]]:
    """`(steps, run)` per call of the compiled training function from `start_step` on, where
    `run(state) -> (state, metrics)` does `steps` optimizer steps; both input modes feed the
    same batches (`data_pipelines.plan.epoch_plan`), those of each replica's seed."""
    config, parallel = trainer.config, trainer.parallel
    seeds = replicas.seeds(config)
    augment = augmentation(config)
    if trainer.input_pipeline == "tf_data":
        import data_pipelines

        def pipeline(seed: int, num_devices: int | None):
            return data_pipelines.train_dataset_from_arrays(
                images,
                labels,
                batch_size=config.batch_size,
                seed=seed,
                start_epoch=start_step // steps_per_epoch,
                start_step=start_step % steps_per_epoch,
                num_epochs=config.num_epochs - start_step // steps_per_epoch,
                num_devices=num_devices,
                normalize=config.normalize,
                **augment,
            )

        fn = trainer.train_fn()
        if len(seeds) == 1:
            batches = pipeline(seeds[0], parallel.batch_shape_devices).as_numpy_iterator()
            split_axis = 0
        else:  # (K, B, ...): one batch per replica, from its own seed
            streams = [pipeline(seed, None).as_numpy_iterator() for seed in seeds]
            batches = (replicas.stack(bs) for bs in zip(*streams, strict=True))
            split_axis = 1
        for batch in parallel.prefetch(batches, split_axis=split_axis):
            yield 1, lambda s, b=batch: fn(s, b)
        return
    data = device_input.put_train_arrays(parallel, images, labels, normalize=config.normalize)
    fn = trainer.train_fn(data.layout)
    epoch, plan = -1, None
    calls = dispatches(
        start_step,
        total_steps,
        steps_per_epoch,
        trainer.steps_per_dispatch,
        config.checkpoint_every_steps,
    )
    for first, steps in calls:
        if first // steps_per_epoch != epoch:
            epoch = first // steps_per_epoch
            plans = [
                epoch_plan(
                    len(labels),
                    config.batch_size,
                    seed=seed,
                    epoch=epoch,
                    image_shape=images.shape[1:3],
                    **augment,
                )
                for seed in seeds
            ]
            # Replicas: (S, K, B) arrays, step-major like one replica's (S, B).
            plan = plans[0] if len(plans) == 1 else replicas.stack_plans(plans)
        rows = parallel.place(plan_chunk(plan, first % steps_per_epoch, steps), None)
        yield steps, lambda s, rows=rows: fn(s, data.images, data.labels, rows)
