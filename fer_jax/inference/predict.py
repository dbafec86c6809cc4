r"""`python -m fer_jax.predict`: facial expressions in photos, folders of photos and videos.

    python -m fer_jax.predict [--checkpoint=runs/fer2013] photo.jpg photos/ clip.mp4 [--json]
    python -m fer_jax.predict --example

Options, output formats, videos, annotations, attention maps and exit statuses:
docs/prediction_and_export.md. `--example` adds the bundled photo `fer_jax/examples/astronaut.jpg`
(Eileen Collins, NASA, public domain): a first command that needs no data and no download.
"""

from __future__ import annotations

import argparse
import collections
import csv
import itertools
import json
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any, TextIO

import cv2
import jax
import numpy as np
from PIL import Image

from data_pipelines.crops import CROP_CHOICES, CROP_SIZE, NUM_CROPS
from fer_jax.inference.recognizer import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_MATMUL_DTYPE,
    DEFAULT_MAX_SIDE,
    DEFAULT_MIN_FACE,
    FACE_SIZE,
    PHOTO_MARGIN,
    Face,
    ImageError,
    Recognizer,
    read_image,
    to_gray,
)
from fer_jax.model.resnet import MATMUL_DTYPES
from fer_jax.user_errors import UserError, run_cli

DEFAULT_COMPILATION_CACHE = "~/.cache/fer_jax/jax"  # as fer_jax.main's --compilation_cache
VIDEO_EXTENSIONS = frozenset({".avi", ".mp4", ".m4v", ".mov", ".mkv", ".webm", ".mpg", ".mpeg"})
VIDEO_CODEC = "MJPG"
PANEL_SIZE = 176
EXAMPLE_IMAGE = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "astronaut.jpg"
)
BOX_COLOUR = (0, 255, 0)  # RGB.
# `Recognizer.from_checkpoint`'s options that the command lines set.
MODEL_OPTIONS = ("adjust", "crops", "batch_size", "margin", "max_side", "min_face", "matmul_dtype")


# ----------------------------------------------------------------------------- inputs


def is_video(path: str) -> bool:
    return os.path.splitext(path)[1].lower() in VIDEO_EXTENSIONS


def expand_inputs(paths: Sequence[str]) -> list[str]:
    """The files to process: files as given, folders replaced by their sorted image/video files."""
    files = []
    for path in paths:
        if os.path.isdir(path):
            names = sorted(os.listdir(path))
            files += [
                os.path.join(path, n)
                for n in names
                if os.path.isfile(os.path.join(path, n))
                and (os.path.splitext(n)[1].lower() in Image.registered_extensions() or is_video(n))
            ]
        else:
            files.append(path)
    return files


def parse_box(text: str) -> list[int]:
    """'X,Y,W,H' -> [x, y, w, h]."""
    try:
        box = [int(v) for v in text.split(",")]
    except ValueError:
        box = []
    if len(box) != 4:
        raise argparse.ArgumentTypeError(f"a box is X,Y,W,H in integer pixels, got {text!r}")
    return box


def parse_replica(text: str) -> int | str:
    """`--replica`: an index k or 'ensemble'."""
    if text != "ensemble" and not text.isdigit():
        raise argparse.ArgumentTypeError(f"a replica index or 'ensemble', got {text!r}")
    return text if text == "ensemble" else int(text)


def load_boxes_file(path: str) -> dict[str, list[list[float]]]:
    """Reads `--boxes`: JSON `{image path or file name: [[x, y, w, h], ...]}`."""
    try:
        with open(path) as f:
            boxes = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise argparse.ArgumentTypeError(f"{path}: cannot read the boxes file: {e}") from e
    if not isinstance(boxes, dict):
        raise argparse.ArgumentTypeError(
            f"{path}: expected a JSON object {{image: [[x, y, w, h]]}}"
        )
    return boxes


def boxes_for(path: str, boxes: dict[str, Any] | None, default: list[list[int]] | None) -> Any:
    """The caller's boxes for `path` (by path, normalised path or file name), else `default`."""
    if boxes:
        for key in (path, os.path.normpath(path), os.path.basename(path)):
            if key in boxes:
                return boxes[key]
    return default


# ----------------------------------------------------------------------------- drawing


def _rgb(image: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB) if image.ndim == 2 else image.copy()


