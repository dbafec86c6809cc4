"""Evaluation crops in torchvision's `TenCrop` order, and training crops by flat pixel index.

`ten_crop` gives the five crops (corners, then centre) of the image, then the same five of its
horizontal mirror, exactly as `torchvision.transforms.TenCrop(c)` does. Training crops are
gathered with integer arithmetic alone, the same in numpy, jax.numpy and TensorFlow, so that
both input pipelines give the same pixels (docs/data.md, "Input pipeline").
"""

from __future__ import annotations

from typing import Any

import numpy as np

CROP_SIZE = 44
NUM_CROPS = 10
CENTRE_CROP_INDEX = 4  # the centre crop's place among `ten_crop`'s ten
CROP_CHOICES = (NUM_CROPS, 1)  # evaluation: the ten crops (the paper's), or the centre crop alone
FIXED_POINT_ONE = 1 << 16  # 1.0 in `crop_affine`'s fixed point: 16 fractional bits


def five_crop_offsets(height: int, width: int, crop: int = CROP_SIZE) -> list[tuple[int, int]]:
    """(top, left) of the top-left, top-right, bottom-left, bottom-right and centre crops."""
    if not 0 < crop <= min(height, width):
        raise ValueError(f"crop {crop} does not fit a {height}x{width} image")
    bottom, right = height - crop, width - crop
    # int(round(.)) as torchvision's center_crop does (ties to even).
    centre = (int(round(bottom / 2)), int(round(right / 2)))
    return [(0, 0), (0, right), (bottom, 0), (bottom, right), centre]


def ten_crop(images: Any, crop: int = CROP_SIZE) -> Any:
    """(N, H, W, C) images, numpy or jax.numpy -> their ten crops (N, 10, crop, crop, C), in
    TenCrop order: one gather by `ten_crop_pixel_indices`."""
    if images.ndim != 4:
        raise ValueError(f"expected (N, H, W, C) images, got shape {images.shape}")
    n, height, width, channels = images.shape
    return images.reshape(n, height * width, channels)[
        :, ten_crop_pixel_indices(height, width, crop)
    ]


def crop_pixel_offsets(width: int, crop: int = CROP_SIZE) -> np.ndarray:
    """(2, crop, crop) int64 flat pixel offsets (row * width + col) of a crop's pixels from its
    top-left pixel: [0] plain, [1] mirrored horizontally. The training crops of both input
    pipelines (tf.data and on-device) are gathered with these."""
    i, j = np.mgrid[:crop, :crop]
    return np.stack([i * width + j, i * width + crop - 1 - j])


def crop_affine(
    top: np.ndarray,
    left: np.ndarray,
    flip: np.ndarray,
    scale: np.ndarray,
    angle: np.ndarray,
    crop: int = CROP_SIZE,
) -> np.ndarray:
    """Each training crop as an integer fixed-point affine map, (..., 6) int32 [a, b, e, d, f, g]
    (all arguments broadcast): crop pixel (i, j) reads image row `(a*i + b*j + e) // 2**16` and
    column `(d*i + f*j + g) // 2**16`, clipped to the image (edge pixels repeat). About the
    centre of the window at (top, left) the map scales by `scale` (> 1 zooms out), turns the
    sampling axes by `angle` degrees counterclockwise as displayed, and mirrors where `flip`;
    at scale 1 and angle 0 it is the window itself (`crop_pixel_offsets`)."""
    turn = np.deg2rad(angle)
    mirror = np.where(flip, -1.0, 1.0)
    cos, sin = scale * np.cos(turn), scale * np.sin(turn)
    # (row, col) = window centre + [[cos, -sin], [sin, cos]] @ (i - centre, mirror * (j - centre))
    a, b, d, f = (
        np.rint(x * FIXED_POINT_ONE).astype(np.int64)
        for x in (cos, -sin * mirror, sin, cos * mirror)
    )
    # In integers, 2 * centre = crop - 1: the crop's centre lands on the window's to 2**-17 px,
    # and a flipped map is exactly the mirror image of the unflipped one.
    top, left = np.asarray(top, np.int64), np.asarray(left, np.int64)
    half = FIXED_POINT_ONE // 2
    e = ((2 * top + crop - 1) * FIXED_POINT_ONE - (a + b) * (crop - 1)) // 2 + half
    g = ((2 * left + crop - 1) * FIXED_POINT_ONE - (d + f) * (crop - 1)) // 2 + half
    # int32 headroom: every partial sum of a*i + b*j + e is at most this (~2**23 for 44 of 48).
    reach = np.maximum(
        (abs(a) + abs(b)) * (crop - 1) + abs(e), (abs(d) + abs(f)) * (crop - 1) + abs(g)
    )
    if np.max(reach, initial=0) >= 2**31:
        raise ValueError(f"crop affine maps overflow int32: {np.max(reach)} >= 2**31")
    return np.stack(np.broadcast_arrays(a, b, e, d, f, g), axis=-1).astype(np.int32)


