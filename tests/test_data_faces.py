"""Face detection and the exact geometry of face and centre crops."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from skimage import data as skimage_data

from data_pipelines import faces


def _coords(h: int, w: int) -> np.ndarray:
    """(h, w) uint8 image whose pixel (r, c) holds 2 * r + 3 * c mod 256 (position-dependent)."""
    r, c = np.mgrid[:h, :w]
    return ((2 * r + 3 * c) % 256).astype(np.uint8)


def test_detect_faces_on_a_portrait_and_on_a_blank_image():
    gray = cv2.cvtColor(skimage_data.astronaut(), cv2.COLOR_RGB2GRAY)
    boxes = faces.detect_faces(gray)
    assert boxes.shape == (1, 4) and boxes.dtype == np.int64
    x, y, w, h = boxes[0]
    assert 150 < x + w / 2 < 260 and 60 < y + h / 2 < 180  # Her face, upper middle.
    empty = faces.detect_faces(np.full((200, 200), 128, np.uint8))
    assert empty.shape == (0, 4)


def test_crop_face_is_the_margin_square_around_the_box():
    gray = _coords(120, 100)
    # Box 30x20 at (20, 40): side = 30 * 1.2 = 36, centre (35, 50) -> rows 32..67, cols 17..52.
    crop = faces.crop_face(gray, (20, 40, 30, 20), margin=0.1, size=36)
    np.testing.assert_array_equal(crop, gray[32:68, 17:53])
    no_margin = faces.crop_face(gray, (20, 40, 30, 30), margin=0.0, size=30)
    np.testing.assert_array_equal(no_margin, gray[40:70, 20:50])


def test_crop_face_pads_with_border_pixels_outside_the_image():
    gray = _coords(50, 50)
    crop = faces.crop_face(gray, (0, 0, 20, 20), margin=0.5, size=40)  # Square -10..29.
    padded = np.pad(gray, 10, mode="edge")
    np.testing.assert_array_equal(crop, padded[0:40, 0:40])
    assert crop.shape == (40, 40) and crop.dtype == np.uint8


def test_crop_face_resizes_with_area_interpolation():
    gray = _coords(96, 96)
    crop = faces.crop_face(gray, (0, 0, 96, 96), margin=0.0, size=48)
    expected = gray.reshape(48, 2, 48, 2).astype(np.float64).mean(axis=(1, 3))
    np.testing.assert_allclose(crop, expected, atol=0.51)


def test_centre_crop_face():
    gray = _coords(256, 200)
    # Side 0.6 * 200 = 120, centred at (128, 100) -> rows 68..187, cols 40..159.
    crop = faces.centre_crop_face(gray, size=120)
    np.testing.assert_array_equal(crop, gray[68:188, 40:160])
    assert faces.centre_crop_face(gray).shape == (48, 48)


def test_face_or_centre_crop_reports_the_fallback():
    blank = np.full((256, 256), 90, np.uint8)
    crop, found = faces.face_or_centre_crop(blank)
    assert not found and crop.shape == (48, 48)


@pytest.mark.parametrize(
    "bad", [np.zeros((10, 10, 3), np.uint8), np.zeros((10, 10), np.float32), [[0, 1]]]
)
def test_non_gray_input_is_rejected(bad):
    with pytest.raises(ValueError, match=r"expected a \(H, W\) uint8 grayscale image"):
        faces.detect_faces(bad)


def test_bad_box_and_margin_are_rejected():
    gray = _coords(20, 20)
    with pytest.raises(ValueError, match="no area"):
        faces.crop_face(gray, (0, 0, 0, 5))
    with pytest.raises(ValueError, match="margin"):
        faces.crop_face(gray, (0, 0, 5, 5), margin=-0.1)
