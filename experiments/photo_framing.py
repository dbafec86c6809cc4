"""The shipped model on FER2013 faces that come through the photo path: detect, crop, resize.

    python -m experiments.photo_framing --manual_dir=/path/to/fer2013 \
        --splits public_test private_test --margins 0 0.1 0.2 0.3 --crops 1

A user's photo reaches the model through `Recognizer.predict`: OpenCV's Haar cascade finds the
face, `crop_face` cuts a square of the box's side plus `margin` of it on each side, and the square
is resized to 48x48. FER2013's faces were framed by another detector, so the model has only seen
FER2013's framing; a crop rule that frames faces differently (tighter, looser, off-centre) costs
accuracy on every photo. This measures that cost on labelled faces.

Each FER2013 face becomes a "photo": upscaled `--scale` times (bicubic: a camera's resolution),
then edge-padded by `--pad` of its side on every side (context for the detector, as
`crop_face` fills beyond an image's border). The recogniser's own detection (`find_faces`, default
settings) runs on it; where it finds a face, the largest box is cropped at each `--margin` and
classified (and the probabilities of all margins averaged: test-time framing jitter).
Reported per split: the detection rate; accuracy of the faces as given (all, and the detected
ones); of FER2013's own frame cut from the photo (what resampling alone costs); through the
photo path at each margin (detected ones); and where the detector's box sits in FER2013's frame
(box side / frame side, centre offset, medians), from which the margin that reproduces FER2013's
framing follows: `(frame / box - 1) / 2`. Edge padding is not a photo's background: margins that
reach beyond FER2013's frame see its streaks, so their figures are a lower bound.

A check of the same question on faces that are not FER2013's, by landmarks (`eye_check`): the
distance between the eyes over the side of the square, from OpenCV's eye cascade, in FER2013's
frames (`--eye_faces` PublicTest faces) and in the Haar box on the 100 LFW faces of
scikit-image's `lfw_subset` (real press photos, 25x25, upscaled 8x and edge-padded for the
detector). Equal spacings mean the box is FER2013's framing; the margin that matches is
`(box spacing / frame spacing - 1) / 2`.

Choose the margin on PublicTest, report PrivateTest (the FER2013 protocol). Writes `table.md`
and `raw.json` to `--out` (default experiments/results/photo_framing_<platform>/).
"""

from __future__ import annotations

import argparse
import functools
import os
import time
from typing import Any

import cv2
import numpy as np

from experiments import common, provenance

PERCENTILES = (5, 25, 50, 75, 95)
EYE_CASCADE = "haarcascade_eye.xml"  # OpenCV's, shipped in opencv-python like the face cascade
LFW_SCALE = 8  # 25x25 LFW faces -> 200x200


def as_photo(face: np.ndarray, scale: int, pad: float) -> tuple[np.ndarray, tuple[int, int, int]]:
    """A (48, 48) uint8 face -> (photo (S, S) uint8, (x0, y0, side) of the face's frame in it)."""
    side = face.shape[0] * scale
    big = cv2.resize(face, (side, side), interpolation=cv2.INTER_CUBIC)
    border = int(round(pad * side))
    return np.pad(big, border, mode="edge"), (border, border, side)


def frame_geometry(box: np.ndarray, frame: tuple[int, int, int]) -> tuple[float, float, float]:
    """(box side / frame side, centre dx / frame side, centre dy / frame side) of `[x, y, w, h]`."""
    x, y, w, h = (float(v) for v in box)
    x0, y0, side = frame
    return (
        max(w, h) / side,
        (x + w / 2 - (x0 + side / 2)) / side,
        (y + h / 2 - (y0 + side / 2)) / side,
    )


