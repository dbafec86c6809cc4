"""JAFFE: file names, directory walking, TIFF reading, face crops, TFDS builder, files source."""

from __future__ import annotations

import logging
import pathlib
import shutil

import cv2
import numpy as np
import pytest
import tensorflow_datasets as tfds
from skimage import data as skimage_data

import data_pipelines
from data_pipelines import faces, files, jaffe_files, loading, synthetic
from data_pipelines.errors import DataError


@pytest.fixture(scope="module")
def face_photo() -> np.ndarray:
    """(256, 256) uint8 JAFFE-like photo: skimage's astronaut portrait, face ~ 115 px wide."""
    gray = cv2.cvtColor(skimage_data.astronaut(), cv2.COLOR_RGB2GRAY)
    (x, y, w, h) = faces.detect_faces(gray)[0]
    side = int(2.2 * w)
    x0, y0 = x + w // 2 - side // 2, y + h // 2 - side // 2
    square = np.pad(gray, side, mode="edge")[y0 + side : y0 + 2 * side, x0 + side : x0 + 2 * side]
    return cv2.resize(square, (256, 256), interpolation=cv2.INTER_AREA)


def _blank(value: int = 0) -> np.ndarray:
    """A face-less photo: a smooth horizontal gradient plus an offset."""
    return np.tile(np.arange(256, dtype=np.uint8)[None] // 2 + value, (256, 1))


def test_parse_filename():
    item = jaffe_files.parse_filename("jaffedbase/KA.AN1.39.tiff")
    assert (item.subject, item.expression, item.label, item.repeat, item.image_id) == (
        "KA",
        "AN",
        0,
        1,
        39,
    )
    codes = {"AN": 0, "DI": 1, "FE": 2, "HA": 3, "SA": 4, "SU": 5, "NE": 6}
    for code, label in codes.items():
        parsed = jaffe_files.parse_filename(f"NM.{code}3.100.tif")
        assert data_pipelines.CLASS_NAMES[parsed.label] == data_pipelines.CLASS_NAMES[label]
        assert parsed.label == label


@pytest.mark.parametrize(
    "name, problem",
    [
        ("KA.XX1.39.tiff", "unknown expression code 'XX'"),
        ("KA.AN.39.tiff", "does not parse"),
        ("KAA.AN1.39.tiff", "does not parse"),
        ("KA.AN1.tiff", "does not parse"),
        ("ka.an1.39.tiff", "does not parse"),
        ("KA.AN1.39.png", "does not parse"),
    ],
)
def test_bad_filename_is_an_error_naming_the_file(name, problem):
    with pytest.raises(DataError, match=rf"{name}: .*{problem}"):
        jaffe_files.parse_filename(pathlib.Path("jaffedbase") / name)


def _touch(path: pathlib.Path, content: bytes = b"x") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)


def test_list_images_walks_subfolders_and_ignores_other_files(tmp_path):
    for name in ("KL.HA2.160.tiff", "KA.AN1.39.tiff", "UY.NE1.66.TIFF"):
        _touch(tmp_path / "jaffedbase" / name)
    for other in ("README", ".DS_Store", "ratings.txt", "jaffedbase/A-semantic-rating.xls"):
        _touch(tmp_path / other)
    _touch(tmp_path / "__MACOSX" / "jaffedbase" / "._KA.AN1.39.tiff")
    _touch(tmp_path / "jaffedbase" / "._KA.AN1.39.tiff")
    names = [item.path.name for item in jaffe_files.list_images(tmp_path)]
    assert names == ["KA.AN1.39.tiff", "KL.HA2.160.tiff", "UY.NE1.66.TIFF"]


def test_list_images_rejects_unparsable_image_names_and_duplicates(tmp_path):
    _touch(tmp_path / "jaffedbase" / "KA.AN1.39.tiff")
    _touch(tmp_path / "jaffedbase" / "photo1.jpg")
    with pytest.raises(DataError, match=r"photo1.jpg: image file name does not parse"):
        jaffe_files.list_images(tmp_path)
    (tmp_path / "jaffedbase" / "photo1.jpg").unlink()
    _touch(tmp_path / "copy" / "KA.AN1.39.tiff")
    with pytest.raises(DataError, match=r"KA.AN1.39.tiff: duplicate of"):
        jaffe_files.list_images(tmp_path)