def annotate(image: np.ndarray, faces: Sequence[Face]) -> np.ndarray:
    """The image (`(H, W)` or `(H, W, 3)` uint8) as RGB with each face's box and top label."""
    out = _rgb(image)
    thickness = max(1, round(max(out.shape[:2]) / 400))
    scale = max(0.4, max(out.shape[:2]) / 1000)
    for face in faces:
        x, y, w, h = face.box
        cv2.rectangle(out, (x, y), (x + w, y + h), BOX_COLOUR, thickness)
        text = f"{face.label} {float(np.max(face.probabilities)):.2f}"
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
        top = y - th - base - 2 if y - th - base - 2 >= 0 else y + h
        cv2.rectangle(out, (x, top), (x + tw + 2, top + th + base + 2), BOX_COLOUR, cv2.FILLED)
        cv2.putText(
            out, text, (x + 1, top + th + 1), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), thickness
        )
    return out


def heat_map(attention: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """`(h, w)` map -> `(size[1], size[0], 3)` RGB uint8 jet colours, min-max normalised."""
    low, high = float(attention.min()), float(attention.max())
    unit = (attention - low) / (high - low) if high > low else np.zeros_like(attention)
    resized = cv2.resize(unit.astype(np.float32), size, interpolation=cv2.INTER_LINEAR)
    coloured = cv2.applyColorMap(np.round(resized * 255).astype(np.uint8), cv2.COLORMAP_JET)
    return cv2.cvtColor(coloured, cv2.COLOR_BGR2RGB)


def centre_crop_square(box: Sequence[int], margin: float) -> tuple[int, int, int]:
    """`(left, top, side)` in image pixels of the face's centre 44x44 crop.

    The 48x48 face is the square of side `max(w, h) * (1 + 2 * margin)` centred on the box
    (`data_pipelines.faces.crop_face`); its centre crop starts 2/48 of that side in.
    """
    x, y, w, h = box
    side = max(w, h) * (1 + 2 * margin)
    inner = side * CROP_SIZE / FACE_SIZE
    return round(x + w / 2 - inner / 2), round(y + h / 2 - inner / 2), max(1, round(inner))


def attention_overlay(
    image: np.ndarray, faces: Sequence[Face], margin: float = PHOTO_MARGIN, alpha: float = 0.5
) -> np.ndarray:
    """The image as RGB with each face's mean attention map blended over its centre crop."""
    out = _rgb(image)
    height, width = out.shape[:2]
    for face in faces:
        if face.attention is None:
            raise ValueError("faces carry no attention maps; predict with attention=True")
        left, top, side = centre_crop_square(face.box, margin)
        heat = heat_map(face.attention.mean(axis=0), (side, side))
        x0, y0, x1, y1 = max(left, 0), max(top, 0), min(left + side, width), min(top + side, height)
        if x1 <= x0 or y1 <= y0:
            continue
        patch = heat[y0 - top : y1 - top, x0 - left : x1 - left]
        region = out[y0:y1, x0:x1].astype(np.float32)
        out[y0:y1, x0:x1] = np.round((1 - alpha) * region + alpha * patch).astype(np.uint8)
    return out


def attention_panels(
    face_crop: np.ndarray, attention: np.ndarray, alpha: float = 0.5
) -> np.ndarray:
    """A strip: the centre 44x44 of a 48x48 face crop, then its 4 stage maps blended over it."""
    offset = (FACE_SIZE - CROP_SIZE) // 2
    centre = face_crop[offset : offset + CROP_SIZE, offset : offset + CROP_SIZE]
    size = (PANEL_SIZE, PANEL_SIZE)
    base = _rgb(cv2.resize(centre, size, interpolation=cv2.INTER_LINEAR)).astype(np.float32)
    panels = [base.astype(np.uint8)]
    for stage_map in attention:
        blended = (1 - alpha) * base + alpha * heat_map(stage_map, size)
        panels.append(np.round(blended).astype(np.uint8))
    titles = ["face"] + [f"stage {k + 1}" for k in range(len(attention))]
    for panel, title in zip(panels, titles, strict=True):
        cv2.putText(panel, title, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1)
    return np.concatenate(panels, axis=1)


def write_png(path: str, rgb: np.ndarray) -> None:
    if not cv2.imwrite(path, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
        raise OSError(f"{path}: cannot write the image")


# ----------------------------------------------------------------------------- output


def record(
    source: str,
    faces: Sequence[Face],
    class_names: Sequence[str],
    frame: int | None = None,
    time_s: float | None = None,
) -> dict[str, Any]:
    """One image's (or video frame's) record as `--json` writes it (and serve answers):
    'source', 'frame' and 'time_s' of a frame, 'faces' each with 'box' [x, y, w, h],
    'probabilities' {name: p} and 'label'."""
    entry: dict[str, Any] = {"source": source}
    if frame is not None:
        entry |= {"frame": frame, "time_s": round(time_s, 4)}
    entry["faces"] = [
        {
            "box": list(face.box),
            "probabilities": {
                n: float(p) for n, p in zip(class_names, face.probabilities, strict=True)
            },
            "label": face.label,
        }
        for face in faces
    ]
    return entry


class Reporter:
    """Writes the results as a table, JSON or CSV to `out`; messages go to `err`."""

    def __init__(self, fmt: str, class_names: Sequence[str], out: TextIO, err: TextIO):
        self.fmt, self.class_names, self.out, self.err = fmt, tuple(class_names), out, err
        self.records: list[dict[str, Any]] = []
        self.failed = 0
        self._csv = csv.writer(out, lineterminator="\n") if fmt == "csv" else None
        if self._csv is not None:
            columns = ["source", "frame", "time_s", "face", "x", "y", "w", "h"]
            self._csv.writerow([*columns, *self.class_names, "label"])

    def error(self, source: str, message: str) -> None:
        self.failed += 1
        self.err.write(f"error: {message}\n")
        if self.fmt == "json":
            self.records.append({"source": source, "error": message})

    def message(self, text: str) -> None:
        self.err.write(f"{text}\n")

    def faces(self, source: str, faces: Sequence[Face], frame: int | None = None, time_s=None):
        """Reports the faces of an image or of a video's `frame` at `time_s` seconds."""
        if self.fmt == "json":
            self.records.append(record(source, faces, self.class_names, frame, time_s))
        elif self.fmt == "csv":
            for k, face in enumerate(faces):
                self._csv.writerow(
                    [source, "" if frame is None else frame]
                    + ["" if time_s is None else f"{time_s:.4f}", k, *face.box]
                    + [f"{p:.6f}" for p in face.probabilities]
                    + [face.label]
                )
        elif faces:
            where = source if frame is None else f"{source} frame {frame} ({time_s:.2f} s)"
            self.out.write(self._table(where, faces))
        self.out.flush()

    def _table(self, where: str, faces: Sequence[Face]) -> str:
        widths = [max(len(n), 5) for n in self.class_names]
        header = ["face", "box (x, y, w, h)".ljust(22)]
        header += [n.rjust(w) for n, w in zip(self.class_names, widths, strict=True)] + ["label"]
        lines = [f"{where}: {len(faces)} face{'s' if len(faces) != 1 else ''}", "  ".join(header)]
        for k, face in enumerate(faces):
            row = [str(k).ljust(4), ", ".join(str(v) for v in face.box).ljust(22)]
            row += [f"{p:.3f}".rjust(w) for p, w in zip(face.probabilities, widths, strict=True)]
            lines.append("  ".join(row + [face.label]))
        return "\n".join(lines) + "\n\n"

    def close(self) -> None:
        if self.fmt == "json":
            json.dump(self.records, self.out, indent=1)
            self.out.write("\n")
        self.out.flush()


# ----------------------------------------------------------------------------- processing


def recognize(
    path: str,
    image: np.ndarray,
    stem: str,
    recognizer: Recognizer,
    args: argparse.Namespace,
    where: str,
) -> list[Face]:
    """The faces of an image or video frame (`where` names it in errors), and with
    `--attention` their maps written as `<stem>_attention.png` and `<stem>_face<k>_stages.png`."""
    gray, boxes = to_gray(image), boxes_for(path, args.boxes, args.box)
    faces = recognizer.recognize(gray, boxes=boxes, attention=bool(args.attention), name=where)
    if args.attention and faces:
        overlay = attention_overlay(image, faces, recognizer.margin)
        write_png(os.path.join(args.attention, f"{stem}_attention.png"), overlay)
        crops = recognizer.crop_faces(gray, np.asarray([f.box for f in faces]))
        for k, (face, crop) in enumerate(zip(faces, crops, strict=True)):
            panels = attention_panels(crop, face.attention)
            write_png(os.path.join(args.attention, f"{stem}_face{k}_stages.png"), panels)
    return faces


def process_image(
    path: str, recognizer: Recognizer, reporter: Reporter, args: argparse.Namespace, stem: str
) -> None:
    image = read_image(path)
    faces = recognize(path, image, stem, recognizer, args, where=path)
    if not faces:
        reporter.message(f"{path}: no face found")
    reporter.faces(path, faces)
    if args.annotate:
        write_png(os.path.join(args.annotate, f"{stem}.png"), annotate(image, faces))


def video_frames(capture: cv2.VideoCapture, every: int, decode_all: bool) -> Iterator[Any]:
    """Yields `(index, RGB frame)` of every `every`-th frame, and of the others `(index, None)`
    or, with `decode_all`, `(index, RGB frame)`."""
    for index in itertools.count():
        if index % every == 0 or decode_all:
            ok, frame = capture.read()
        else:
            ok, frame = capture.grab(), None
        if not ok:
            return
        yield index, None if frame is None else cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)


def process_video(
    path: str, recognizer: Recognizer, reporter: Reporter, args: argparse.Namespace, stem: str
) -> None:
    from tqdm import tqdm  # Only videos show a progress bar (when stderr is a terminal).

    capture = cv2.VideoCapture(path)
    if not capture.isOpened():
        raise ImageError(f"{path}: cannot open the video (not a video, or no codec for it)")
    writer, faces, found_any, frames = None, [], False, 0
    try:
        fps = capture.get(cv2.CAP_PROP_FPS) or 25.0
        total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) or None
        bar = tqdm(
            total=total, unit="frame", desc=os.path.basename(path), disable=args.quiet or None
        )
        with bar:
            for index, frame in video_frames(capture, args.every, bool(args.annotate)):
                bar.update(1)
                frames += 1
                if index % args.every == 0:
                    name, where = f"{stem}_frame{index:06d}", f"{path} frame {index}"
                    faces = recognize(path, frame, name, recognizer, args, where)
                    found_any |= bool(faces)
                    if faces or args.format == "json":
                        with tqdm.external_write_mode(file=reporter.out):
                            reporter.faces(path, faces, frame=index, time_s=index / fps)
                if frame is not None and args.annotate:
                    if writer is None:
                        out = os.path.join(args.annotate, f"{stem}_annotated.avi")
                        codec = cv2.VideoWriter_fourcc(*VIDEO_CODEC)
                        writer = cv2.VideoWriter(out, codec, fps, frame.shape[1::-1])
                        if not writer.isOpened():
                            raise OSError(f"{out}: cannot open a {VIDEO_CODEC} video writer")
                    writer.write(cv2.cvtColor(annotate(frame, faces), cv2.COLOR_RGB2BGR))
        if frames == 0:
            raise ImageError(f"{path}: the video has no readable frame")
        if not found_any:
            reporter.message(f"{path}: no face found in any sampled frame")
    finally:
        capture.release()
        if writer is not None:
            writer.release()


