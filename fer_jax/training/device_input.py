"""Training and evaluation input that lives on the accelerator(s): no host pipeline per step.

The uint8 training set and the evaluation splits go to the devices once. Each epoch's plan
(`data_pipelines.plan.epoch_plan`, as the tf.data pipeline's) is sent per dispatch as small int32
arrays; the compiled step gathers the crops on the device and runs the plan's steps in one call
(`lax.scan`), on exactly the tf.data input's batches. A split is evaluated in one call.
`DeviceInput` holds a job's compiled calls: `train_calls` and `evaluate`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from data_pipelines.crops import (
    CENTRE_CROP_INDEX,
    CROP_SIZE,
    NUM_CROPS,
    affine_crop_pixels,
    crop_pixel_offsets,
    erase_keep,
    ten_crop_pixel_indices,
)
from data_pipelines.plan import check_arrays, epoch_plan, normalize_affine
from fer_jax.model.resnet import ResNet18
from fer_jax.training import metrics
from fer_jax.training.step import Compiled, OneDevice, OneModel, TrainState, ema_view

PLAN_KEYS = ("index", "top", "left", "flip")
AFFINE_PLAN_KEYS = ("index", "affine")  # a plan with zoom or rotation: the maps hold the rest


@dataclasses.dataclass(frozen=True)
class Layout:
    """Static facts the compiled functions need."""

    height: int
    width: int
    channels: int
    crop: int
    scale: float
    offset: float
    rows_per_device: int  # training examples held by each device (the last padded)


def layout_of(images_shape: tuple[int, ...], normalize: Any, crop: int, num_devices: int) -> Layout:
    """The `Layout` of `(N, H, W, C)` images split over `num_devices`."""
    n, height, width, channels = images_shape
    scale, offset = normalize_affine(normalize)
    rows = -(-n // num_devices)
    return Layout(height, width, channels, crop, scale, offset, rows)


def _padded(
    images: np.ndarray, labels: np.ndarray, multiple: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images `(N, H, W, C)` uint8 and labels zero-padded to N' (a multiple of `multiple`):
    `(N', H * W, C)` uint8, `(N',)` int32, the `(N',)` bool mask of real rows."""
    images, labels = check_arrays(images, labels)
    n, height, width, channels = images.shape
    size = -(-n // multiple) * multiple
    flat = np.zeros((size, height * width, channels), np.uint8)
    flat[:n] = images.reshape(n, height * width, channels)
    padded = np.zeros(size, np.int32)
    padded[:n] = labels
    return flat, padded, np.arange(size) < n


@dataclasses.dataclass
class DeviceArrays:
    """A split on the devices: for training, images `(N', H * W, C)` uint8 split along N', labels
    `(N',)` replicated; for evaluation, images `(S, EB, H * W, C)`, labels and mask `(S, EB)`,
    split along EB."""

    images: Any
    labels: Any
    layout: Layout
    mask: Any = None


def put_train_arrays(
    parallel: OneDevice,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    normalize: Any = "unit",
    crop: int = CROP_SIZE,
) -> DeviceArrays:
    """Sends `images (N, H, W, C) uint8` and `labels (N,)` to the devices, once."""
    flat, padded_labels, _ = _padded(images, labels, parallel.num_devices)
    return DeviceArrays(
        images=parallel.place(flat, 0),
        labels=parallel.place(padded_labels, None),
        layout=layout_of(images.shape, normalize, crop, parallel.num_devices),
    )


def plan_chunk(plan: dict[str, np.ndarray], start: int, length: int) -> dict[str, np.ndarray]:
    """Steps [start, start + length) of an epoch plan as int32 arrays `(length, B, ...)`."""
    keys = AFFINE_PLAN_KEYS if "affine" in plan else PLAN_KEYS
    keys += ("erase",) if "erase" in plan else ()
    return {k: plan[k][start : start + length].astype(np.int32) for k in keys}


def gather_train_batch(
    images: jax.Array,
    labels: jax.Array,
    row: dict[str, jax.Array],
    layout: Layout,
    axis_name: str | None,
) -> dict[str, jax.Array]:
    """This device's slice `{'image': (B / D, c, c, C) float32, 'label': (B / D,) int32}` of
    one plan step's global batch (`row`: `plan_chunk`'s keys, each `(B, ...)`), gathered from
    its `(rows_per_device, H * W, C)` images: each device crops the images it holds, and one
    `psum_scatter` hands each its slice (in device order, as the tf.data pipeline's)."""
    index = row["index"]
    if "affine" in row:
        pixels = affine_crop_pixels(row["affine"], layout.height, layout.width, layout.crop, jnp)
    else:
        offsets = jnp.asarray(crop_pixel_offsets(layout.width, layout.crop), jnp.int32)
        corner = row["top"] * layout.width + row["left"]
        pixels = corner[:, None, None] + offsets[row["flip"]]  # (B, c, c)
    if axis_name is None:
        crops = images[index[:, None, None], pixels].astype(jnp.float32)
        batch_labels = labels[index]
    else:
        device = jax.lax.axis_index(axis_name)
        local = index - device * layout.rows_per_device
        mine = (local >= 0) & (local < layout.rows_per_device)
        local = jnp.clip(local, 0, layout.rows_per_device - 1)
        crops = images[local[:, None, None], pixels].astype(jnp.float32)
        crops = jnp.where(mine[:, None, None, None], crops, 0.0)
        # Exactly one device holds each image: the sum is that device's crop, exactly.
        crops = jax.lax.psum_scatter(crops, axis_name, scatter_dimension=0, tiled=True)
        per_device = index.shape[0] // jax.lax.psum(1, axis_name)
        my_rows = jax.lax.dynamic_slice_in_dim(index, device * per_device, per_device)
        batch_labels = labels[my_rows]
    if "erase" in row:  # on this device's rows of the batch: the boxes' matching slice
        boxes = row["erase"]
        if axis_name is not None:
            boxes = jax.lax.dynamic_slice_in_dim(boxes, device * per_device, per_device)
        crops = jnp.where(erase_keep(boxes, layout.crop)[..., None], crops, 0.0)
    return {"image": crops * layout.scale + layout.offset, "label": batch_labels}


def train_chunk_fn(
    train_step: Callable[..., tuple[Any, dict[str, jax.Array]]],
    layout: Layout,
    over_rows: Callable[[Callable], Callable] = lambda gather: gather,
) -> Callable[..., tuple[Any, dict[str, jax.Array]]]:
    """`chunk(state, images, labels, plan, *, axis_name) -> (state, metrics (L,) each)`:
    `train_step` once per plan row on the batch gathered on the device (`over_rows`:
    `OneModel.gather`)."""

    def chunk(state, images, labels, plan, *, axis_name):
        def gather(row):
            return gather_train_batch(images, labels, row, layout, axis_name)

        def body(state, row):
            return train_step(state, over_rows(gather)(row), axis_name=axis_name)

        if plan["index"].shape[0] == 1:  # no loop: XLA:CPU runs loop bodies more slowly
            state, metrics = body(state, jax.tree.map(lambda x: x[0], plan))
            return state, jax.tree.map(lambda x: jnp.asarray(x)[None], metrics)
        return jax.lax.scan(body, state, plan)

    return chunk


def put_eval_arrays(
    parallel: OneDevice,
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    *,
    normalize: Any = "unit",
    crop: int = CROP_SIZE,
) -> DeviceArrays:
    """Sends a split to the devices as whole padded batches of `batch_size`, once."""
    flat, padded, mask = _padded(images, labels, batch_size)
    shape = (-1, batch_size)
    return DeviceArrays(
        images=parallel.place(flat.reshape(shape + flat.shape[1:]), 1),
        labels=parallel.place(padded.reshape(shape), 1),
        mask=parallel.place(mask.reshape(shape), 1),
        layout=layout_of(images.shape, normalize, crop, parallel.num_devices),
    )


def eval_split_fn(
    eval_step: Callable[..., Any], layout: Layout, crops: int = NUM_CROPS
) -> Callable[..., Any]:
    """`evaluate(state, images, labels, mask, *, axis_name)` -> `eval_step`'s metrics merged
    over the split, of the ten crops or (`crops=1`) the centre one, gathered on the device."""
    pixels = ten_crop_pixel_indices(layout.height, layout.width, layout.crop)
    if crops == 1:
        pixels = pixels[CENTRE_CROP_INDEX, None]

    def evaluate(state, images, labels, mask, *, axis_name):
        def sums(x, y, m):
            images = x[:, jnp.asarray(pixels)].astype(jnp.float32)  # (b, crops, c, c, C)
            batch = {"image": images * layout.scale + layout.offset, "label": y, "mask": m}
            return eval_step(state, batch, axis_name=axis_name)

        def body(total, xs):
            return metrics.merge(total, sums(*xs)), None

        shapes = jax.eval_shape(sums, images[0], labels[0], mask[0])
        zero = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)
        total, _ = jax.lax.scan(body, zero, (images, labels, mask))
        return total

    return evaluate