def test_list_images_of_a_folder_without_images(tmp_path):
    _touch(tmp_path / "README")
    with pytest.raises(FileNotFoundError, match="No JAFFE images"):
        jaffe_files.list_images(tmp_path)


def test_read_gray_plain_and_palette_tiff(tmp_path):
    gray = (np.arange(256 * 256) % 251).astype(np.uint8).reshape(256, 256)
    plain = synthetic.write_jaffe_image(tmp_path / "KA.AN1.1.tiff", gray)
    pal = synthetic.write_jaffe_image(tmp_path / "KA.AN1.2.tiff", gray, palette=True)
    np.testing.assert_array_equal(jaffe_files.read_gray(plain), gray)
    np.testing.assert_array_equal(jaffe_files.read_gray(pal), gray)


@pytest.mark.parametrize("keep", [0.5, 0.02, 0.0])
def test_truncated_or_unreadable_tiff_is_an_error_naming_the_file(tmp_path, keep):
    path = synthetic.write_jaffe_image(tmp_path / "KA.AN1.1.tiff", _blank())
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])
    with pytest.raises(DataError, match=r"KA.AN1.1.tiff: unreadable or truncated image"):
        jaffe_files.read_gray(path)


def test_jaffe_face_or_centre_crop(face_photo):
    face, found = faces.face_or_centre_crop(face_photo)
    assert found and face.shape == (48, 48) and face.dtype == np.uint8
    boxes = faces.detect_faces(face_photo, scale_factor=1.1, min_neighbors=5, min_size=(60, 60))
    assert len(boxes) == 1
    np.testing.assert_array_equal(face, faces.crop_face(face_photo, boxes[0]))
    blank, found = faces.face_or_centre_crop(_blank())
    assert not found
    np.testing.assert_array_equal(blank, faces.centre_crop_face(_blank()))


