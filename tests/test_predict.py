"""The prediction CLI: images, folders, bad files, output formats, annotations, attention, video."""

from __future__ import annotations

import csv
import io
import json

import cv2
import numpy as np
import pytest
from PIL import Image
from skimage import data as skimage_data

from data_pipelines.labels import CLASS_NAMES
from fer_jax.inference import predict
from tests.test_recognizer import ASTRONAUT_BOX, small_recognizer


@pytest.fixture(scope="module")
def recognizer():
    return small_recognizer()


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """A folder with the astronaut, a face-less image and a non-image file; a broken '.jpg'."""
    folder = tmp_path_factory.mktemp("photos")
    Image.fromarray(skimage_data.astronaut()).save(folder / "astronaut.png")
    Image.fromarray(np.full((200, 300), 128, np.uint8)).save(folder / "blank.jpg")
    (folder / "notes.txt").write_text("skipped: not an image extension")
    broken = tmp_path_factory.mktemp("other") / "broken.jpg"
    broken.write_text("not a JPEG")
    return folder, broken


def _run(recognizer, argv: list[str]) -> tuple[int, str, str]:
    args = predict.parse_args(["--checkpoint=unused", "--quiet", *argv])
    out, err = io.StringIO(), io.StringIO()
    status = predict.run(args, recognizer, out, err)
    return status, out.getvalue(), err.getvalue()


def test_json_on_a_folder_and_a_broken_file(recognizer, photos):
    folder, broken = photos
    status, out, err = _run(recognizer, ["--json", str(folder), str(broken)])
    assert status == 1  # One input failed; the others were still processed.
    records = json.loads(out)
    assert [r["source"] for r in records] == [
        str(folder / "astronaut.png"),
        str(folder / "blank.jpg"),
        str(broken),
    ]
    (face,) = records[0]["faces"]
    assert face["box"] == list(ASTRONAUT_BOX)
    assert list(face["probabilities"]) == list(CLASS_NAMES)
    assert sum(face["probabilities"].values()) == pytest.approx(1, abs=1e-5)
    assert face["label"] == max(face["probabilities"], key=face["probabilities"].get)
    expected = recognizer.predict(folder / "astronaut.png")[0].probabilities
    np.testing.assert_allclose(list(face["probabilities"].values()), expected, atol=1e-6)
    assert records[1]["faces"] == []
    assert records[2]["error"].startswith(f"{broken}: not an image file")
    assert f"{folder / 'blank.jpg'}: no face found" in err
    assert f"error: {broken}: not an image file" in err
    assert "notes.txt" not in out + err


def test_csv_and_table(recognizer, photos):
    folder, _ = photos
    status, out, _ = _run(recognizer, ["--csv", str(folder)])
    assert status == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert len(rows) == 1
    row = rows[0]
    assert row["source"] == str(folder / "astronaut.png") and row["frame"] == row["time_s"] == ""
    assert tuple(int(row[k]) for k in "xywh") == ASTRONAUT_BOX
    assert sum(float(row[n]) for n in CLASS_NAMES) == pytest.approx(1, abs=1e-5)
    assert row["label"] == max(CLASS_NAMES, key=lambda n: float(row[n]))

    status, table, _ = _run(recognizer, [str(folder / "astronaut.png")])
    lines = table.splitlines()
    assert lines[0] == f"{folder / 'astronaut.png'}: 1 face"
    assert lines[1].split()[:2] == ["face", "box"] and lines[1].split()[-1] == "label"
    assert lines[2].split()[:5] == ["0", "177,", "66,", "95,", "95"]
    assert lines[2].split()[-1] == row["label"]
    assert len(lines[2].split()) == 5 + 7 + 1


def test_given_boxes(recognizer, photos, tmp_path):
    folder, _ = photos
    blank = str(folder / "blank.jpg")
    _, out, _ = _run(recognizer, ["--json", "--box=10,20,50,60", blank])
    assert [f["box"] for f in json.loads(out)[0]["faces"]] == [[10, 20, 50, 60]]
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps({"blank.jpg": [[0, 0, 40, 40], [100, 50, 80, 80]]}))
    _, out, _ = _run(recognizer, ["--json", f"--boxes={boxes}", blank])
    assert [f["box"] for f in json.loads(out)[0]["faces"]] == [[0, 0, 40, 40], [100, 50, 80, 80]]
    status, _, err = _run(recognizer, ["--box=500,0,10,10", blank])
    assert status == 1 and f"{blank}: face box" in err and "outside the 300x200 image" in err