def run(args: argparse.Namespace, recognizer: Recognizer, out: TextIO, err: TextIO) -> int:
    """Processes `args.paths`; returns the exit status (0, or 1 if an input failed)."""
    reporter = Reporter(args.format, recognizer.class_names, out, err)
    for directory in (args.annotate, args.attention):
        if directory:
            os.makedirs(directory, exist_ok=True)
    used: collections.Counter[str] = collections.Counter()  # two `a.jpg` write `a`, `a_2`
    for path in expand_inputs(args.paths):
        if not os.path.exists(path):
            reporter.error(path, f"{path}: no such file or directory")
            continue
        stem = os.path.splitext(os.path.basename(path))[0] or "image"
        used[stem] += 1
        stem = stem if used[stem] == 1 else f"{stem}_{used[stem]}"
        process = process_video if is_video(path) else process_image
        try:
            process(path, recognizer, reporter, args, stem)
        except (ImageError, OSError) as e:
            reporter.error(path, str(e))
    reporter.close()
    return 1 if reporter.failed else 0


def add_model_options(
    parser: argparse.ArgumentParser,
    batch_size: int = DEFAULT_BATCH_SIZE,
    batch_help: str = "faces per model call",
) -> None:
    """The options that load and run the model (`load_recognizer`), predict's and serve's."""
    parser.add_argument(
        "--checkpoint",
        default="pretrained",
        help="run directory (best, else latest), checkpoint directory, or 'pretrained' (the "
        "model shipped in the package: the default; 'pretrained:NAME' or a .npz file for "
        "another, fer_jax.model.pretrained)",
    )
    parser.add_argument(
        "--replica",
        type=parse_replica,
        help="of a replica run: an index k, or 'ensemble' (their probabilities averaged); "
        "default: the one chosen on the select split (docs/replicas.md)",
    )
    parser.add_argument("--batch_size", type=int, default=batch_size, help=batch_help)
    parser.add_argument(
        "--no_adjust",
        dest="adjust",
        action="store_false",
        help="the model's own probabilities, without the class-prior logit adjustment that "
        "the shipped model applies by default (fer_jax.inference.prior_adjustment)",
    )
    parser.add_argument(
        "--matmul_dtype",
        choices=MATMUL_DTYPES,
        default=DEFAULT_MATMUL_DTYPE,
        help="operands of the CPU convolutions' matmuls: 'auto' (the default: bfloat16, "
        "accumulated in float32, on a CPU that multiplies it natively, AVX512-BF16 or AMX; "
        "float32 elsewhere), 'float32' (the model's own evaluation) or 'bfloat16'",
    )
    parser.add_argument(
        "--compilation_cache",
        default=DEFAULT_COMPILATION_CACHE,
        help="persistent XLA compilation cache ('' disables; $JAX_COMPILATION_CACHE_DIR wins)",
    )
    parser.add_argument(
        "--verbose", action="store_true", help="show the traceback of an error in the input"
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m fer_jax.predict",
        description="Recognise facial expressions in images, folders and videos.",
    )
    parser.add_argument("paths", nargs="*", metavar="PATH", help="images, folders or videos")
    parser.add_argument(
        "--example",
        action="store_true",
        help="also run on the bundled photo fer_jax/examples/astronaut.jpg (NASA, public "
        "domain): `python -m fer_jax.predict --example` needs no data and no download",
    )
    add_model_options(parser)
    parser.add_argument(
        "--crops",
        type=int,
        choices=CROP_CHOICES,
        default=NUM_CROPS,
        help="10: average the ten 44x44 crops (the paper's evaluation); 1: the centre crop "
        "alone, ~10x less compute per face",
    )
    fmt = parser.add_mutually_exclusive_group()
    fmt.add_argument("--json", dest="format", action="store_const", const="json")
    fmt.add_argument("--csv", dest="format", action="store_const", const="csv")
    parser.set_defaults(format="table")
    parser.add_argument("--output", help="write the results to this file instead of stdout")
    parser.add_argument("--annotate", metavar="DIR", help="write annotated images/videos here")
    parser.add_argument("--attention", metavar="DIR", help="write attention overlays here")
    parser.add_argument("--every", type=int, default=10, help="video: every n-th frame")
    boxes = parser.add_mutually_exclusive_group()
    boxes.add_argument(
        "--box", type=parse_box, action="append", help="X,Y,W,H face box (repeatable), all inputs"
    )
    boxes.add_argument(
        "--boxes", type=load_boxes_file, help="JSON {path or file name: [[x, y, w, h], ...]}"
    )
    parser.add_argument(
        "--margin", type=float, default=PHOTO_MARGIN, help="face-crop margin (fraction of the box)"
    )
    parser.add_argument(
        "--max_side", type=int, default=DEFAULT_MAX_SIDE, help="detect on a copy this size"
    )
    parser.add_argument(
        "--min_face", type=int, default=DEFAULT_MIN_FACE, help="smallest face side, pixels"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.example:
        args.paths = [*args.paths, EXAMPLE_IMAGE]
    if not args.paths:
        parser.error("give images, folders or videos to recognise, or --example")
    require_positive(parser, args, ("every", "batch_size"))
    return args


def require_positive(
    parser: argparse.ArgumentParser, args: argparse.Namespace, names: Sequence[str]
) -> None:
    """`parser.error` naming the first option of `names` that is set and below 1."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be >= 1, got {value}")


def use_compilation_cache(directory: str) -> None:
    """Keeps every compiled program in the persistent cache `directory` ('' = none), unless
    $JAX_COMPILATION_CACHE_DIR names one; the programs here compile in well under JAX's
    default 1 s threshold for caching, so the threshold is 0."""
    if directory and not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def load_recognizer(args: argparse.Namespace, **options: Any) -> Recognizer:
    """The recognizer of `args.checkpoint` and `args.replica`, with the options `args` holds of
    `MODEL_OPTIONS` (`options` override them); UserError if it cannot be loaded."""
    from fer_jax.training.checkpoint import CheckpointError  # Orbax only when loading one.

    options = {n: getattr(args, n) for n in MODEL_OPTIONS if hasattr(args, n)} | options
    if args.replica == "ensemble" and getattr(args, "attention", None):
        raise UserError("--attention needs one model: give --replica=k, not the ensemble")
    try:
        return Recognizer.from_checkpoint(args.checkpoint, args.replica, **options)
    except (OSError, ValueError, CheckpointError) as e:
        raise UserError(f"cannot load the checkpoint {args.checkpoint}: {e}") from e


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status (2: an error in the input, e.g. the
    checkpoint; 1: an input file failed)."""
    args = parse_args(argv)

    def predict() -> int:
        use_compilation_cache(args.compilation_cache)
        recognizer = load_recognizer(args)
        if not args.output:
            return run(args, recognizer, sys.stdout, sys.stderr)
        with open(args.output, "w", newline="") as out:
            return run(args, recognizer, out, sys.stderr)

    return run_cli(predict, sys.argv[1:] if argv is None else argv)
