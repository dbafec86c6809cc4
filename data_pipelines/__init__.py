"""FER2013 and JAFFE as TFDS datasets, and the tf.data pipelines that feed training/evaluation.

Importing this package registers the TFDS builders `fer2013` and `jaffe` and hides every GPU
from TensorFlow (JAX owns the accelerator; tf.data runs on the CPU).

Typical use:

    images, labels = data_pipelines.load_arrays('fer2013', 'train', data_dir)
    ds = data_pipelines.train_dataset_from_arrays(images, labels, batch_size=128, seed=0)
    for batch in ds.as_numpy_iterator():  # {'image': (128, 44, 44, 1) float32, 'label': ...}
        ...
"""

from __future__ import annotations

import logging

import tensorflow as tf

from data_pipelines import fer2013, jaffe  # noqa: F401  (registers the TFDS builders)
from data_pipelines.crops import CROP_SIZE, five_crop_offsets, ten_crop
from data_pipelines.errors import DataError
from data_pipelines.faces import centre_crop_face, crop_face, detect_faces, face_or_centre_crop
from data_pipelines.folds import jaffe_folds
from data_pipelines.labels import CLASS_NAMES, NUM_CLASSES
from data_pipelines.loading import build, eval_dataset, load_arrays, load_split, train_dataset
from data_pipelines.pipelines import (
    epoch_plan,
    eval_dataset_from_arrays,
    eval_steps,
    steps_per_epoch,
    train_dataset_from_arrays,
)


def _hide_gpus_from_tensorflow() -> None:
    try:
        tf.config.set_visible_devices([], "GPU")
    except (RuntimeError, ValueError) as e:  # Devices already initialised.
        logging.getLogger(__name__).warning("Could not hide GPUs from TensorFlow: %s", e)


_hide_gpus_from_tensorflow()


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
    "steps_per_epoch",
    "ten_crop",
    "train_dataset",
    "train_dataset_from_arrays",
]
