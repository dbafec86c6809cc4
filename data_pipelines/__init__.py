"""FER2013 and JAFFE: reading the publishers' files, TFDS builders, and the input pipelines.

`import data_pipelines` imports no TensorFlow: the numpy side (`load_split_from_files`, face
crops, ten crops, folds, epoch plans) comes with it; the TensorFlow side (`loading`'s and
`pipelines`' names, `_LAZY`) is imported on first use and hides every GPU from TensorFlow
(`tf_cpu`). Importing this package once `tensorflow_datasets` is imported registers the TFDS
builders `fer2013` and `jaffe` (`tfds build fer2013 --imports=data_pipelines`). Use: docs/data.md.
"""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING, Any

from data_pipelines.crops import CROP_SIZE, five_crop_offsets, ten_crop
from data_pipelines.errors import DataError
from data_pipelines.faces import centre_crop_face, crop_face, detect_faces, face_or_centre_crop
from data_pipelines.files import load_split_from_files
from data_pipelines.folds import jaffe_folds
from data_pipelines.labels import CLASS_NAMES, NUM_CLASSES
from data_pipelines.plan import epoch_plan, eval_steps, steps_per_epoch

if TYPE_CHECKING:
    from data_pipelines.loading import (
        build,
        eval_dataset,
        load_arrays,
        load_split,
        train_dataset,
    )
    from data_pipelines.pipelines import eval_dataset_from_arrays, train_dataset_from_arrays

# The submodules (which import TensorFlow) -> the names they define; imported on first access.
_LAZY_MODULES = {
    "loading": ("build", "eval_dataset", "load_arrays", "load_split", "train_dataset"),
    "pipelines": ("eval_dataset_from_arrays", "train_dataset_from_arrays"),
}
_LAZY = {name: module for module, names in _LAZY_MODULES.items() for name in names}


def __getattr__(name: str) -> Any:
    """PEP 562: the TensorFlow-dependent names, imported on first access."""
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


# e.g. `tfds build fer2013 --imports=data_pipelines` (None: a blocked import).
if sys.modules.get("tensorflow_datasets") is not None:
    from data_pipelines import loading  # noqa: F401  (registers the TFDS builders)


__all__ = [
    "CLASS_NAMES",
    "CROP_SIZE",
    "NUM_CLASSES",
    "DataError",
    "build",
    "centre_crop_face",
    "crop_face",
    "detect_faces",
    "epoch_plan",
    "eval_dataset",
    "eval_dataset_from_arrays",
    "eval_steps",
    "face_or_centre_crop",
    "five_crop_offsets",
    "jaffe_folds",
    "load_arrays",
    "load_split",
    "load_split_from_files",
    "steps_per_epoch",
    "ten_crop",
    "train_dataset",
    "train_dataset_from_arrays",
]
