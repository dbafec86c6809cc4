"""tf.data pipelines: exact crop positions, flips, ten-crop order, padding, determinism, resume."""

from __future__ import annotations

import itertools
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import data_pipelines
from data_pipelines import pipelines
from data_pipelines.crops import (
    FIXED_POINT_ONE,
    affine_crop_pixels,
    crop_affine,
    crop_pixel_offsets,
    erase_boxes,
    erase_keep,
)

N, B = 40, 8  # 5 steps per epoch.


def _coordinate_images(n: int = N, size: int = 48) -> np.ndarray:
    """(n, size, size, 3) uint8: channel 0 the row, 1 the column, 2 the example index."""
    r, c = np.mgrid[:size, :size]
    grid = np.stack([r, c, np.zeros_like(r)], axis=-1)
    images = np.repeat(grid[None], n, axis=0)
    images[..., 2] = np.arange(n)[:, None, None]
    return images.astype(np.uint8)


def _as_uint8(x: np.ndarray) -> np.ndarray:
    """Undoes 'unit' normalisation."""
    return np.rint(x * 255).astype(np.int64)


def _take(ds: tf.data.Dataset, count: int) -> list[dict[str, np.ndarray]]:
    return list(itertools.islice(ds.as_numpy_iterator(), count))


def _assert_batches_equal(a, b) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


# --- Ten-crop. --------------------------------------------------------------------------------


def test_ten_crop_is_torchvision_tencrop_order():
    images = _coordinate_images(2)
    crops = data_pipelines.ten_crop(images)
    assert crops.shape == (2, 10, 44, 44, 3) and crops.dtype == np.uint8
    offsets = [(0, 0), (0, 4), (4, 0), (4, 4), (2, 2)]
    i, j = np.mgrid[:44, :44]
    for k, (top, left) in enumerate(offsets):
        np.testing.assert_array_equal(crops[:, k, :, :, 0], np.broadcast_to(top + i, (2, 44, 44)))
        np.testing.assert_array_equal(crops[:, k, :, :, 1], np.broadcast_to(left + j, (2, 44, 44)))
        # Crop k + 5 is crop k of the mirrored image: column c of the mirror is column 47 - c.
        np.testing.assert_array_equal(crops[:, 5 + k, :, :, 0], crops[:, k, :, :, 0])
        np.testing.assert_array_equal(
            crops[:, 5 + k, :, :, 1], np.broadcast_to(47 - (left + j), (2, 44, 44))
        )
    np.testing.assert_array_equal(crops[:, 5], crops[:, 1, :, ::-1])  # Mirror TL = flipped TR.
    np.testing.assert_array_equal(crops[1, :, :, :, 2], 1)


def test_centre_offset_rounds_like_torchvision():
    assert data_pipelines.five_crop_offsets(49, 51, 44)[4] == (2, 4)  # round(2.5)=2, round(3.5)=4
    with pytest.raises(ValueError, match="does not fit"):
        data_pipelines.five_crop_offsets(40, 48, 44)


# --- Evaluation pipeline. ---------------------------------------------------------------------


def test_eval_pipeline_ten_crops_each_example_once_with_padding():
    images = _coordinate_images(10)
    labels = np.arange(10) % 7
    ds = data_pipelines.eval_dataset_from_arrays(images, labels, batch_size=4, return_index=True)
    batches = list(ds.as_numpy_iterator())
    assert len(batches) == data_pipelines.eval_steps(10, 4) == 3
    for batch in batches:
        assert batch["image"].shape == (4, 10, 44, 44, 3) and batch["image"].dtype == np.float32
        assert batch["label"].dtype == np.int32 and batch["mask"].dtype == bool
    mask = np.concatenate([b["mask"] for b in batches])
    np.testing.assert_array_equal(mask, np.arange(12) < 10)
    got = np.concatenate([b["image"] for b in batches])
    expected = data_pipelines.ten_crop(images).astype(np.float32) / 255
    np.testing.assert_allclose(got[:10], expected, atol=1e-6)
    assert not got[10:].any()  # Padding is zeros ...
    np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches]), [*labels, 0, 0])
    np.testing.assert_array_equal(np.concatenate([b["index"] for b in batches])[:10], range(10))


