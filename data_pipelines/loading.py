"""Building the TFDS datasets, loading whole splits into memory, pipelines over built splits.

Importing this module registers the TFDS builders `fer2013` and `jaffe` and hides the GPUs from
TensorFlow (`tf_cpu`).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from data_pipelines import builders  # noqa: F401  (registers the TFDS builders)
from data_pipelines.pipelines import eval_dataset_from_arrays, train_dataset_from_arrays
from data_pipelines.tf_cpu import tf

# Dataset -> the fer_jax.main flags that read its downloaded files without building anything.
FILES_SOURCE_FLAGS = {
    "fer2013": "--config.data_source=files --config.manual_dir=/path/to/dir_with_fer2013.csv",
    "jaffe": "--config.data_source=files --config.jaffe.manual_dir=/path/to/jaffedbase "
    "(with configs/jaffe.py: --config.manual_dir)",
}


def build(name: str, *, data_dir: str | os.PathLike, manual_dir: str | os.PathLike) -> None:
    """Builds dataset `name` ('fer2013' or 'jaffe') into data_dir from the files in manual_dir,
    as `tfds build NAME --imports=data_pipelines` does; a no-op if it is already built."""
    config = tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir))
    tfds.builder(name, data_dir=os.fspath(data_dir)).download_and_prepare(download_config=config)


def load_split(name: str, split: str, data_dir: str | os.PathLike) -> dict[str, np.ndarray]:
    """Loads a built split (or any TFDS split expression, e.g. 'train[:100]') of `name` from
    `data_dir` into memory: the same arrays as `files.load_split_from_files` on the files it
    was built from. FileNotFoundError (with the build command and the manual download
    instructions) where it is not built.
    """
    builder = tfds.builder(name, data_dir=os.fspath(data_dir))
    if not builder.is_prepared():
        raise FileNotFoundError(
            f"dataset {name!r} is not built in {data_dir} (expected {builder.data_path}); read "
            f"the downloaded files directly: {FILES_SOURCE_FLAGS.get(name, '')} (or keep "
            "data_source 'tfds' and pass the same manual_dir: it is built on first use; "
            f"the tfds command line also needs apache-beam: tfds build {name} "
            f"--imports=data_pipelines --manual_dir=<MANUAL_DIR> --data_dir={data_dir})\n\n"
            f"{builder.MANUAL_DOWNLOAD_INSTRUCTIONS}"
        )
    ds = builder.as_dataset(split=split, batch_size=-1, shuffle_files=False)
    arrays = tfds.as_numpy(ds)
    return {
        k: np.array([s.decode("utf-8") for s in v]) if v.dtype == object else v
        for k, v in arrays.items()
    }


def load_arrays(
    name: str, split: str, data_dir: str | os.PathLike, indices: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 48, 48, 1) uint8, labels (N,) int32) of a built split (or of its examples
    `indices`, in that order); see `load_split`."""
    arrays = load_split(name, split, data_dir)
    images, labels = arrays["image"], arrays["label"].astype(np.int32)
    if indices is not None:
        images, labels = images[np.asarray(indices)], labels[np.asarray(indices)]
    return images, labels


def train_dataset(
    data_dir: str | os.PathLike,
    split: str = "train",
    *,
    dataset_name: str = "fer2013",
    indices: np.ndarray | None = None,
    **options: Any,
) -> tf.data.Dataset:
    """`train_dataset_from_arrays(**options)` on a built split (or its examples `indices`;
    'index' then counts positions in `indices`)."""
    images, labels = load_arrays(dataset_name, split, data_dir, indices)
    return train_dataset_from_arrays(images, labels, **options)


def eval_dataset(
    data_dir: str | os.PathLike,
    split: str,
    *,
    dataset_name: str = "fer2013",
    indices: np.ndarray | None = None,
    **options: Any,
) -> tf.data.Dataset:
    """`eval_dataset_from_arrays(**options)` on a built split (or its examples `indices`, in
    that order)."""
    images, labels = load_arrays(dataset_name, split, data_dir, indices)
    return eval_dataset_from_arrays(images, labels, **options)