@pytest.fixture(scope="module")
def jaffe_manual(tmp_path_factory, face_photo) -> pathlib.Path:
    """A manual dir like the JAFFE distribution: jaffedbase/ with 5 TIFFs and other files."""
    root = tmp_path_factory.mktemp("jaffe_manual")
    base = root / "jaffedbase"
    synthetic.write_jaffe_image(base / "KA.AN1.39.tiff", face_photo)
    synthetic.write_jaffe_image(base / "KA.HA2.45.tiff", np.fliplr(face_photo), palette=True)
    synthetic.write_jaffe_image(base / "KL.SU1.164.tiff", face_photo[:, ::-1] // 2 + 60)
    synthetic.write_jaffe_image(base / "YM.NE3.51.tiff", _blank(40))  # No face.
    synthetic.write_jaffe_image(base / "TM.DI1.192.tiff", face_photo, palette=True)
    (base / "README").write_text("The JAFFE images may be used only for non-commercial research.")
    (base / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    return root


FALLBACK_WARNING = "JAFFE: no face detected in 1 of 5 images, used the centre crop: YM.NE3.51.tiff"


def test_builder_builds_faces_labels_subjects(tmp_path, jaffe_manual, face_photo, caplog):
    manual = tmp_path / "manual"  # Not yet read in this process: the build logs the fallback.
    shutil.copytree(jaffe_manual, manual)
    with caplog.at_level(logging.INFO, logger="data_pipelines.files"):
        data_pipelines.build("jaffe", data_dir=tmp_path, manual_dir=manual)
    assert FALLBACK_WARNING in caplog.messages
    assert tfds.builder_cls("jaffe") is loading.Jaffe
    info = tfds.builder("jaffe", data_dir=tmp_path).info
    assert list(info.splits) == ["train"]
    assert info.features["label"].names == list(data_pipelines.CLASS_NAMES)
    ex = data_pipelines.load_split("jaffe", "train", tmp_path)
    assert list(ex["filename"]) == [
        "KA.AN1.39.tiff",
        "KA.HA2.45.tiff",
        "KL.SU1.164.tiff",
        "TM.DI1.192.tiff",
        "YM.NE3.51.tiff",
    ]
    assert list(ex["subject"]) == ["KA", "KA", "KL", "TM", "YM"]
    np.testing.assert_array_equal(ex["label"], [0, 3, 5, 1, 6])
    np.testing.assert_array_equal(ex["face_detected"], [True, True, True, True, False])
    assert ex["image"].shape == (5, 48, 48, 1) and ex["image"].dtype == np.uint8
    expected = faces.face_or_centre_crop(face_photo)[0]
    np.testing.assert_array_equal(ex["image"][0, ..., 0], expected)  # Plain TIFF.
    np.testing.assert_array_equal(ex["image"][3, ..., 0], expected)  # Palette TIFF.
    np.testing.assert_array_equal(ex["image"][4, ..., 0], faces.centre_crop_face(_blank(40)))
    images, labels = data_pipelines.load_arrays("jaffe", "train", tmp_path)
    np.testing.assert_array_equal(labels, [0, 3, 5, 1, 6])
    from_files = files.load_split_from_files("jaffe", "train", manual)
    assert sorted(from_files) == sorted(ex)
    for key, value in ex.items():
        assert from_files[key].dtype == value.dtype and from_files[key].shape == value.shape
        np.testing.assert_array_equal(from_files[key], value, err_msg=key)


def test_files_source_logs_the_fallback_once_and_returns_the_callers_own_arrays(
    tmp_path, jaffe_manual, caplog
):
    manual = tmp_path / "manual"
    shutil.copytree(jaffe_manual, manual)
    with caplog.at_level(logging.WARNING, logger="data_pipelines.files"):
        first = files.load_split_from_files("jaffe", "train", manual)
        first["image"][:] = 0
        second = files.load_split_from_files("jaffe", "train", manual)  # Cached.
    assert caplog.messages == [FALLBACK_WARNING]
    assert second["image"].any()
    np.testing.assert_array_equal(second["face_detected"], [True, True, True, True, False])
    with pytest.raises(ValueError, match="jaffe has no split 'test'; its splits are train"):
        files.load_split_from_files("jaffe", "test", manual)


def test_failed_build_names_the_bad_tiff_and_leaves_nothing(tmp_path, jaffe_manual):
    manual = tmp_path / "manual"
    for path in jaffe_manual.rglob("*.tiff"):
        _touch(manual / path.name, path.read_bytes())
    bad = manual / "KL.SU1.164.tiff"
    bad.write_bytes(bad.read_bytes()[:5000])
    with pytest.raises(DataError, match=r"KL.SU1.164.tiff: unreadable or truncated image") as e:
        data_pipelines.build("jaffe", data_dir=tmp_path / "tfds", manual_dir=manual)
    with pytest.raises(DataError) as from_files:
        files.load_split_from_files("jaffe", "train", manual)
    assert str(from_files.value) == str(e.value)
    assert not tfds.builder("jaffe", data_dir=tmp_path / "tfds").is_prepared()
    with pytest.raises(FileNotFoundError, match="zenodo"):
        data_pipelines.load_split("jaffe", "train", tmp_path / "tfds")


def test_missing_jaffe_gives_instructions_in_both_sources(tmp_path):
    manual = tmp_path / "manual"
    manual.mkdir()
    (manual / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match=r"(?s)No JAFFE images.*jaffedbase/"):
        data_pipelines.build("jaffe", data_dir=tmp_path / "tfds", manual_dir=manual)
    for directory in (manual, tmp_path / "none"):
        with pytest.raises(FileNotFoundError) as e:
            files.load_split_from_files("jaffe", "train", directory)
        assert f"No JAFFE images (*.tiff) under {directory}" in str(e.value)
        assert "zenodo" in str(e.value) and "--config.manual_dir" in str(e.value)