def test_eval_pipeline_options():
    images = _coordinate_images(6)
    labels = np.zeros(6, np.int64)
    centre = _take(
        data_pipelines.eval_dataset_from_arrays(
            images, labels, batch_size=6, crops="centre", normalize="symmetric"
        ),
        1,
    )[0]
    assert centre["image"].shape == (6, 44, 44, 3)
    expected = data_pipelines.ten_crop(images)[:, 4].astype(np.float32) / 127.5 - 1
    np.testing.assert_allclose(centre["image"], expected, atol=1e-6)
    sharded = _take(
        data_pipelines.eval_dataset_from_arrays(
            images, labels, batch_size=4, num_devices=2, normalize=(0.5, 0.25)
        ),
        2,
    )
    assert sharded[1]["image"].shape == (2, 2, 10, 44, 44, 3)
    np.testing.assert_array_equal(sharded[1]["mask"], [[True, True], [False, False]])
    assert sharded[0]["image"].min() >= -2 and sharded[0]["image"].max() <= 2
    rows = np.broadcast_to((np.arange(44)[:, None] / 255 - 0.5) / 0.25, (44, 44))
    np.testing.assert_allclose(sharded[0]["image"][0, 0, 0, :, :, 0], rows, atol=1e-5)


# --- Training pipeline. -----------------------------------------------------------------------


def test_epoch_plan_distribution_and_purity():
    plan = data_pipelines.epoch_plan(100_000, 100, seed=3, epoch=2)
    for key in ("top", "left"):
        freq = np.bincount(plan[key].ravel(), minlength=5) / plan[key].size
        assert freq.size == 5 and np.all(np.abs(freq - 0.2) < 0.01)  # Uniform 0..4 inclusive.
    assert abs(plan["flip"].mean() - 0.5) < 0.01
    np.testing.assert_array_equal(np.sort(plan["index"].ravel()), np.arange(100_000))
    again = data_pipelines.epoch_plan(100_000, 100, seed=3, epoch=2)
    for key in plan:
        np.testing.assert_array_equal(plan[key], again[key])
    other = data_pipelines.epoch_plan(100_000, 100, seed=3, epoch=3)
    assert not np.array_equal(plan["index"], other["index"])


def test_train_crops_and_flips_are_exactly_the_plan():
    images = _coordinate_images()
    labels = (np.arange(N) * 3) % 7
    ds = data_pipelines.train_dataset_from_arrays(
        images, labels, batch_size=B, seed=11, return_index=True
    )
    steps = data_pipelines.steps_per_epoch(N, B)
    batches = _take(ds, 2 * steps)
    i, j = np.mgrid[:44, :44]
    for epoch in range(2):
        plan = data_pipelines.epoch_plan(N, B, seed=11, epoch=epoch)
        for step in range(steps):
            batch = batches[epoch * steps + step]
            assert batch["image"].shape == (B, 44, 44, 3) and batch["image"].dtype == np.float32
            assert batch["label"].dtype == np.int32
            pixels = _as_uint8(batch["image"])
            np.testing.assert_array_equal(batch["index"], plan["index"][step])
            np.testing.assert_array_equal(pixels[:, 0, 0, 2], plan["index"][step])
            np.testing.assert_array_equal(batch["label"], labels[plan["index"][step]])
            for b in range(B):
                top, left, flip = (plan[k][step, b] for k in ("top", "left", "flip"))
                np.testing.assert_array_equal(pixels[b, :, :, 0], top + i)
                cols = left + (43 - j if flip else j)
                np.testing.assert_array_equal(pixels[b, :, :, 1], cols)
        epoch_indices = np.concatenate([b["index"] for b in batches[epoch * steps :][:steps]])
        assert np.unique(epoch_indices).size == N  # A permutation (N divisible by B here).
    assert not np.array_equal(batches[0]["index"], batches[steps]["index"])  # Reshuffled.