def test_annotate_and_attention_files(recognizer, photos, tmp_path):
    folder, _ = photos
    path = folder / "astronaut.png"
    status, _, _ = _run(
        recognizer,
        [f"--annotate={tmp_path / 'ann'}", f"--attention={tmp_path / 'att'}", str(path)],
    )
    assert status == 0
    original = np.asarray(Image.open(path))
    annotated = np.asarray(Image.open(tmp_path / "ann" / "astronaut.png"))
    assert annotated.shape == original.shape
    x, y, w, h = ASTRONAUT_BOX
    np.testing.assert_array_equal(annotated[y + h // 2, x], predict.BOX_COLOUR)  # Box edge.
    np.testing.assert_array_equal(annotated[400:], original[400:])  # Nothing drawn below.

    overlay = np.asarray(Image.open(tmp_path / "att" / "astronaut_attention.png"))
    assert overlay.shape == original.shape
    left, top, side = predict.centre_crop_square(ASTRONAUT_BOX, recognizer.margin)
    inside = np.abs(overlay.astype(int) - original)[top : top + side, left : left + side]
    assert inside.mean() > 10  # The heat map is blended over the centre crop's square ...
    outside = np.ones(original.shape[:2], bool)
    outside[top : top + side, left : left + side] = False
    np.testing.assert_array_equal(overlay[outside], original[outside])  # ... and only there.

    stages = np.asarray(Image.open(tmp_path / "att" / "astronaut_face0_stages.png"))
    assert stages.shape == (predict.PANEL_SIZE, 5 * predict.PANEL_SIZE, 3)
    assert sorted(p.name for p in (tmp_path / "att").iterdir()) == [
        "astronaut_attention.png",
        "astronaut_face0_stages.png",
    ]


def test_same_file_names_in_two_folders_do_not_overwrite(recognizer, photos, tmp_path):
    folder, _ = photos
    other = tmp_path / "copy"
    other.mkdir()
    (other / "astronaut.png").write_bytes((folder / "astronaut.png").read_bytes())
    _run(recognizer, [f"--annotate={tmp_path / 'ann'}", str(folder / "astronaut.png"), str(other)])
    assert sorted(p.name for p in (tmp_path / "ann").iterdir()) == [
        "astronaut.png",
        "astronaut_2.png",
    ]


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    """A 7-frame 256x256 MJPG video of the astronaut, every other frame blank."""
    path = tmp_path_factory.mktemp("video") / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (256, 256))
    if not writer.isOpened():
        pytest.skip("OpenCV has no MJPG video writer here")
    face = cv2.resize(skimage_data.astronaut(), (256, 256), interpolation=cv2.INTER_AREA)
    for i in range(7):
        frame = face if i % 2 == 0 else np.full_like(face, 90)
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()
    return path


def test_video_csv_every_nth_frame_and_annotated_video(recognizer, video, tmp_path):
    status, out, err = _run(
        recognizer, ["--csv", "--every=2", f"--annotate={tmp_path}", str(video)]
    )
    assert status == 0, err
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [int(r["frame"]) for r in rows] == [0, 2, 4, 6]
    assert [float(r["time_s"]) for r in rows] == pytest.approx([0, 0.2, 0.4, 0.6])
    assert all(r["source"] == str(video) for r in rows)
    for r in rows:
        assert sum(float(r[n]) for n in CLASS_NAMES) == pytest.approx(1, abs=1e-5)
    annotated = cv2.VideoCapture(str(tmp_path / "clip_annotated.avi"))
    frames = []
    while True:
        ok, frame = annotated.read()
        if not ok:
            break
        frames.append(frame)
    annotated.release()
    assert len(frames) == 7 and frames[0].shape == (256, 256, 3)
    x, y, w, h = (int(rows[0][k]) for k in "xywh")
    # The box drawn in frame 1 (blank, not sampled) is frame 0's, carried over.
    blue, green, red = frames[1][y + h // 2, x].astype(int)  # A grey (90) frame, but for the box.
    assert green - max(blue, red) > 80  # Green after MJPG compression of a 1-pixel line.


def test_video_every_3_and_no_face_frames_in_json(recognizer, video):
    _, out, err = _run(recognizer, ["--json", "--every=3", str(video)])
    records = json.loads(out)
    assert [r["frame"] for r in records] == [0, 3, 6]
    assert [len(r["faces"]) for r in records] == [1, 0, 1]  # Frame 3 is blank.
    assert "no face found in any" not in err


def test_unreadable_video_is_reported(recognizer, tmp_path):
    fake = tmp_path / "fake.mp4"
    fake.write_text("not a video")
    status, _, err = _run(recognizer, [str(fake), str(tmp_path / "missing.png")])
    assert status == 1
    assert f"error: {fake}: cannot open the video" in err
    assert f"error: {tmp_path / 'missing.png'}: no such file or directory" in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--every=0", "a.png"], "--every must be >= 1"),
        (["--batch_size=0", "a.png"], "--batch_size must be >= 1"),
        (["--replica=two", "a.png"], "a replica index or 'ensemble'"),
        (["--box=1,2,3", "a.png"], "a box is X,Y,W,H"),
        (["--json", "--csv", "a.png"], "not allowed with"),
        (["--boxes=/nonexistent.json", "a.png"], "cannot read the boxes file"),
        ([], "give images, folders or videos to recognise, or --example"),
    ],
)
def test_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        predict.parse_args(["--checkpoint=x", *argv])
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_matmul_dtype_flag_reaches_the_recognizer(monkeypatch):
    """`--matmul_dtype` (default 'auto': bfloat16 where the CPU multiplies it natively) is passed
    to `Recognizer.from_checkpoint`."""
    seen = []
    monkeypatch.setattr(
        predict.Recognizer, "from_checkpoint", lambda *a, **kw: seen.append(kw["matmul_dtype"])
    )
    for argv in (["--matmul_dtype=float32"], []):
        predict.load_recognizer(predict.parse_args([*argv, "a.png"]))
    assert seen == ["float32", "auto"]
    with pytest.raises(SystemExit):
        predict.parse_args(["--matmul_dtype=float16", "a.png"])


def test_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert predict.main([f"--checkpoint={tmp_path / 'nothing'}", "a.png"]) == 2
    err = capsys.readouterr().err
    assert f"error: cannot load the checkpoint {tmp_path / 'nothing'}" in err
