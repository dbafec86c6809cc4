"""FER2013 and JAFFE splits read straight from the publishers' files (numpy only, no TensorFlow).

`load_split_from_files` returns exactly the arrays `loading.load_split` returns after the TFDS
builders have built a data_dir from the same files: the builders make their examples from these
arrays (`examples`). Each source is parsed once per process, cached by path, size and
modification time (an edited or replaced file is read again).
"""

from __future__ import annotations

import logging
import os
import pathlib
from collections.abc import Callable, Hashable, Iterator
from typing import Any, TypeVar

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
_T = TypeVar("_T")
# (kind, resolved path) -> (stamp of the files read, what was read from them).
_cache: dict[tuple[str, str], tuple[Hashable, Any]] = {}


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
        return fer2013_split_arrays(_read_fer2013(manual_dir), split)
    return {k: v.copy() for k, v in _read_jaffe(manual_dir).items()}


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


def _read_fer2013(manual_dir: str | os.PathLike) -> fer2013_csv.Fer2013Rows:
    try:
        source = fer2013_csv.find_source(manual_dir)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e}\n\n{fer2013_csv.MANUAL_DOWNLOAD_INSTRUCTIONS}") from None
    return _cached("fer2013", source, _stamp([source]), lambda: fer2013_csv.read_fer2013(source))


def _read_jaffe(manual_dir: str | os.PathLike) -> dict[str, np.ndarray]:
    try:
        items = jaffe_files.list_images(manual_dir)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e}\n\n{jaffe_files.MANUAL_DOWNLOAD_INSTRUCTIONS}") from None
    stamp = _stamp([item.path for item in items])
    return _cached("jaffe", pathlib.Path(manual_dir), stamp, lambda: jaffe_arrays(items))


def _stamp(paths: list[pathlib.Path]) -> Hashable:
    """(path, size, mtime in ns) of each file: changes when any file is edited or replaced."""
    return tuple((str(p), (s := p.stat()).st_size, s.st_mtime_ns) for p in paths)


def _cached(kind: str, path: pathlib.Path, stamp: Hashable, read: Callable[[], _T]) -> _T:
    """`read()`, or what it returned before for the same (kind, path) and stamp."""
    key = (kind, str(path.resolve()))
    hit = _cache.get(key)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    value = read()
    _cache[key] = (stamp, value)
    return value