def test_train_drop_remainder_flip_off_and_device_axis():
    images, labels = _coordinate_images(21), np.zeros(21, np.int64)
    ds = data_pipelines.train_dataset_from_arrays(
        images, labels, batch_size=8, seed=0, flip=False, num_devices=2, return_index=True
    )
    batches = _take(ds, 4)  # 2 steps per epoch; 5 examples dropped each epoch.
    assert batches[0]["image"].shape == (2, 4, 44, 44, 3)
    assert batches[0]["label"].shape == (2, 4)
    for batch in batches:
        pixels = _as_uint8(batch["image"])
        np.testing.assert_array_equal(np.diff(pixels[..., 1], axis=-1), 1)  # Never flipped.
    first_epoch = np.concatenate([b["index"].ravel() for b in batches[:2]])
    assert np.unique(first_epoch).size == 16


def test_same_seed_same_batches_other_seed_other_batches():
    images, labels = _coordinate_images(), np.arange(N) % 7
    make = lambda seed: data_pipelines.train_dataset_from_arrays(
        images, labels, batch_size=B, seed=seed
    )
    a, b, c = _take(make(5), 6), _take(make(5), 6), _take(make(6), 6)
    _assert_batches_equal(a, b)
    assert not np.array_equal(a[0]["image"], c[0]["image"])


@pytest.mark.parametrize("start_epoch, start_step", [(0, 3), (1, 0), (1, 4), (2, 2)])
def test_resume_yields_the_uninterrupted_batches(start_epoch, start_step):
    images, labels = _coordinate_images(), np.arange(N) % 7
    kwargs = dict(batch_size=B, seed=2, return_index=True)
    full = _take(data_pipelines.train_dataset_from_arrays(images, labels, **kwargs), 15)
    resumed = data_pipelines.train_dataset_from_arrays(
        images, labels, start_epoch=start_epoch, start_step=start_step, **kwargs
    )
    start = start_epoch * 5 + start_step
    _assert_batches_equal(_take(resumed, 15 - start), full[start:])


def test_num_epochs_bounds_the_dataset():
    images, labels = _coordinate_images(), np.arange(N) % 7
    ds = data_pipelines.train_dataset_from_arrays(
        images, labels, batch_size=B, seed=0, start_step=2, num_epochs=2
    )
    assert len(list(ds.as_numpy_iterator())) == 3 + 5


def test_bad_arguments():
    images, labels = _coordinate_images(), np.arange(N) % 7
    train = data_pipelines.train_dataset_from_arrays
    with pytest.raises(ValueError, match=r"start_step 5 outside \[0, 5\)"):
        train(images, labels, batch_size=B, seed=0, start_step=5)
    with pytest.raises(ValueError, match="not divisible by num_devices 3"):
        train(images, labels, batch_size=B, seed=0, num_devices=3)
    with pytest.raises(ValueError, match="uint8"):
        train(images.astype(np.float32), labels, batch_size=B, seed=0)
    with pytest.raises(ValueError, match="do not fill one batch"):
        train(images, labels, batch_size=64, seed=0)
    with pytest.raises(ValueError, match="start_epoch must be >= 0"):
        train(images, labels, batch_size=B, seed=0, start_epoch=-1)
    with pytest.raises(ValueError, match="non-negative"):  # numpy's own check of the seed
        data_pipelines.epoch_plan(N, B, seed=-1, epoch=0)
    assert data_pipelines.steps_per_epoch(28_709, 128) == 224
    assert data_pipelines.eval_steps(3_589, 128) == 29


def test_tensorflow_sees_no_gpu():
    assert tf.config.get_visible_devices("GPU") == []
    assert pipelines.normalizer("unit")(tf.constant([255], tf.uint8)).numpy()[0] == 1.0


# --- The package's TensorFlow names. -----------------------------------------------------------


def test_tensorflow_names_import_on_first_use_and_hide_the_gpus_first():
    code = (
        "import sys, data_pipelines\n"
        "assert 'tensorflow' not in sys.modules\n"
        "import tensorflow as tf\n"
        "hidden = []\n"
        "tf.config.set_visible_devices = lambda devices, kind: hidden.append((devices, kind))\n"
        "from data_pipelines import train_dataset_from_arrays\n"
        "print(train_dataset_from_arrays.__module__, data_pipelines.load_split.__module__)\n"
        "print(hidden)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines() == [
        "data_pipelines.pipelines data_pipelines.loading",
        "[([], 'GPU')]",
    ]


