"""FER2013 and JAFFE splits read straight from the publishers' files (numpy only, no TensorFlow).

`load_split_from_files` returns exactly the arrays `loading.load_split` returns after the TFDS
builders have built a data_dir from the same files: the builders make their examples from these
arrays (`examples`). Each source is parsed once per process, cached by path, size and
modification time (an edited or replaced file is read again).
"""

from __future__ import annotations

import functools
import logging
import os
import pathlib
from collections.abc import Iterator
from typing import Any

import numpy as np

from data_pipelines import faces, fer2013_csv, jaffe_files

# Dataset -> its split names, in the builders' order.
SPLITS: dict[str, tuple[str, ...]] = {
    "fer2013": tuple(fer2013_csv.USAGE_SPLITS.values()),
    "jaffe": ("train",),
}
# Dataset -> the version of its TFDS builder: a built dataset lives in
# <data_dir>/<name>/<version>/ (`fer_jax.training.data_check` looks there without importing TFDS).
TFDS_VERSIONS: dict[str, str] = {"fer2013": "1.0.0", "jaffe": "1.0.0"}

_log = logging.getLogger(__name__)


def load_split_from_files(
    name: str, split: str, manual_dir: str | os.PathLike
) -> dict[str, np.ndarray]:
    """Split `split` of `name` ('fer2013' or 'jaffe', `SPLITS`) read from the publisher's files
    in `manual_dir`, in source order: as `fer2013_split_arrays` or `jaffe_arrays` give them (the
    caller's own copies). FileNotFoundError (with the download instructions) where there are
    none; DataError for a malformed file."""
    if name not in SPLITS:
        raise ValueError(f"unknown dataset {name!r}, expected one of {', '.join(SPLITS)}")
    if split not in SPLITS[name]:
        raise ValueError(f"{name} has no split {split!r}; its splits are {', '.join(SPLITS[name])}")
    if name == "fer2013":
        return fer2013_split_arrays(_read(name, manual_dir), split)
    return {k: v.copy() for k, v in _read(name, manual_dir).items()}


def fer2013_split_arrays(rows: fer2013_csv.Fer2013Rows, split: str) -> dict[str, np.ndarray]:
    """The rows of one split as the builder's features: 'image' (N, 48, 48, 1) uint8, 'label'
    (N,) int64, 'index' (N,) int64 (the data row of each), in CSV row order."""
    index = np.flatnonzero(rows.splits == split).astype(np.int64)
    return {"image": rows.images[index, :, :, None], "label": rows.labels[index], "index": index}


def jaffe_arrays(items: list[jaffe_files.JaffeFile]) -> dict[str, np.ndarray]:
    """The JAFFE photos as the builder's features, in the order of `items`: 'image'
    (N, 48, 48, 1) uint8 (each face, else the centre: `faces.face_or_centre_crop`; a warning names
    the photos without a face), 'label' (N,) int64, 'subject' and 'filename' (N,) str,
    'face_detected' (N,) bool."""
    crops, found, fallbacks = [], [], []
    for item in items:
        face, detected = faces.face_or_centre_crop(jaffe_files.read_gray(item.path))
        crops.append(face)
        found.append(detected)
        if not detected:
            fallbacks.append(item.path.name)
    if fallbacks:
        _log.warning(
            "JAFFE: no face detected in %d of %d images, used the centre crop: %s",
            len(fallbacks),
            len(items),
            ", ".join(fallbacks),
        )
    else:
        _log.info("JAFFE: a face was detected in each of the %d images", len(items))
    return {
        "image": np.stack(crops)[..., None],
        "label": np.asarray([item.label for item in items], dtype=np.int64),
        "subject": np.asarray([item.subject for item in items]),
        "filename": np.asarray([item.path.name for item in items]),
        "face_detected": np.asarray(found, dtype=bool),
    }


def builder_splits(name: str, dl_manager: Any) -> dict[str, dict[str, np.ndarray]]:
    """Every split of the TFDS builder `name`, read from the files in `dl_manager.manual_dir`."""
    try:
        manual_dir = dl_manager.manual_dir
    except AssertionError as e:  # TFDS: missing or empty; the message has the instructions.
        raise FileNotFoundError(str(e)) from e
    return {split: load_split_from_files(name, split, manual_dir) for split in SPLITS[name]}


def examples(arrays: dict[str, np.ndarray], key: str) -> Iterator[tuple[Any, dict[str, Any]]]:
    """A split's arrays as TFDS `(key, example)` pairs, in order; the key is feature `key`."""
    for i, k in enumerate(arrays[key].tolist()):
        yield k, {name: values[i] for name, values in arrays.items()}


def _read(name: str, manual_dir: str | os.PathLike) -> Any:
    """The parsed source of dataset `name` in `manual_dir`: FER2013's rows, JAFFE's arrays."""
    try:
        if name == "fer2013":
            paths = [fer2013_csv.find_source(manual_dir)]
        else:
            paths = [item.path for item in jaffe_files.list_images(manual_dir)]
    except FileNotFoundError as e:
        module = fer2013_csv if name == "fer2013" else jaffe_files
        raise FileNotFoundError(f"{e}\n\n{module.MANUAL_DOWNLOAD_INSTRUCTIONS}") from None
    # (path, size, mtime in ns) of each file: changes when any file is edited or replaced.
    stamp = tuple((str(p), (s := p.stat()).st_size, s.st_mtime_ns) for p in paths)
    return _parse(name, stamp)


@functools.lru_cache(maxsize=2)
def _parse(name: str, stamp: tuple[tuple[str, int, int], ...]) -> Any:
    """`_read`'s parse of the files of `stamp`, once per process while they are unchanged."""
    paths = [pathlib.Path(path) for path, _, _ in stamp]
    if name == "fer2013":
        return fer2013_csv.read_fer2013(paths[0])
    return jaffe_arrays([jaffe_files.parse_filename(path) for path in paths])
