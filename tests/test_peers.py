"""experiments/peers.py (fer_jax next to the `fer` package) and the model card's peer line: the
measuring and scoring logic, on fakes; with `fer` installed, that fer's one-image call on a strip
of faces gives each face the scores it gives it alone."""

from __future__ import annotations

import json

import numpy as np
import pytest

from data_pipelines.labels import CLASS_NAMES
from experiments import model_card, peers


def test_recalls_count_no_face_as_wrong_and_leave_out_absent_classes():
    labels = np.array([0, 0, 3, 3, 3, 6])
    predicted = np.array([0, -1, 3, 3, 6, 6])
    m = peers.recalls(predicted, labels, 7)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["per_class_recall"] == [0.5, None, None, pytest.approx(2 / 3), None, None, 1.0]
    assert m["mean_class_recall"] == pytest.approx((0.5 + 2 / 3 + 1.0) / 3)
    assert m["confusion_counts"][0][7] == 1  # the face not found: the last column
    assert sum(map(sum, m["confusion_counts"])) == len(labels)


def test_alternate_rotates_who_goes_first_and_warms_up_every_round_length():
    calls = []

    def contender(name):
        def run(chunk):
            calls.append((name, len(chunk)))
            return [f"{name}{x}" for x in chunk]

        return run

    outputs, seconds = peers.alternate({n: contender(n) for n in "abc"}, list(range(7)), 3)
    warm_up = calls[:6]  # each contender, each length (3 and the last round's 1), untimed
    assert sorted(warm_up) == sorted((n, k) for n in "abc" for k in (1, 3))
    timed = [name for name, _ in calls[6:]]
    assert timed == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert outputs["b"] == [f"b{x}" for x in range(7)]
    assert all(len(s) == 3 for s in seconds.values())


def test_fer_label_is_fers_top_emotion_ties_going_to_its_first_class():
    emotions = dict.fromkeys(CLASS_NAMES, 0.1) | {"sad": 0.3, "fear": 0.3}
    assert peers.fer_label(emotions, CLASS_NAMES) == CLASS_NAMES.index("fear")


def test_fer_face_classifier_sends_one_strip_with_a_box_per_face():
    faces = np.stack([np.full((48, 48), 10 * k, np.uint8) for k in range(3)])

    class Detector:
        def detect_emotions(self, image, face_rectangles):
            assert image.shape == (48, 3 * 48, 3) and image.dtype == np.uint8
            assert face_rectangles == [(0, 0, 48, 48), (48, 0, 48, 48), (96, 0, 48, 48)]
            out = []
            for x, y, w, h in face_rectangles:
                value = int(image[y, x, 0]) // 10  # which face this box holds
                scores = dict.fromkeys(CLASS_NAMES, 0.0) | {CLASS_NAMES[value]: 0.5}
                if value == 2:
                    scores["neutral"] = 0.5  # tied with fear: fer's rule keeps fear
                out.append({"box": (x, y, w, h), "emotions": scores})
            return out

    classify, ties = peers.fer_face_classifier(Detector(), CLASS_NAMES)
    assert classify(faces).tolist() == [0, 1, 2]
    assert ties == [False, False, True]


def test_photo_files_are_labelled_by_their_class_folder_in_file_name_order(tmp_path):
    (tmp_path / "happy").mkdir()
    (tmp_path / "sad").mkdir()
    (tmp_path / "happy" / "c.png").write_bytes(b"")
    (tmp_path / "sad" / "a.png").write_bytes(b"")
    (tmp_path / "b.JPG").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("")
    found = peers.photo_files(str(tmp_path))
    assert found == [
        (str(tmp_path / "sad" / "a.png"), 4),
        (str(tmp_path / "b.JPG"), None),
        (str(tmp_path / "happy" / "c.png"), 3),
    ]
    assert peers.photo_files(str(tmp_path), limit=2) == found[:2]


def test_written_photos_in_name_order_are_the_splits_faces_in_order(tmp_path):
    faces = np.stack([np.full((48, 48), 40 * k, np.uint8) for k in range(5)])
    labels = np.array([3, 0, 3, 6, 0])
    peers.write_photos(faces[:4], labels[:4], "private_test", str(tmp_path))
    found = peers.photo_files(str(tmp_path), limit=3)
    assert [label for _, label in found] == labels[:3].tolist()
    assert [p.rsplit("/", 1)[1] for p, _ in found] == [
        f"private_test_0000{k}.png" for k in range(3)
    ]
    import cv2

    photo = cv2.imread(found[1][0])
    assert photo.shape[:2] == (2 * 4 * 48, 2 * 4 * 48)  # 4x, padded half the side each way
    peers.check_photo_folder(str(tmp_path), labels[:4], "private_test")  # the same run again
    with pytest.raises(SystemExit, match="holds 1 images that this run would not write"):
        peers.check_photo_folder(str(tmp_path), labels[:3], "private_test")  # a smaller --limit
    peers.check_photo_folder(str(tmp_path), labels, "private_test")  # a larger one: overwrites


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--write_photos"], "--write_photos and --photo_limit need --photos"),
        (["--photo_limit=5"], "--write_photos and --photo_limit need --photos"),
        (["--photos=p", "--photo_limit=0"], "--photo_limit >= 1"),
    ],
)
def test_photo_flags_are_checked(capsys, flags, message):
    with pytest.raises(SystemExit):
        peers.main(["--manual_dir=x", *flags])
    assert message in capsys.readouterr().err


