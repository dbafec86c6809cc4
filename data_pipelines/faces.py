"""Face detection and face crops for grayscale photos (numpy and OpenCV only, no TensorFlow).

Used to turn a JAFFE photo (or any photo given to the prediction CLI) into a FER2013-like
48x48 face. The detector is OpenCV's frontal-face Haar cascade, shipped inside
opencv-python-headless 4.x under `cv2.data.haarcascades` (nothing is downloaded).

Crop rule (`crop_face`): a square centred on the detected box's centre, with side
`max(w, h) * (1 + 2 * margin)`, i.e. the box's larger side plus `margin` of it on every side
(default margin 0.1: a 100 px box gives a 120 px square). Parts of the square outside the image
are filled by repeating the border pixels, so the face stays centred. The square is resized to
`size` x `size` with `cv2.INTER_AREA`. Where no face is found: `centre_crop_face`.
"""

from __future__ import annotations

import functools
import os

import cv2
import numpy as np

CASCADE_FILE = "haarcascade_frontalface_default.xml"
DEFAULT_MARGIN = 0.1
DEFAULT_CENTRE_FRACTION = 0.6


@functools.lru_cache(maxsize=1)
def _cascade() -> cv2.CascadeClassifier:
    path = os.path.join(cv2.data.haarcascades, CASCADE_FILE)
    cascade = cv2.CascadeClassifier(path)
    if cascade.empty():
        raise FileNotFoundError(f"Cannot load the OpenCV Haar cascade {path}")
    return cascade


def _check_gray(gray: np.ndarray) -> None:
    if not isinstance(gray, np.ndarray) or gray.ndim != 2 or gray.dtype != np.uint8:
        got = type(gray).__name__
        if isinstance(gray, np.ndarray):
            got = f"{gray.dtype} array of shape {gray.shape}"
        raise ValueError(f"expected a (H, W) uint8 grayscale image, got a {got}")


def detect_faces(
    gray: np.ndarray,
    *,
    scale_factor: float = 1.1,
    min_neighbors: int = 5,
    min_size: tuple[int, int] = (60, 60),
) -> np.ndarray:
    """Frontal faces in (H, W) uint8 `gray` (OpenCV's Haar cascade; the keywords are
    `detectMultiScale`'s, whose defaults here find exactly one face in each real JAFFE photo):
    (N, 4) int64 boxes `[x, y, w, h]`, largest first (ties: top-left)."""
    _check_gray(gray)
    boxes = _cascade().detectMultiScale(
        gray, scaleFactor=scale_factor, minNeighbors=min_neighbors, minSize=tuple(min_size)
    )
    boxes = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
    order = np.lexsort((boxes[:, 0], boxes[:, 1], -boxes[:, 2] * boxes[:, 3]))
    return boxes[order]


def _square_crop(gray: np.ndarray, cx: float, cy: float, side: int, size: int) -> np.ndarray:
    """Crops the side x side square centred at (cx, cy), edge-padded, resized to size x size."""
    side = max(int(side), 1)
    x0 = int(round(cx - side / 2))
    y0 = int(round(cy - side / 2))
    h, w = gray.shape
    pad = max(0, -x0, -y0, x0 + side - w, y0 + side - h)
    if pad:
        gray = np.pad(gray, pad, mode="edge")
        x0, y0 = x0 + pad, y0 + pad
    square = gray[y0 : y0 + side, x0 : x0 + side]
    return cv2.resize(square, (size, size), interpolation=cv2.INTER_AREA)


def crop_face(
    gray: np.ndarray,
    box: np.ndarray | tuple[int, int, int, int],
    *,
    margin: float = DEFAULT_MARGIN,
    size: int = 48,
) -> np.ndarray:
    """(size, size) uint8: the square face around `box` `[x, y, w, h]` (e.g. a row of
    `detect_faces`) in (H, W) uint8 `gray`, as the module docstring says."""
    _check_gray(gray)
    x, y, w, h = (int(v) for v in box)
    if w <= 0 or h <= 0:
        raise ValueError(f"face box {[x, y, w, h]} has no area")
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    side = int(round(max(w, h) * (1 + 2 * margin)))
    return _square_crop(gray, x + w / 2, y + h / 2, side, size)


def centre_crop_face(
    gray: np.ndarray, size: int = 48, *, fraction: float = DEFAULT_CENTRE_FRACTION
) -> np.ndarray:
    """The fallback crop, (size, size) uint8: the central square of side `fraction` (in
    (0, 1]) of the shorter side of (H, W) uint8 `gray`, resized."""
    _check_gray(gray)
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    h, w = gray.shape
    return _square_crop(gray, w / 2, h / 2, int(round(fraction * min(h, w))), size)


def face_or_centre_crop(
    gray: np.ndarray, *, margin: float = DEFAULT_MARGIN, size: int = 48, **detect_kwargs
) -> tuple[np.ndarray, bool]:
    """`((size, size) uint8 crop, whether a face was found)`: the largest detected face, or
    the centre crop if none is found."""
    boxes = detect_faces(gray, **detect_kwargs)
    if len(boxes):
        return crop_face(gray, boxes[0], margin=margin, size=size), True
    return centre_crop_face(gray, size), False
