"""The arrays a run trains and evaluates on: TFDS splits, the downloaded files, or synthetic data.

`config.data_source` picks where FER2013/JAFFE come from: 'tfds' (the default) builds the TFDS
dataset into `config.data_dir` from `config.manual_dir` if needed and loads it (TensorFlow and
TFDS); 'files' reads the publisher's files in `config.manual_dir` directly (no TensorFlow;
`data_pipelines.files`). Both give the same arrays. `config.dataset == 'synthetic'` generates
the data instead.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import ml_collections
import numpy as np

from data_pipelines import files
from fer_jax.training import synthetic_data

DATA_SOURCES = ("tfds", "files")  # values of config.data_source


def data_dir(config: ml_collections.ConfigDict) -> str:
    """`config.data_dir`, or TFDS's default `~/tensorflow_datasets`."""
    return os.path.expanduser(config.data_dir or "~/tensorflow_datasets")


def data_source(config: ml_collections.ConfigDict) -> str:
    """`config.data_source` ('tfds' if the config predates the field)."""
    return config.get("data_source", "tfds")


def load_split_arrays(config: ml_collections.ConfigDict, split: str) -> dict[str, np.ndarray]:
    """All features of one split: 'image' (N, 48, 48, 1) uint8, 'label' (N,) int32, ...; with
    'tfds', built from `config.manual_dir` first if needed (FileNotFoundError if it cannot be)."""
    source = data_source(config)
    if config.dataset == "synthetic":
        sizes = config.synthetic
        return synthetic_data.make_split(
            sizes[split],
            seed=1000 * config.seed + synthetic_data.SPLIT_SEEDS[split],
            noise=sizes.noise,
        )
    if source == "files":
        if not config.manual_dir:
            raise ValueError(
                "config.manual_dir is empty; config.data_source='files' reads the downloaded "
                f"{config.dataset} files from that directory"
            )
        arrays = files.load_split_from_files(
            config.dataset, split, os.path.expanduser(config.manual_dir)
        )
    else:
        from data_pipelines import loading  # TensorFlow and TFDS only here.

        if config.manual_dir:
            loading.build(
                config.dataset,
                data_dir=data_dir(config),
                manual_dir=os.path.expanduser(config.manual_dir),
            )
        arrays = loading.load_split(config.dataset, split, data_dir(config))
    arrays["label"] = arrays["label"].astype(np.int32)
    return arrays


def load_splits(
    config: ml_collections.ConfigDict, splits: Sequence[str]
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """`{split: (images, labels)}` for each distinct split name."""
    out = {}
    for split in dict.fromkeys(splits):
        arrays = load_split_arrays(config, split)
        out[split] = (arrays["image"], arrays["label"])
    return out