def test_the_photo_path_scores_each_contenders_largest_face_on_the_first_photos(tmp_path):
    """_compare_photos on fakes: each package's own call per photo; no face is wrong; unlabelled
    photos count for speed and detection only; `limit` takes the first photos by name."""
    for k, folder in enumerate(["happy", "sad", "happy", ".", "sad"]):
        (tmp_path / folder).mkdir(exist_ok=True)
        (tmp_path / folder / f"p{k}.png").write_bytes(b"")

    class Face:
        def __init__(self, label):
            self.label = label

    class Recognizer:  # fer_jax: finds no face in p1, calls everything else happy
        class_names = CLASS_NAMES

        def predict(self, path):
            return [] if path.endswith("p1.png") else [Face("happy"), Face("sad")]

    class FER:  # fer: a small sad face and a larger happy one in every photo
        def __init__(self, **options):
            assert options in ({"use_tflite": True}, {"use_tflite": False})

        def detect_emotions(self, path):
            assert path.endswith(".png")
            scores = dict.fromkeys(CLASS_NAMES, 0.0)
            return [
                {"box": (0, 0, 10, 10), "emotions": scores | {"sad": 0.9}},
                {"box": (0, 0, 50, 40), "emotions": scores | {"happy": 0.9}},
            ]

    fer_module = type("fer", (), {"FER": FER})
    recognizers = {name: Recognizer() for name in list(peers.fer_jax_variants())[:1]}
    results, rows = peers._compare_photos(recognizers, fer_module, 4, str(tmp_path), limit=4)
    assert results["photos"] == 4 and results["limit"] == 4
    ours = results["per_contender"][next(iter(recognizers))]
    assert ours["labelled"] == 3  # p0 happy, p1 sad, p2 happy; p3 unlabelled; p4 past the limit
    assert ours["faces_found"] == 3  # all but p1
    assert ours["accuracy"] == pytest.approx(2 / 3)  # p1's missing face is wrong
    fer = results["per_contender"]["fer, FER() (TFLite, its default)"]
    assert fer["faces_found"] == 4 and fer["accuracy"] == pytest.approx(2 / 3)  # sad p1 wrong
    assert [row[3] for row in rows] == ["3/4", "4/4", "4/4"]


def _peers_folder(tmp_path, **raw_fields):
    faces = {
        peers_name: {"accuracy": a, "mean_class_recall": r, "faces_per_s": s}
        for peers_name, a, r, s in (
            (model_card.PEER_FER, 0.6548, 0.58, 774.0),
            (model_card.PEER_OURS, 0.6829, 0.5919, 9.3),
        )
    }
    raw = {
        "smoke": False,
        "limit": None,
        "split": "private_test",
        "fer": {"version": "25.10.3"},
        "hardware": {"cpu_model": "a CPU"},
        "results": {"faces": faces},
    } | raw_fields
    (tmp_path / "raw.json").write_text(json.dumps(raw))
    return str(tmp_path)


def test_the_cards_peer_line_comes_from_a_full_peers_run(tmp_path):
    line = model_card.peer_line(model_card.peer(_peers_folder(tmp_path)))
    assert "65.48% (mean class recall 58.00%), 774 faces/s" in line
    assert "68.29% (59.19%), 9.3 faces/s" in line
    assert "not compared" in model_card.peer_line(model_card.peer(None))


def test_the_cards_peer_line_does_not_call_other_weights_this_model(tmp_path):
    compared = model_card.peer(
        _peers_folder(tmp_path, fer_jax={"weights_sha256": "3f566987cb2f" + "0" * 52})
    )
    assert "this model there" in model_card.peer_line(compared, "3f566987cb2f" + "0" * 52)
    other = model_card.peer_line(compared, "80446449fc1f" + "0" * 52)
    assert "this model there" not in other
    assert "this network there with other weights (sha256 3f566987cb2f)" in other


@pytest.mark.parametrize("fields", [{"smoke": True}, {"limit": 300}, {"split": "public_test"}])
def test_the_card_refuses_a_smoke_partial_or_other_split_peers_run(tmp_path, fields):
    with pytest.raises(SystemExit, match="not a full private_test comparison"):
        model_card.peer(_peers_folder(tmp_path, **fields))


def test_fer_scores_each_face_of_a_strip_as_it_scores_it_alone():
    pytest.importorskip("fer", reason="the fer package (the peers extra) is not installed")
    fer_module = peers.import_fer()
    detector = fer_module.FER(offsets=(0, 0))
    faces = np.random.default_rng(0).integers(0, 256, (4, 48, 48), np.uint8)
    classify, _ = peers.fer_face_classifier(detector, CLASS_NAMES)
    together = classify(faces)
    alone = np.concatenate([classify(faces[k : k + 1]) for k in range(len(faces))])
    assert together.tolist() == alone.tolist()
    import cv2

    scores = [
        detector.detect_emotions(cv2.cvtColor(f, cv2.COLOR_GRAY2BGR), [(0, 0, 48, 48)])
        for f in faces
    ]
    assert [peers.fer_label(s[0]["emotions"], CLASS_NAMES) for s in scores] == alone.tolist()
