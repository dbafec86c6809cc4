"""The numpy side of the input pipelines: epoch plans, step counts, normalisation, checks.

Shared by the tf.data pipelines (`pipelines`) and the on-device input
(`fer_jax.training.device_input`), so that both feed exactly the same batches; imports no
TensorFlow. What a plan draws, and in what order: docs/data.md, "Input pipeline". The option
values are `fer_jax.training.config_schema`'s to check.
"""

from __future__ import annotations

import numpy as np

from data_pipelines.crops import CROP_SIZE, crop_affine, erase_boxes

Normalize = str | tuple[float, float]


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Training steps per epoch: full batches only (`drop_remainder`)."""
    steps = num_examples // batch_size
    if steps == 0:
        raise ValueError(f"{num_examples} examples do not fill one batch of {batch_size}")
    return steps


def eval_steps(num_examples: int, batch_size: int) -> int:
    """Evaluation batches for a split: ceil(num_examples / batch_size), the last one padded."""
    return -(-num_examples // batch_size)


def epoch_plan(
    num_examples: int,
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    image_shape: tuple[int, int] = (48, 48),
    crop: int = CROP_SIZE,
    flip: bool = True,
    zoom: float = 0.0,
    rotate: float = 0.0,
    erase: float = 0.0,
) -> dict[str, np.ndarray]:
    """The random choices of one training epoch, a pure function of its arguments: 'index'
    (S, B) int64 example indices (a permutation prefix), 'top' and 'left' (S, B) int32 crop
    offsets, 'flip' (S, B) bool (S = steps per epoch); with zoom or rotate > 0, 'affine'
    (S, B, 6) int32 (`crops.crop_affine`), which then defines the crop; with erase > 0, 'erase'
    (S, B, 4) int32 boxes (`crops.erase_boxes`). `zoom`: scales in [1 - zoom, 1 + zoom];
    `rotate`: angles in [-rotate, rotate] degrees; `erase`: a probability."""
    steps = steps_per_epoch(num_examples, batch_size)
    height, width = image_shape
    rng = np.random.default_rng([seed, epoch])
    shape = (steps, batch_size)
    index = rng.permutation(num_examples)[: steps * batch_size].reshape(shape)
    plan = {
        "index": index.astype(np.int64),
        "top": rng.integers(0, height - crop, size=shape, endpoint=True).astype(np.int32),
        "left": rng.integers(0, width - crop, size=shape, endpoint=True).astype(np.int32),
        "flip": (rng.random(shape) < 0.5) & flip,
    }
    if zoom > 0 or rotate > 0:
        scale = rng.uniform(1 - zoom, 1 + zoom, shape)
        angle = rng.uniform(-rotate, rotate, shape)
        plan["affine"] = crop_affine(plan["top"], plan["left"], plan["flip"], scale, angle, crop)
    if erase > 0:
        plan["erase"] = erase_boxes(rng, shape, erase, crop)
    return plan


def check_arrays(images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    images, labels = np.asarray(images), np.asarray(labels)
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(
            f"images must be (N, H, W, C) uint8, got {images.dtype} of shape {images.shape}"
        )
    if labels.shape != images.shape[:1] or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"labels must be ({images.shape[0]},) integers, got {labels.dtype} {labels.shape}"
        )
    return images, labels


def normalize_affine(normalize: Normalize) -> tuple[float, float]:
    """`(scale, offset)` with normalised = uint8 pixel * scale + offset: 'unit' x / 255,
    'symmetric' x / 127.5 - 1, (mean, std) (x / 255 - mean) / std."""
    if normalize == "unit":
        return 1 / 255, 0.0
    if normalize == "symmetric":
        return 1 / 127.5, -1.0
    mean, std = (float(v) for v in normalize)
    return 1 / (255 * std), -mean / std