def test_package_attributes():
    assert data_pipelines.eval_dataset_from_arrays is pipelines.eval_dataset_from_arrays
    assert {"build", "load_split", "load_split_from_files"} <= set(dir(data_pipelines))
    assert set(data_pipelines.__all__) <= set(dir(data_pipelines))
    with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"):
        data_pipelines.no_such_name  # noqa: B018


# --- Zoom and rotation: integer affine crops. -------------------------------------------------


def _plain_plan(num_examples: int, batch_size: int, seed: int, epoch: int) -> dict:
    """The plan as drawn before zoom and rotation existed: permutation, top, left, flip."""
    rng = np.random.default_rng([seed, epoch])
    shape = (num_examples // batch_size, batch_size)
    index = rng.permutation(num_examples)[: shape[0] * batch_size].reshape(shape)
    top = rng.integers(0, 4, size=shape, endpoint=True)
    left = rng.integers(0, 4, size=shape, endpoint=True)
    return {"index": index, "top": top, "left": left, "flip": rng.random(shape) < 0.5}


def _rows_cols(maps: np.ndarray, size: int = 48) -> tuple[np.ndarray, np.ndarray]:
    """The (row, col) each crop pixel of `maps` reads from a size x size image."""
    return np.divmod(affine_crop_pixels(maps, size, size), size)


def test_zero_zoom_and_rotation_is_the_plain_plan_and_the_draws_come_after_it():
    want = _plain_plan(1000, 50, seed=4, epoch=7)
    for plan in (
        data_pipelines.epoch_plan(1000, 50, seed=4, epoch=7),
        data_pipelines.epoch_plan(1000, 50, seed=4, epoch=7, zoom=0.0, rotate=0.0),
    ):
        assert plan.keys() == want.keys()
        assert [plan[k].dtype for k in want] == [np.int64, np.int32, np.int32, np.bool_]
        for key in want:
            np.testing.assert_array_equal(plan[key], want[key])
    augmented = data_pipelines.epoch_plan(1000, 50, seed=4, epoch=7, zoom=0.2, rotate=10)
    assert augmented.keys() == {*want, "affine"}
    assert augmented["affine"].shape == (20, 50, 6) and augmented["affine"].dtype == np.int32
    for key in want:
        np.testing.assert_array_equal(augmented[key], want[key])


def test_unit_maps_are_exactly_the_plain_and_mirrored_windows():
    top, left, flip = (x.ravel() for x in np.meshgrid(range(5), range(5), [False, True]))
    maps = crop_affine(top, left, flip, 1.0, 0.0)
    want = (top * 48 + left)[:, None, None] + crop_pixel_offsets(48)[flip.astype(int)]
    np.testing.assert_array_equal(affine_crop_pixels(maps, 48, 48), want)


def test_scales_angles_and_flips_in_the_maps_follow_the_options():
    plan = data_pipelines.epoch_plan(20_000, 100, seed=1, epoch=0, zoom=0.2, rotate=10)
    a, b, _, d, f, _ = np.moveaxis(plan["affine"].astype(np.float64), -1, 0)
    scale = np.hypot(a, d) / FIXED_POINT_ONE
    angle = np.degrees(np.arctan2(d, a))
    assert 0.8 - 1e-4 < scale.min() < 0.81 and 1.19 < scale.max() < 1.2 + 1e-4
    assert -10 - 1e-2 < angle.min() < -9.9 and 9.9 < angle.max() < 10 + 1e-2
    assert abs(scale.mean() - 1) < 0.005 and abs(angle.mean()) < 0.1
    mirror = np.where(plan["flip"], -1, 1)
    np.testing.assert_array_equal(f, a * mirror)  # the column axis is mirrored where flipped
    np.testing.assert_array_equal(b, -d * mirror)


def test_zoom_out_by_1_25_covers_1_25_times_the_columns_about_the_window_centre():
    # A 96x96 image, window at (26, 26): no clipping, so the spans are the map's own.
    rows, cols = _rows_cols(crop_affine(26, 26, False, 1.25, 0.0), 96)
    centre, offset = 26 + 21.5, np.arange(44) - 21.5
    assert abs(np.ptp(cols) - 1.25 * 43) < 1 and abs(np.ptp(rows) - 1.25 * 43) < 1
    assert np.all(np.abs(cols - (centre + 1.25 * offset)[None, :]) <= 0.5 + 1e-3)
    assert np.all(np.abs(rows - (centre + 1.25 * offset)[:, None]) <= 0.5 + 1e-3)
    rows, cols = _rows_cols(crop_affine(26, 26, False, 0.8, 0.0), 96)
    assert abs(np.ptp(cols) - 0.8 * 43) < 1  # zoom in


def test_a_quarter_turn_is_the_window_turned_clockwise_and_small_angles_match_the_rotation():
    rows, cols = _rows_cols(crop_affine(3, 1, False, 1.0, 90.0))
    i, j = np.mgrid[:44, :44]
    np.testing.assert_array_equal(rows, 3 + 43 - j)  # np.rot90(window, -1)
    np.testing.assert_array_equal(cols, 1 + i)
    u, v = i - 21.5, j - 21.5
    for scale, angle in [(0.9, 10.0), (1.1, -7.5), (0.85, 33.0)]:
        rows, cols = _rows_cols(crop_affine(26, 20, False, scale, angle), 96)
        t = np.radians(angle)
        want_rows = 26 + 21.5 + scale * (u * np.cos(t) - v * np.sin(t))
        want_cols = 20 + 21.5 + scale * (u * np.sin(t) + v * np.cos(t))
        assert np.all(np.abs(rows - want_rows) <= 0.5 + 1e-3)
        assert np.all(np.abs(cols - want_cols) <= 0.5 + 1e-3)
        flipped = affine_crop_pixels(crop_affine(26, 20, True, scale, angle), 96, 96)
        np.testing.assert_array_equal(np.divmod(flipped, 96), (rows[:, ::-1], cols[:, ::-1]))
    rows, _ = _rows_cols(crop_affine(2, 2, False, 1.0, 10.0))
    assert rows[0, -1] < rows[0, 0]  # a positive angle: rightwards in the crop is up the image


def test_every_index_stays_inside_the_image_and_the_edge_repeats():
    plan = data_pipelines.epoch_plan(4000, 100, seed=0, epoch=0, zoom=0.5, rotate=45)
    rows, cols = _rows_cols(plan["affine"])
    assert rows.min() == cols.min() == 0 and rows.max() == cols.max() == 47
    _, cols = _rows_cols(crop_affine(2, 2, False, 1.5, 0.0))  # 64.5 columns across, centred
    assert np.all(cols[:, :7] == 0) and np.all(cols[:, -7:] == 47)
    assert np.all((cols[:, 7:-7] > 0) & (cols[:, 7:-7] < 47))
    with pytest.raises(ValueError, match="overflow int32"):
        crop_affine(2**15, 0, False, 1.0, 0.0)


def test_zoomed_and_rotated_tf_batches_gather_exactly_the_planned_pixels():
    images, labels = _coordinate_images(), (np.arange(N) * 3) % 7
    ds = data_pipelines.train_dataset_from_arrays(
        images, labels, batch_size=B, seed=5, zoom=0.2, rotate=10, return_index=True
    )
    batches = _take(ds, 2 * 5)
    for epoch in range(2):
        plan = data_pipelines.epoch_plan(N, B, seed=5, epoch=epoch, zoom=0.2, rotate=10)
        rows, cols = _rows_cols(plan["affine"])
        for step in range(5):
            pixels = _as_uint8(batches[epoch * 5 + step]["image"])
            np.testing.assert_array_equal(batches[epoch * 5 + step]["index"], plan["index"][step])
            np.testing.assert_array_equal(pixels[..., 0], rows[step])
            np.testing.assert_array_equal(pixels[..., 1], cols[step])
            np.testing.assert_array_equal(
                pixels[..., 2], np.broadcast_to(plan["index"][step][:, None, None], (B, 44, 44))
            )
    plain = _take(data_pipelines.train_dataset_from_arrays(images, labels, batch_size=B, seed=5), 1)
    assert not np.array_equal(plain[0]["image"], batches[0]["image"])
    unflipped = data_pipelines.train_dataset_from_arrays(
        images, labels, batch_size=B, seed=5, zoom=0.2, flip=False
    )
    for batch in _take(unflipped, 5):  # columns still increase along every crop row
        assert np.all(np.diff(_as_uint8(batch["image"])[..., 1], axis=-1) >= 0)


# --- Random erasing. --------------------------------------------------------------------------


def test_erasing_off_is_the_plain_plan_and_its_draws_come_after_zoom_and_rotation():
    plain = data_pipelines.epoch_plan(1000, 50, seed=4, epoch=7, zoom=0.2, rotate=10)
    assert data_pipelines.epoch_plan(1000, 50, seed=4, epoch=7, zoom=0.2, rotate=10, erase=0.0)[
        "affine"
    ].shape == (20, 50, 6)
    erased = data_pipelines.epoch_plan(1000, 50, seed=4, epoch=7, zoom=0.2, rotate=10, erase=0.5)
    assert erased.keys() == {*plain, "erase"}
    assert erased["erase"].shape == (20, 50, 4) and erased["erase"].dtype == np.int32
    for key in plain:
        np.testing.assert_array_equal(erased[key], plain[key])
    assert "erase" not in data_pipelines.epoch_plan(40, 8, seed=0, epoch=0, erase=0.0)


def test_erasing_boxes_follow_torchvisions_area_ratio_and_probability():
    boxes = erase_boxes(np.random.default_rng(0), (200, 100), 0.5, 44)
    top, left, bottom, right = np.moveaxis(boxes, -1, 0)
    height, width = bottom - top, right - left
    erased = height > 0
    assert abs(erased.mean() - 0.5) < 0.02  # 20,000 draws: ~7 standard deviations
    assert np.all((height > 0) == (width > 0))
    assert np.all((top >= 0) & (left >= 0) & (bottom <= 44) & (right <= 44))
    assert np.all((height < 44) & (width < 44))
    area = height[erased] * width[erased] / 44**2
    # Rounding each side to whole pixels moves the area a little past torchvision's bounds.
    assert 0.01 < area.min() < 0.03 and 0.3 < area.max() < 0.42
    assert 0.16 < np.median(area) < 0.19  # uniform in [0.02, 0.33]: median 0.175
    ratio = height[erased] / width[erased]
    assert ratio.min() < 0.4 and ratio.max() > 2.5 and 0.8 < np.median(ratio) < 1.25
    always = erase_boxes(np.random.default_rng(1), (1000,), 1.0, 44)
    assert np.all(always[:, 2] > always[:, 0])  # a box that fits is found for every crop


def test_erase_keep_is_false_exactly_inside_the_box():
    keep = erase_keep(np.array([[2, 5, 6, 7], [0, 0, 0, 0]], np.int32), 10)
    want = np.ones((2, 10, 10), bool)
    want[0, 2:6, 5:7] = False
    np.testing.assert_array_equal(keep, want)
    keep_tf = erase_keep(tf.constant([[2, 5, 6, 7]], tf.int32), 10)
    np.testing.assert_array_equal(keep_tf.numpy(), want[:1])


def test_erased_tf_batches_are_the_planned_crops_with_their_boxes_black():
    images, labels = _coordinate_images(), (np.arange(N) * 3) % 7
    images[..., 0] += 1  # no pixel of channel 0 is 0 before erasing
    kwargs = {"batch_size": B, "seed": 5, "zoom": 0.2, "rotate": 10}
    whole = _take(data_pipelines.train_dataset_from_arrays(images, labels, **kwargs), 5)
    erased = _take(data_pipelines.train_dataset_from_arrays(images, labels, erase=0.7, **kwargs), 5)
    plan = data_pipelines.epoch_plan(N, B, seed=5, epoch=0, zoom=0.2, rotate=10, erase=0.7)
    for step in range(5):
        keep = erase_keep(plan["erase"][step], 44)[..., None]
        want = np.where(keep, whole[step]["image"], 0)
        np.testing.assert_array_equal(erased[step]["image"], want)
        np.testing.assert_array_equal(erased[step]["label"], whole[step]["label"])
    assert 0.3 < (~erase_keep(plan["erase"], 44)).any((-1, -2)).mean() < 0.95
