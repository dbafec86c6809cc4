"""In-memory tf.data pipelines: random-crop/flip training batches and ten-crop evaluation batches.

Both take whole splits as numpy arrays and gather each batch's pixels with one `tf.gather` on
the flattened images, vectorised over the batch; the epoch plans and the normalisation are
`plan`'s, shared with the on-device input. With `num_devices=D` every array is (D, B / D, ...).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np

from data_pipelines.crops import (
    CENTRE_CROP_INDEX,
    CROP_SIZE,
    affine_crop_pixels,
    crop_pixel_offsets,
    erase_keep,
    five_crop_offsets,
    ten_crop_pixel_indices,
)
from data_pipelines.plan import (
    Normalize,
    check_arrays,
    epoch_plan,
    eval_steps,
    normalize_affine,
    steps_per_epoch,
)
from data_pipelines.tf_cpu import tf

_MAX_EPOCHS = 2**62


def normalizer(normalize: Normalize) -> Callable[[tf.Tensor], tf.Tensor]:
    """uint8 tensor -> float32 tensor, per the `normalize` option (`plan.normalize_affine`)."""
    scale, offset = normalize_affine(normalize)
    return lambda x: tf.cast(x, tf.float32) * scale + offset


def _split_devices(batch: dict[str, tf.Tensor], num_devices: int | None) -> dict[str, tf.Tensor]:
    if num_devices is None:
        return batch
    return {k: tf.reshape(v, [num_devices, -1, *v.shape[1:]]) for k, v in batch.items()}


def _check_devices(batch_size: int, num_devices: int | None) -> None:
    if num_devices is not None and batch_size % num_devices:
        raise ValueError(f"batch_size {batch_size} is not divisible by num_devices {num_devices}")


def _options(ds: tf.data.Dataset) -> tf.data.Dataset:
    options = tf.data.Options()
    options.deterministic = True
    return ds.with_options(options)


def train_dataset_from_arrays(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    batch_size: int,
    seed: int,
    start_epoch: int = 0,
    start_step: int = 0,
    num_epochs: int | None = None,
    num_devices: int | None = None,
    normalize: Normalize = "unit",
    crop: int = CROP_SIZE,
    flip: bool = True,
    zoom: float = 0.0,
    rotate: float = 0.0,
    erase: float = 0.0,
    return_index: bool = False,
) -> tf.data.Dataset:
    """Augmented training batches {'image': (B, crop, crop, C) float32, 'label': (B,) int32
    (, 'index': (B,) int64)} of `images` (N, H, W, C) uint8 and `labels` (N,), epoch after
    epoch: batch k is global step start_epoch * steps_per_epoch + start_step + k, the batch an
    uninterrupted run yields there. `num_epochs` counts start_epoch's (None: forever); the
    augmentation options are `plan.epoch_plan`'s."""
    images, labels = check_arrays(images, labels)
    _check_devices(batch_size, num_devices)
    n, height, width, _ = images.shape
    steps = steps_per_epoch(n, batch_size)
    if not 0 <= start_step < steps:
        raise ValueError(f"start_step {start_step} outside [0, {steps}) (steps per epoch)")
    if start_epoch < 0:
        raise ValueError(f"start_epoch must be >= 0, got {start_epoch}")
    five_crop_offsets(height, width, crop)  # Checks that the crop fits.
    options = dict(image_shape=(height, width), crop=crop, flip=flip, zoom=zoom, rotate=rotate)
    plan_of = functools.partial(epoch_plan, n, batch_size, seed=seed, erase=erase, **options)
    # The plan's arrays (which there are, their dtypes and shapes) as one epoch has them.
    first = plan_of(epoch=start_epoch)
    types = [tf.as_dtype(v.dtype) for v in first.values()]
    make_batch = _batch_maker(
        images, labels, tuple(first)[4:], crop, normalize, return_index, num_devices
    )

    def plan(epoch: np.int64) -> tuple[np.ndarray, ...]:
        return tuple(plan_of(epoch=int(epoch)).values())

    def epoch_batches(epoch: tf.Tensor) -> tf.data.Dataset:
        out = tf.numpy_function(plan, [epoch], types, stateful=False)
        out = [tf.ensure_shape(t, v.shape) for t, v in zip(out, first.values(), strict=True)]
        skip = tf.where(epoch == start_epoch, tf.constant(start_step, tf.int64), 0)
        return tf.data.Dataset.from_tensor_slices(tuple(out)).skip(skip)

    stop = _MAX_EPOCHS if num_epochs is None else start_epoch + num_epochs
    ds = tf.data.Dataset.range(start_epoch, stop).flat_map(epoch_batches)
    ds = ds.map(make_batch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return _options(ds.prefetch(tf.data.AUTOTUNE))


def _batch_maker(
    images: np.ndarray,
    labels: np.ndarray,
    extras: tuple[str, ...],
    crop: int,
    normalize: Normalize,
    return_index: bool,
    num_devices: int | None,
) -> Callable[..., dict[str, tf.Tensor]]:
    """The function from one step of the plan (index, top, left, flip[, affine][, erase]) to
    its batch of normalised crops (`train_dataset_from_arrays`); `extras` names the optional
    arrays."""
    n, height, width, channels = images.shape
    norm = normalizer(normalize)
    flat_images = tf.constant(images.reshape(n * height * width, channels))
    labels_t = tf.constant(labels.astype(np.int32))
    # Flat pixel offsets of a crop from its top-left pixel, plain and mirrored: (2, crop, crop).
    dtype = tf.int32 if n * height * width < 2**31 else tf.int64
    offsets = tf.constant(crop_pixel_offsets(width, crop), dtype)

    def make_batch(index, top, left, flipped, *extra) -> dict[str, tf.Tensor]:
        named = dict(zip(extras, extra, strict=True))
        maps, boxes = named.get("affine"), named.get("erase")
        if maps is None:
            corner = (tf.cast(index, dtype) * height + tf.cast(top, dtype)) * width
            corner += tf.cast(left, dtype)  # (B,) flat index of each crop's top-left pixel
            pixel = corner[:, None, None] + tf.gather(offsets, tf.cast(flipped, tf.int32))
        else:  # (B, crop, crop) indices within each image, from the integer maps
            within = affine_crop_pixels(maps, height, width, crop, tf)
            pixel = tf.cast(index, dtype)[:, None, None] * (height * width)
            pixel += tf.cast(within, dtype)
        crops = tf.gather(flat_images, pixel)  # (B, crop, crop, C) uint8
        if boxes is not None:
            crops *= tf.cast(erase_keep(boxes, crop), tf.uint8)[..., None]
        batch = {"image": norm(crops), "label": tf.gather(labels_t, index)}
        if return_index:
            batch["index"] = index
        return _split_devices(batch, num_devices)

    return make_batch


def eval_dataset_from_arrays(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    batch_size: int,
    num_devices: int | None = None,
    normalize: Normalize = "unit",
    crop: int = CROP_SIZE,
    crops: str = "ten",
    return_index: bool = False,
) -> tf.data.Dataset:
    """Every example once, in order: eval_steps(N, B) batches {'image': (B, 10, crop, crop, C)
    float32 (`crops.ten_crop`; 'centre': (B, crop, crop, C)), 'label': (B,) int32, 'mask': (B,)
    bool (, 'index': (B,) int64)}, the last padded with zero images, label 0 and mask False."""
    images, labels = check_arrays(images, labels)
    _check_devices(batch_size, num_devices)
    n, height, width, channels = images.shape
    crop_pixels = ten_crop_pixel_indices(height, width, crop)
    if crops == "centre":
        crop_pixels = crop_pixels[CENTRE_CROP_INDEX]
    norm = normalizer(normalize)
    flat_images = tf.constant(images.reshape(n, height * width, channels))
    labels_t = tf.constant(labels.astype(np.int32))
    crop_pixels_t = tf.constant(crop_pixels)

    def make_batch(step: tf.Tensor) -> dict[str, tf.Tensor]:
        index = step * batch_size + tf.range(batch_size, dtype=tf.int64)
        mask = index < n
        index = tf.where(mask, index, 0)
        x = tf.gather(tf.gather(flat_images, index), crop_pixels_t, axis=1)
        x = x * tf.cast(tf.reshape(mask, [-1] + [1] * (x.shape.rank - 1)), tf.uint8)
        batch = {
            "image": norm(x),
            "label": tf.where(mask, tf.gather(labels_t, index), 0),
            "mask": mask,
        }
        if return_index:
            batch["index"] = index
        return _split_devices(batch, num_devices)

    ds = tf.data.Dataset.range(eval_steps(n, batch_size))
    ds = ds.map(make_batch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return _options(ds.prefetch(tf.data.AUTOTUNE))