def dispatches(
    start_step: int,
    total_steps: int,
    steps_per_epoch: int,
    steps_per_dispatch: int,
    checkpoint_every_steps: int,
) -> Iterator[tuple[int, int]]:
    """`(first global step, steps)` of each call: at most `steps_per_dispatch` steps, ending at
    every epoch end and multiple of `checkpoint_every_steps` (if > 0). A function of the step
    alone, so a resumed run ends bit-identical to an uninterrupted one."""
    step = start_step
    every = checkpoint_every_steps
    while step < total_steps:
        end = min(step + steps_per_dispatch, (step // steps_per_epoch + 1) * steps_per_epoch)
        if every > 0:
            end = min(end, (step // every + 1) * every)
        yield step, end - step
        step = end


def augmentation(config: ml_collections.ConfigDict) -> dict[str, float]:
    """`epoch_plan`'s `zoom`, `rotate` and `erase` from `config.augment` (absent: 0)."""
    augment = config.get("augment", {})
    return {k: float(augment.get(k, 0.0)) for k in ("zoom", "rotate", "erase")}


TrainCall = Callable[[TrainState], tuple[TrainState, dict[str, jax.Array]]]


@dataclasses.dataclass
class DeviceInput:
    """The compiled calls of one training job (shared by the cross-validation folds) over data
    on the devices: a training call runs `steps_per_dispatch` steps, an evaluation a split."""

    config: ml_collections.ConfigDict
    devices: OneDevice  # or `parallel.DataParallel`: the same interface
    model: ResNet18
    models: OneModel  # or K models in one program: the same interface
    _train_fns: dict[Any, Compiled] = dataclasses.field(default_factory=dict)
    _eval_fns: dict[Any, Compiled] = dataclasses.field(default_factory=dict)
    _eval_arrays: list[tuple[np.ndarray, np.ndarray, Any]] = dataclasses.field(default_factory=list)

    input_pipeline = "device"

    @property
    def steps_per_dispatch(self) -> int:
        """`config.steps_per_dispatch`, 0 meaning 64 on accelerators and 1 on CPU."""
        if self.config.steps_per_dispatch:
            return self.config.steps_per_dispatch
        return 1 if self.devices.devices[0].platform == "cpu" else 64

    @property
    def compile_seconds(self) -> dict[str, float]:

        return {
            "train": sum(f.compile_seconds for f in self._train_fns.values()),
            "eval": sum(f.compile_seconds for f in self._eval_fns.values()),
        }

    def train_fn(self, layout: Layout) -> Compiled:
        """`fn(state, images, labels, plan) -> (state, metrics)` for data of `layout`."""
        fn = self._train_fns.get(layout)
        if fn is None:
            chunk = train_chunk_fn(self.models.train_step(), layout, self.models.gather)
            fn = self.devices.compile(chunk, split_axes=(0, None, None))
            self._train_fns[layout] = fn
        return fn

    def train_calls(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        start_step: int,
        total_steps: int,
        steps_per_epoch: int,
    ) -> Iterator[tuple[int, TrainCall]]:
        """`(steps, run)` per call from `start_step` on: `run(state) -> (state, metrics)`."""
        config = self.config
        data = put_train_arrays(self.devices, images, labels, normalize=config.normalize)
        fn = self.train_fn(data.layout)
        augment = augmentation(config)

        def plan_of(seed: int, epoch: int) -> dict[str, np.ndarray]:
            return epoch_plan(
                len(labels),
                config.batch_size,
                seed=seed,
                epoch=epoch,
                image_shape=images.shape[1:3],
                **augment,
            )

        epoch, plan = -1, None
        every = config.checkpoint_every_steps
        spd = self.steps_per_dispatch
        for first, steps in dispatches(start_step, total_steps, steps_per_epoch, spd, every):
            if first // steps_per_epoch != epoch:
                epoch = first // steps_per_epoch
                plan = self.models.epoch_plan(lambda seed, e=epoch: plan_of(seed, e))
            rows = self.devices.place(plan_chunk(plan, first % steps_per_epoch, steps), None)
            yield steps, lambda s, rows=rows: fn(s, data.images, data.labels, rows)

    def _arrays(self, images: np.ndarray, labels: np.ndarray) -> DeviceArrays:
        for held_images, held_labels, arrays in self._eval_arrays:
            if held_images is images and held_labels is labels:
                return arrays
        arrays = put_eval_arrays(
            self.devices,
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
    ) -> dict[str, Any]:
        """The report (`models.report`) of device `state` (its moving average, if any) on
        the ten crops or (`crops=1`) the centre one."""
        arrays = self._arrays(images, labels)
        fn = self._eval_fns.get((arrays.layout, crops))
        if fn is None:
            evaluate_split = eval_split_fn(self.models.eval_step(), arrays.layout, crops)
            fn = self.devices.compile(
                evaluate_split, split_axes=(1, 1, 1), donate_state=False, replicated_out=1
            )
            self._eval_fns[(arrays.layout, crops)] = fn
        totals = fn(ema_view(state), arrays.images, arrays.labels, arrays.mask)
        return self.models.report(self.devices.unreplicate(totals), len(labels))
