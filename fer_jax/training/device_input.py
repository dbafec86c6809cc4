"""Training and evaluation input that lives on the accelerator(s): no host pipeline per step.

The uint8 training set goes to the devices once, split over them along the example axis. Each
epoch's plan (`data_pipelines.plan.epoch_plan`: permutation, crop offsets, flips, with zoom or
rotation each crop's integer affine map, with erasing each crop's box; the same function of
(seed, epoch) that the tf.data pipeline uses) is sent per dispatch as small int32 arrays, and the
compiled step gathers the crops on the device and runs `len(plan)` training steps in one call
(`lax.scan`). Under data parallelism every device gathers the crops of the global batch whose
images it holds, and one `psum_scatter` hands each device its contiguous slice of the batch (the
rows the tf.data pipeline would have given it), so both input modes train on exactly the same
batches.

Evaluation splits go to the devices once too, padded to whole batches of `eval_batch_size`
(split over the devices along the batch axis), and a whole split is evaluated in one call,
ten crops gathered per image on the device (`data_pipelines.crops` order).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
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
from data_pipelines.plan import check_arrays, normalize_affine
from fer_jax.training import metrics
from fer_jax.training.parallel import DataParallel

PLAN_KEYS = ("index", "top", "left", "flip")
AFFINE_PLAN_KEYS = ("index", "affine")  # a plan with zoom or rotation: the maps hold the rest


@dataclasses.dataclass(frozen=True)
class Layout:
    """Static facts the compiled functions need: image shape, crop, normalisation."""

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
    """`images (N, H, W, C) uint8`, `labels (N,)` padded with zeros to N' (a multiple of
    `multiple`): `(N', H * W, C)` uint8, `(N',)` int32, and the `(N',)` bool mask of real rows."""
    images, labels = check_arrays(images, labels)
    n, height, width, channels = images.shape
    size = -(-n // multiple) * multiple
    flat = np.zeros((size, height * width, channels), np.uint8)
    flat[:n] = images.reshape(n, height * width, channels)
    padded = np.zeros(size, np.int32)
    padded[:n] = labels
    return flat, padded, np.arange(size) < n


@dataclasses.dataclass
class TrainArrays:
    """The training set on the devices: 'images' (N', H * W, C) uint8 split over the devices
    along N' (N padded to a multiple of the device count), 'labels' (N',) int32 replicated."""

    images: Any
    labels: Any
    layout: Layout


def put_train_arrays(
    parallel: DataParallel,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    normalize: Any = "unit",
    crop: int = CROP_SIZE,
) -> TrainArrays:
    """Sends `images (N, H, W, C) uint8` and `labels (N,)` to the devices, once."""
    flat, padded_labels, _ = _padded(images, labels, parallel.num_devices)
    return TrainArrays(
        images=parallel.place(flat, 0),
        labels=parallel.place(padded_labels, None),
        layout=layout_of(images.shape, normalize, crop, parallel.num_devices),
    )


def plan_chunk(plan: dict[str, np.ndarray], start: int, length: int) -> dict[str, np.ndarray]:
    """Steps [start, start + length) of an epoch plan as int32 arrays `(length, B)` (and
    'affine' `(length, B, 6)`): those of `PLAN_KEYS`, or of `AFFINE_PLAN_KEYS` if it has maps;
    and 'erase' `(length, B, 4)` if it has erasing boxes."""
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
    """One step's batch on this device from its shard of the training set.

    Args:
      images: (rows_per_device, H * W, C) uint8, this device's examples.
      labels: (N',) int32, all labels.
      row: one plan step over the global batch, `plan_chunk`'s keys: each (B,) int32 ('flip'
        0/1), 'affine' (B, 6) int32, 'erase' (B, 4) int32.
      layout: shapes and normalisation.
      axis_name: the data-parallel axis, or None on one device.

    Returns:
      {'image': (B / D, c, c, C) float32, 'label': (B / D,) int32}: this device's slice of
      the global batch (rows d * B / D ... in device order), normalised.
    """
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
    train_step: Callable[..., tuple[Any, dict[str, jax.Array]]], layout: Layout
) -> Callable[..., tuple[Any, dict[str, jax.Array]]]:
    """`chunk(state, images, labels, plan, *, axis_name) -> (state, metrics (L,) each)`:
    `train_step(state, batch, axis_name=...)` once per plan row, batches gathered on the
    device; for `DataParallel.compile(..., split_axes=(0, None, None))`. A plan of replicas
    (`(L, K, B)` arrays) gathers one batch per replica: `(K, B / D, ...)`."""

    def chunk(state, images, labels, plan, *, axis_name):
        def gather(row):
            return gather_train_batch(images, labels, row, layout, axis_name)

        def body(state, row):
            batch = gather(row) if row["index"].ndim == 1 else jax.vmap(gather)(row)
            return train_step(state, batch, axis_name=axis_name)

        if plan["index"].shape[0] == 1:  # no loop: XLA:CPU runs loop bodies more slowly
            state, metrics = body(state, jax.tree.map(lambda x: x[0], plan))
            return state, jax.tree.map(lambda x: jnp.asarray(x)[None], metrics)
        return jax.lax.scan(body, state, plan)

    return chunk


@dataclasses.dataclass
class EvalArrays:
    """A split on the devices: 'images' (S, EB, H * W, C) uint8, 'labels' (S, EB) int32 and
    'mask' (S, EB) bool (False on padding), split over the devices along EB."""

    images: Any
    labels: Any
    mask: Any
    layout: Layout


def put_eval_arrays(
    parallel: DataParallel,
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    *,
    normalize: Any = "unit",
    crop: int = CROP_SIZE,
) -> EvalArrays:
    """Sends a split to the devices as whole padded batches of `batch_size`, once."""
    flat, padded, mask = _padded(images, labels, batch_size)
    shape = (-1, batch_size)
    return EvalArrays(
        images=parallel.place(flat.reshape(shape + flat.shape[1:]), 1),
        labels=parallel.place(padded.reshape(shape), 1),
        mask=parallel.place(mask.reshape(shape), 1),
        layout=layout_of(images.shape, normalize, crop, parallel.num_devices),
    )


def eval_split_fn(
    eval_step: Callable[..., Any], layout: Layout, crops: int = NUM_CROPS
) -> Callable[..., Any]:
    """`evaluate(state, images, labels, mask, *, axis_name)` -> `eval_step`'s metrics merged
    over the whole split (`fer_jax.training.metrics.merge`), of the ten crops (`crops=10`) or
    the centre crop alone (`crops=1`, a tenth of the compute) gathered on the device."""
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