def affine_crop_pixels(
    maps: Any, height: int, width: int, crop: int = CROP_SIZE, xp: Any = np
) -> Any:
    """(..., crop, crop) int32 flat pixel indices (row * width + col) of the crops that `maps`
    (`crop_affine`'s, a numpy, jax or tf array) describe; `xp`: the array module (numpy,
    jax.numpy or tensorflow). Integer arithmetic only, the same in every library."""
    i, j = np.mgrid[:crop, :crop].astype(np.int32)
    a, b, e, d, f, g = (maps[..., k, None, None] for k in range(6))
    rows = (a * i + b * j + e) // FIXED_POINT_ONE
    cols = (d * i + f * j + g) // FIXED_POINT_ONE
    rows = xp.minimum(xp.maximum(rows, 0), height - 1)
    cols = xp.minimum(xp.maximum(cols, 0), width - 1)
    return rows * width + cols


# Random erasing's box, as torchvision's `RandomErasing` draws it: area a fraction of the crop's
# uniform in ERASE_AREA, aspect ratio (height / width) log-uniform in ERASE_RATIO.
ERASE_AREA = (0.02, 0.33)
ERASE_RATIO = (0.3, 3.3)
ERASE_TRIES = 10  # torchvision's: a box that does not fit is drawn again, then none


def erase_boxes(
    rng: np.random.Generator, shape: tuple[int, ...], p: float, crop: int
) -> np.ndarray:
    """Random erasing boxes (*shape, 4) int32 [top, left, bottom, right) in crop pixels, drawn
    from `rng` as torchvision does (above): each crop erased with probability `p`, else its box
    is empty (all 0), as it is where `ERASE_TRIES` draws do not fit."""
    erase = rng.random(shape) < p
    height = np.zeros(shape, np.int64)
    width = np.zeros(shape, np.int64)
    lo, hi = np.log(ERASE_RATIO[0]), np.log(ERASE_RATIO[1])
    for _ in range(ERASE_TRIES):
        area = rng.uniform(*ERASE_AREA, shape) * crop * crop
        ratio = np.exp(rng.uniform(lo, hi, shape))
        h = np.rint(np.sqrt(area * ratio)).astype(np.int64)
        w = np.rint(np.sqrt(area / ratio)).astype(np.int64)
        fits = (h < crop) & (w < crop) & (height == 0)
        height, width = np.where(fits, h, height), np.where(fits, w, width)
    height, width = np.where(erase, height, 0), np.where(erase, width, 0)
    top = rng.integers(0, crop - height, endpoint=True)
    left = rng.integers(0, crop - width, endpoint=True)
    return np.stack([top, left, top + height, left + width], axis=-1).astype(np.int32)


def erase_keep(boxes: Any, crop: int = CROP_SIZE) -> Any:
    """`(..., crop, crop)` bool, False inside each crop's erasing box [top, bottom) x
    [left, right) (`erase_boxes`). Comparisons only: numpy, jax.numpy and TensorFlow arrays
    give the same mask."""
    i, j = np.mgrid[:crop, :crop].astype(np.int32)
    top, left, bottom, right = (boxes[..., k, None, None] for k in range(4))
    inside = (i >= top) & (i < bottom) & (j >= left) & (j < right)
    return ~inside


def ten_crop_pixel_indices(height: int, width: int, crop: int = CROP_SIZE) -> np.ndarray:
    """Flat pixel indices (row * width + col) of the ten crops: (10, crop, crop) int32.

    `images.reshape(N, H * W, C)[:, idx]` is `ten_crop(images, crop)`; both input pipelines
    and the recogniser gather with these. The mirror's crop at (top, left) is the image's
    window at (top, W - crop - left), read right to left.
    """
    plain, mirrored = crop_pixel_offsets(width, crop)
    offsets = five_crop_offsets(height, width, crop)
    crops = [top * width + left + plain for top, left in offsets]
    crops += [top * width + width - crop - left + mirrored for top, left in offsets]
    return np.stack(crops).astype(np.int32)