def measure_split(
    recognizer: Any,
    images: np.ndarray,
    labels: np.ndarray,
    margins: list[float],
    scale: int,
    pad: float,
) -> dict[str, Any]:
    """Detection, geometry and accuracies of one split (module docstring)."""
    from data_pipelines.faces import crop_face
    from fer_jax.inference.recognizer import find_faces

    n = len(images)
    detected = np.zeros(n, bool)
    geometry = np.full((n, 3), np.nan)
    crops = {m: np.zeros_like(images) for m in margins}
    resampled = np.zeros_like(images)  # the exact frame, through the upscale and the crop's resize
    for i, face in enumerate(images):
        photo, frame = as_photo(face, scale, pad)
        x0, y0, side = frame
        resampled[i] = crop_face(photo, (x0, y0, side, side), margin=0.0, size=images.shape[1])
        boxes = find_faces(photo)
        if not len(boxes):
            continue
        detected[i] = True
        geometry[i] = frame_geometry(boxes[0], frame)
        for m in margins:
            crops[m][i] = crop_face(photo, boxes[0], margin=m, size=images.shape[1])
    given = recognizer.predict_faces(images).argmax(-1) == labels
    exact = recognizer.predict_faces(resampled).argmax(-1) == labels
    probabilities = {m: recognizer.predict_faces(crops[m][detected]) for m in margins}
    through = {m: p.argmax(-1) == labels[detected] for m, p in probabilities.items()}
    averaged = sum(probabilities.values()).argmax(-1) == labels[detected]
    ratio, dx, dy = np.nanmedian(geometry, axis=0) if detected.any() else (np.nan,) * 3
    return {
        "faces": n,
        "detected": int(detected.sum()),
        "given_accuracy": float(given.mean()),
        "given_accuracy_detected": float(given[detected].mean()) if detected.any() else None,
        "exact_frame_accuracy": float(exact.mean()),
        "photo_accuracy": {str(m): float(c.mean()) if c.size else None for m, c in through.items()},
        "photo_accuracy_margins_averaged": float(averaged.mean()) if averaged.size else None,
        "median_box_over_frame": float(ratio),
        "box_over_frame_percentiles_5_25_50_75_95": (
            np.nanpercentile(geometry[:, 0], PERCENTILES).tolist() if detected.any() else None
        ),
        "median_centre_offset": [float(dx), float(dy)],
        "margin_matching_frame": float((1 / ratio - 1) / 2),
    }


@functools.lru_cache(maxsize=1)
def _eye_cascade() -> cv2.CascadeClassifier:
    return cv2.CascadeClassifier(os.path.join(cv2.data.haarcascades, EYE_CASCADE))


