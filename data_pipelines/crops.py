"""Ten-crop evaluation crops (numpy), in torchvision's `TenCrop` order.

For a crop side c of an (H, W) image the five crops are, as (top, left) offsets: top-left (0, 0),
top-right (0, W-c), bottom-left (H-c, 0), bottom-right (H-c, W-c) and centre
(round((H-c)/2), round((W-c)/2)) -- for 44 of 48, (2, 2). `ten_crop` returns those five crops of
the image followed by the same five crops of its horizontal mirror (not the mirrored crops: the
mirror's top-left crop is the mirror of the image's top-right crop), exactly as
`torchvision.transforms.TenCrop(c)` does.
"""

from __future__ import annotations

import numpy as np

CROP_SIZE = 44
NUM_CROPS = 10
CENTRE_CROP_INDEX = 4  # the centre crop's place among `ten_crop`'s ten


def five_crop_offsets(height: int, width: int, crop: int = CROP_SIZE) -> list[tuple[int, int]]:
    """(top, left) of the top-left, top-right, bottom-left, bottom-right and centre crops."""
    if not 0 < crop <= min(height, width):
        raise ValueError(f"crop {crop} does not fit a {height}x{width} image")
    bottom, right = height - crop, width - crop
    # int(round(.)) as torchvision's center_crop does (ties to even).
    centre = (int(round(bottom / 2)), int(round(right / 2)))
    return [(0, 0), (0, right), (bottom, 0), (bottom, right), centre]


def ten_crop(images: np.ndarray, crop: int = CROP_SIZE) -> np.ndarray:
    """The ten crops of each image, in TenCrop order (module docstring).

    Args:
      images: (N, H, W, C) array, any dtype.
      crop: side of the square crops in pixels.

    Returns:
      (N, 10, crop, crop, C), same dtype.
    """
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"expected (N, H, W, C) images, got shape {images.shape}")
    offsets = five_crop_offsets(images.shape[1], images.shape[2], crop)
    mirror = images[:, :, ::-1]
    crops = [x[:, t : t + crop, s : s + crop] for x in (images, mirror) for t, s in offsets]
    return np.stack(crops, axis=1)


def crop_pixel_offsets(width: int, crop: int = CROP_SIZE) -> np.ndarray:
    """(2, crop, crop) int64 flat pixel offsets (row * width + col) of a crop's pixels from its
    top-left pixel: [0] plain, [1] mirrored horizontally. The training crops of both input
    pipelines (tf.data and on-device) are gathered with these."""
    i, j = np.mgrid[:crop, :crop]
    return np.stack([i * width + j, i * width + crop - 1 - j])


def ten_crop_pixel_indices(height: int, width: int, crop: int = CROP_SIZE) -> np.ndarray:
    """Flat pixel indices (row * width + col) of `ten_crop`'s outputs: (10, crop, crop) int64.

    `images.reshape(N, H * W, C)[:, idx]` equals `ten_crop(images, crop)`; the tf.data pipeline
    gathers with these so it matches the numpy reference by construction.
    """
    grid = np.arange(height * width, dtype=np.int64).reshape(1, height, width, 1)
    return ten_crop(grid, crop)[0, ..., 0]
