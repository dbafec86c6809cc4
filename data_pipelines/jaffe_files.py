"""Finding, parsing and preprocessing the JAFFE image files (numpy, Pillow, OpenCV; no TensorFlow).

JAFFE (Lyons et al., 1998) holds 213 photos of 10 Japanese women, 256x256 8-bit gray TIFFs (some
stored with a gray palette), named `<subject>.<expr><n>.<id>.tiff`, e.g. `KA.AN1.39.tiff`:
two-letter subject, expression code (AN DI FE HA SA SU NE) with a repeat number, image id.

`list_images` walks a directory tree (the distribution unpacks to `jaffedbase/`), ignores hidden
files and folders (`.DS_Store`, macOS `__MACOSX/`) and every file without an image suffix
(README, rating tables); an image file whose name does not parse is an error naming the file.
`files.jaffe_arrays` turns each photo into a FER2013-like (48, 48) uint8 face
(`faces.face_or_centre_crop`).
"""

from __future__ import annotations

import dataclasses
import pathlib
import re

import numpy as np
from PIL import Image

from data_pipelines.errors import DataError
from data_pipelines.labels import JAFFE_EXPRESSION_CODES

IMAGE_SUFFIXES = frozenset({".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp", ".pgm", ".gif"})
_NAME = re.compile(
    r"(?P<subject>[A-Z]{2})\.(?P<expression>[A-Z]{2})(?P<repeat>[0-9]+)\.(?P<id>[0-9]+)"
    r"\.(?i:tiff?)"
)
_READABLE_MODES = ("L", "P", "1", "LA", "RGB", "RGBA")
MANUAL_DOWNLOAD_INSTRUCTIONS = """\
JAFFE cannot be downloaded automatically and may not be redistributed. Request it from its
authors (https://zenodo.org/record/3451524, formerly http://www.kasrl.org/jaffe.html) and unpack
it in the manual directory (`--config.manual_dir`; for `tfds build`, `--manual_dir`, default
<data_dir>/downloads/manual/) so that the 213 TIFF files named like KA.AN1.39.tiff lie there,
directly or in a subfolder (the distribution unpacks to jaffedbase/). Other files (README,
rating tables, .DS_Store) are ignored.
"""


@dataclasses.dataclass(frozen=True)
class JaffeFile:
    """One JAFFE image file and what its name says."""

    path: pathlib.Path
    subject: str  # Two letters, e.g. "KA".
    expression: str  # Two-letter code, e.g. "AN".
    label: int  # Index into labels.CLASS_NAMES.
    repeat: int  # The n in <expr><n>.
    image_id: int


def parse_filename(path: str | pathlib.Path) -> JaffeFile:
    """Parses `<subject>.<expr><n>.<id>.tiff`; DataError naming the file if it does not parse."""
    path = pathlib.Path(path)
    match = _NAME.fullmatch(path.name)
    if match is None:
        raise DataError(
            f"{path}: image file name does not parse as JAFFE's <subject>.<expr><n>.<id>.tiff "
            "(e.g. KA.AN1.39.tiff)"
        )
    expression = match["expression"]
    if expression not in JAFFE_EXPRESSION_CODES:
        raise DataError(
            f"{path}: unknown expression code {expression!r}, expected one of "
            + " ".join(JAFFE_EXPRESSION_CODES)
        )
    return JaffeFile(
        path=path,
        subject=match["subject"],
        expression=expression,
        label=JAFFE_EXPRESSION_CODES[expression],
        repeat=int(match["repeat"]),
        image_id=int(match["id"]),
    )


def list_images(root: str | pathlib.Path) -> list[JaffeFile]:
    """All JAFFE images under `root` (recursively), sorted by file name; DataError for a name
    that does not parse or occurs twice, FileNotFoundError where there is none."""
    root = pathlib.Path(root)
    found: dict[str, JaffeFile] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if any(part.startswith(".") or part == "__MACOSX" for part in rel.parts):
            continue
        if not path.is_file() or path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        item = parse_filename(path)
        if path.name in found:
            raise DataError(f"{path}: duplicate of {found[path.name].path}")
        found[path.name] = item
    if not found:
        raise FileNotFoundError(f"No JAFFE images (*.tiff) under {root}")
    return [found[name] for name in sorted(found)]


def read_gray(path: str | pathlib.Path) -> np.ndarray:
    """Reads an image file as (H, W) uint8 gray; palette images go through their palette."""
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode not in _READABLE_MODES:
                raise DataError(f"{path}: unsupported image mode {image.mode!r}, expected 8-bit")
            return np.asarray(image.convert("L"), dtype=np.uint8)
    except DataError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: unreadable or truncated image ({type(e).__name__}: {e})") from e
