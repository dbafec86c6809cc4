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


def test_photo_files_are_labelled_by_their_class_folder(tmp_path):
    (tmp_path / "happy").mkdir()
    (tmp_path / "happy" / "a.png").write_bytes(b"")
    (tmp_path / "b.JPG").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("")
    found = peers.photo_files(str(tmp_path))
    assert found == [(str(tmp_path / "b.JPG"), None), (str(tmp_path / "happy" / "a.png"), 3)]


def test_write_photos_needs_a_photo_folder(capsys):
    with pytest.raises(SystemExit):
        peers.main(["--manual_dir=x", "--write_photos"])
    assert "--write_photos needs --photos" in capsys.readouterr().err


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
