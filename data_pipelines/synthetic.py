"""Small synthetic FER2013 and JAFFE files in the exact distributed formats (for tests and demos).

`write_fer2013` writes rows as `fer2013.csv` (header `emotion,pixels,Usage`), as
`fer2013.tar.gz` holding `fer2013/fer2013.csv`, or as `icml_face_data.csv` (header
`emotion, Usage, pixels`). `write_jaffe_image` writes a JAFFE-style TIFF, optionally with a gray
palette as some real JAFFE files have. Everything is generated locally from explicit seeds.
"""

from __future__ import annotations

import io
import pathlib
import tarfile

import numpy as np
from PIL import Image

from data_pipelines.fer2013_csv import ARCHIVE_MEMBER, SOURCE_FILES, USAGE_SPLITS
from data_pipelines.labels import NUM_CLASSES

LAYOUTS = ("csv", "unpacked", "tar.gz", "icml")  # written as the files of SOURCE_FILES
USAGES = tuple(USAGE_SPLITS)  # Training, PublicTest, PrivateTest


def fer2013_rows(
    counts: tuple[int, int, int] = (30, 10, 10), *, seed: int = 0
) -> dict[str, np.ndarray]:
    """Random rows: `counts` Training, PublicTest, PrivateTest rows, interleaved.

    Returns:
      'images' (N, 48, 48) uint8, 'labels' (N,) int64 in [0, 7), 'usages' (N,) str.
    """
    rng = np.random.default_rng(seed)
    usages = np.repeat(np.asarray(USAGES), counts)
    usages = usages[rng.permutation(usages.size)]
    return {
        "images": rng.integers(0, 256, size=(usages.size, 48, 48), dtype=np.uint8),
        "labels": rng.integers(0, NUM_CLASSES, size=usages.size),
        "usages": usages,
    }


def fer2013_csv_text(
    images: np.ndarray, labels: np.ndarray, usages: np.ndarray, *, icml: bool = False
) -> str:
    """CSV text of the rows: the original layout, or the icml_face_data layout."""
    lines = ["emotion, Usage, pixels" if icml else "emotion,pixels,Usage"]
    for image, label, usage in zip(images, labels, usages, strict=True):
        pixels = " ".join(map(str, np.asarray(image).reshape(-1).tolist()))
        lines.append(f"{label},{usage},{pixels}" if icml else f"{label},{pixels},{usage}")
    return "\n".join(lines) + "\n"


def write_fer2013(directory: str | pathlib.Path, text: str, layout: str = "csv") -> pathlib.Path:
    """Writes CSV `text` in `directory` under a layout's file name; returns the file's path.

    Args:
      layout: 'csv' (fer2013.csv), 'unpacked' (fer2013/fer2013.csv), 'tar.gz' (fer2013.tar.gz
        holding fer2013/fer2013.csv) or 'icml' (icml_face_data.csv; `text` should then come
        from `fer2013_csv_text(..., icml=True)`).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}, expected one of {LAYOUTS}")
    path = pathlib.Path(directory) / SOURCE_FILES[LAYOUTS.index(layout)]
    path.parent.mkdir(parents=True, exist_ok=True)
    if layout == "tar.gz":
        data = text.encode("utf-8")
        info = tarfile.TarInfo(ARCHIVE_MEMBER)
        info.size = len(data)
        with tarfile.open(path, "w:gz") as tar:
            tar.addfile(info, io.BytesIO(data))
    else:
        path.write_text(text, encoding="utf-8", newline="\n")
    return path


def write_jaffe_image(
    path: str | pathlib.Path, gray: np.ndarray, *, palette: bool = False
) -> pathlib.Path:
    """Writes a (H, W) uint8 image as TIFF: mode L, or mode P with a gray palette whose index i
    holds gray 255 - i (so reading it without the palette gives wrong pixels)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    gray = np.asarray(gray, dtype=np.uint8)
    if palette:
        image = Image.frombytes("P", gray.shape[::-1], (255 - gray).tobytes())
        image.putpalette([v for i in range(256) for v in (255 - i,) * 3])
    else:
        image = Image.fromarray(gray)
    image.save(path, format="TIFF")
    return path
