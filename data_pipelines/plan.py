"""The numpy side of the input pipelines: epoch plans, step counts, normalisation, checks.

Shared by the tf.data pipelines (`pipelines`) and the on-device input of the training loop
(`fer_jax.training.device_input`), so that both feed exactly the same batches. Imports no
TensorFlow.

The epoch plan comes from `np.random.default_rng([seed, epoch])`: the permutation of the N
examples (the last N % B are dropped that epoch), then per example a crop offset (top, left),
each uniform in 0..H-c / 0..W-c inclusive (0..4 for 44 of 48; no padding), and a horizontal flip
with probability 0.5. It depends only on (seed, epoch).

Zoom and rotation (`zoom`, `rotate`; both 0 by default, and then the plan is the above alone):
after those draws, per example a scale s uniform in [1 - zoom, 1 + zoom] (s > 1 zooms out: the
crop covers s times as much of the image across) and an angle uniform in [-rotate, rotate]
degrees, so the permutation, offsets and flips stay those of the plain plan. Each crop is then
one integer fixed-point affine map (`crops.crop_affine`: about the centre of its window at
(top, left), scaled by s, turned by the angle, mirrored where flipped; pixels beyond the image
repeat its edge), from which both pipelines compute the same pixel indices with integer
arithmetic alone (`crops.affine_crop_pixels`).

Random erasing (`erase`, a probability; 0 by default): drawn after all of the above, per
example a box (`crops.erase_boxes`: torchvision's `RandomErasing` scheme) whose pixels both
pipelines set to 0 (black) before normalisation (`crops.erase_keep`).

Normalisation (`normalize`): 'unit' x / 255 in [0, 1]; 'symmetric' x / 127.5 - 1 in [-1, 1];
or a (mean, std) pair applied after 'unit': (x / 255 - mean) / std. `normalize_affine` gives it
as `x * scale + offset`, the one form every pipeline applies.
"""

from __future__ import annotations

import numpy as np

from data_pipelines.crops import CROP_SIZE, crop_affine, erase_boxes

Normalize = str | tuple[float, float]


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Training steps per epoch: full batches only (`drop_remainder`)."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    steps = num_examples // batch_size
    if steps == 0:
        raise ValueError(f"{num_examples} examples do not fill one batch of {batch_size}")
    return steps


def eval_steps(num_examples: int, batch_size: int) -> int:
    """Evaluation batches for a split: ceil(num_examples / batch_size), the last one padded."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    return -(-num_examples // batch_size)


def check_augmentation(zoom: float, rotate: float, erase: float = 0.0) -> None:
    """Raises ValueError unless 0 <= zoom < 1 (scales stay positive), rotate >= 0 degrees and
    0 <= erase <= 1 (a probability)."""
    if not (0 <= zoom < 1 and 0 <= rotate < np.inf):
        raise ValueError(f"zoom must be in [0, 1) and rotate >= 0, got {zoom} and {rotate}")
    if not 0 <= erase <= 1:
        raise ValueError(f"erase must be a probability in [0, 1], got {erase}")


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
    """The random choices of one training epoch, a pure function of its arguments.

    Args:
      flip: random horizontal flips (else none; the draws are made either way).
      zoom: the scale s of each crop is uniform in [1 - zoom, 1 + zoom]; 0 <= zoom < 1.
      rotate: each crop's angle is uniform in [-rotate, rotate] degrees; rotate >= 0.
      erase: each crop is randomly erased with this probability (`crops.erase_boxes`).

    Returns:
      'index' (S, B) int64 example indices (a permutation prefix), 'top' and 'left' (S, B) int32
      crop offsets in 0..H-crop and 0..W-crop inclusive, 'flip' (S, B) bool; S = steps per epoch.
      With zoom or rotate > 0 also 'affine' (S, B, 6) int32, each crop's map
      (`crops.crop_affine`), which then defines the crop. With erase > 0 also 'erase'
      (S, B, 4) int32 boxes [top, left, bottom, right) in crop pixels (empty: not erased).
    """
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be >= 0, got seed={seed}, epoch={epoch}")
    check_augmentation(zoom, rotate, erase)
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
    """`(scale, offset)` with normalised = uint8 pixel * scale + offset (module docstring)."""
    if normalize == "unit":
        return 1 / 255, 0.0
    if normalize == "symmetric":
        return 1 / 127.5, -1.0
    if isinstance(normalize, tuple | list) and len(normalize) == 2:
        mean, std = (float(v) for v in normalize)
        if std <= 0:
            raise ValueError(f"normalize std must be positive, got {std}")
        return 1 / (255 * std), -mean / std
    raise ValueError(f"normalize must be 'unit', 'symmetric' or (mean, std), got {normalize!r}")