def eye_spacing(face: np.ndarray) -> tuple[float, float] | None:
    """`(distance between the eye centres, their mean height)`, each over the side, of a square
    (S, S) uint8 face; None unless OpenCV's eye cascade finds exactly two eyes in its upper 60%,
    at least 15% of the side apart."""
    side = face.shape[0]
    found = _eye_cascade().detectMultiScale(face, 1.1, 5, minSize=(side // 10, side // 10))
    centres = sorted((x + w / 2, y + h / 2) for x, y, w, h in found if y + h / 2 < 0.6 * side)
    if len(centres) != 2 or centres[1][0] - centres[0][0] < 0.15 * side:
        return None
    (x1, y1), (x2, y2) = centres
    return (x2 - x1) / side, (y1 + y2) / 2 / side


def eye_check(fer_faces: np.ndarray, lfw_faces: np.ndarray, scale: int) -> dict[str, Any]:
    """Eye spacing in FER2013's frames vs in the Haar box on LFW faces (module docstring).

    Args:
      fer_faces: (N, 48, 48) uint8, upscaled `scale` times before the eye cascade.
      lfw_faces: (M, h, w) float in [0, 1] (scikit-image's `lfw_subset` faces).
    """
    from fer_jax.inference.recognizer import find_faces

    def resized(face: np.ndarray, factor: int) -> np.ndarray:
        size = (face.shape[1] * factor, face.shape[0] * factor)
        return cv2.resize(face, size, interpolation=cv2.INTER_CUBIC)

    fer = [eye_spacing(resized(f, scale)) for f in fer_faces]
    in_boxes = []
    for face in lfw_faces:
        photo, _ = as_photo(np.round(face * 255).astype(np.uint8), LFW_SCALE, 0.5)
        boxes = find_faces(photo)
        if len(boxes):
            x, y, w, h = boxes[0]
            in_boxes.append(eye_spacing(photo[y : y + max(w, h), x : x + max(w, h)]))
    fer_found = np.array([e for e in fer if e is not None]).reshape(-1, 2)
    box_found = np.array([e for e in in_boxes if e is not None]).reshape(-1, 2)
    frame_spacing, frame_height = np.median(fer_found, axis=0)
    box_spacing, box_height = np.median(box_found, axis=0)
    return {
        "fer2013_faces": len(fer_faces),
        "fer2013_two_eyes": len(fer_found),
        "lfw_faces": len(lfw_faces),
        "lfw_boxes": len(in_boxes),
        "lfw_two_eyes": len(box_found),
        "median_eye_spacing_over_fer2013_frame": float(frame_spacing),
        "median_eye_spacing_over_haar_box": float(box_spacing),
        "median_eye_height_over_fer2013_frame": float(frame_height),
        "median_eye_height_over_haar_box": float(box_height),
        "margin_matching_eyes": float((box_spacing / frame_spacing - 1) / 2),
    }


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def _split_rows(split: str, r: dict[str, Any], margins: list[float]) -> list[list[str]]:
    """The table's rows of one split's `measure_split` result `r`."""
    detected = f"{r['detected']}/{r['faces']} ({_percent(r['detected'] / r['faces'])}%)"
    rows = [
        [split, "as given (all faces)", "-", _percent(r["given_accuracy"])],
        [split, "FER2013's own frame, resampled", "-", _percent(r["exact_frame_accuracy"])],
        [split, "as given (detected faces)", detected, _percent(r["given_accuracy_detected"])],
    ]
    for m in margins:
        rows.append(
            [split, f"photo path, margin {m:g}", detected, _percent(r["photo_accuracy"][str(m)])]
        )
    averaged = r["photo_accuracy_margins_averaged"]
    rows.append(
        [split, "photo path, probabilities averaged over the margins", detected, _percent(averaged)]
    )
    return rows


def _eye_check(args: argparse.Namespace) -> dict[str, Any]:
    """`eye_check` on the first `--eye_faces` PublicTest faces and 100 LFW faces."""
    from skimage import data as skimage_data  # scikit-image: the test extra

    from data_pipelines.files import load_split_from_files

    fer = load_split_from_files("fer2013", "public_test", args.manual_dir)["image"]
    return eye_check(fer[: args.eye_faces, ..., 0], skimage_data.lfw_subset()[:100], args.scale)


def _eye_note(e: dict[str, Any]) -> str:
    """The heading's sentence on the eye check `e`."""
    return (
        f"Eye spacing over the side (medians): FER2013's frame "
        f"{e['median_eye_spacing_over_fer2013_frame']:.3f} ({e['fer2013_two_eyes']} of "
        f"{e['fer2013_faces']} PublicTest faces), the Haar box on LFW faces "
        f"{e['median_eye_spacing_over_haar_box']:.3f} ({e['lfw_two_eyes']} of "
        f"{e['lfw_faces']}); eye height {e['median_eye_height_over_fer2013_frame']:.3f} vs "
        f"{e['median_eye_height_over_haar_box']:.3f}; margin matching the eyes "
        f"{e['margin_matching_eyes']:+.3f}"
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = common.parser(__doc__)
    common.add_manual_dir(ap)
    common.add_checkpoint(ap)
    ap.add_argument("--splits", nargs="*", default=["public_test", "private_test"])
    ap.add_argument("--eye_faces", type=int, default=1500, help="0: no eye check")
    ap.add_argument("--margins", nargs="+", type=float, default=[0.0, 0.1, 0.2, 0.3])
    ap.add_argument("--crops", type=int, default=1, choices=(1, 10))
    ap.add_argument("--scale", type=int, default=4, help="upscaling of the 48x48 face")
    ap.add_argument("--pad", type=float, default=0.5, help="edge padding, fraction of the side")
    common.add_limit(ap)
    common.add_out(ap)
    args = ap.parse_args(argv)
    if args.scale < 1 or args.pad < 0 or min(args.margins) < 0:
        ap.error("need --scale >= 1, --pad >= 0 and every --margins >= 0")

    from data_pipelines.files import load_split_from_files
    from fer_jax.inference.recognizer import Recognizer

    recognizer = Recognizer.from_checkpoint(args.checkpoint, crops=args.crops, batch_size=64)
    results, rows, seconds = {}, [], {}
    for split in args.splits:
        start = time.perf_counter()
        data = load_split_from_files("fer2013", split, args.manual_dir)
        images, labels = data["image"][..., 0], data["label"]
        if args.limit:
            images, labels = images[: args.limit], labels[: args.limit]
        r = results[split] = measure_split(
            recognizer, images, labels, args.margins, args.scale, args.pad
        )
        seconds[split] = time.perf_counter() - start
        rows += _split_rows(split, r, args.margins)
    notes = [
        f"Model: {args.checkpoint}; {args.crops} crop(s); faces upscaled {args.scale}x, padded "
        f"{args.pad:g} of their side; {provenance.cpu_model()}"
    ]
    if rows:
        notes.append(
            "Medians of the detector's box in FER2013's frame: "
            + "; ".join(
                f"{s}: box/frame {r['median_box_over_frame']:.3f}, centre offset "
                f"({r['median_centre_offset'][0]:+.3f}, {r['median_centre_offset'][1]:+.3f}), "
                f"margin matching the frame {r['margin_matching_frame']:.3f}"
                for s, r in results.items()
            )
        )
    if args.eye_faces:
        results["eye_check"] = e = _eye_check(args)
        notes.append(_eye_note(e))
    common.write_table(
        "photo_framing",
        ". ".join(notes) + ".",
        ["split", "faces through", "detected", "accuracy %"],
        rows,
        {"args": vars(args), "results": results, "seconds": seconds},
        args.out,
    )
    return results


if __name__ == "__main__":
    main()
