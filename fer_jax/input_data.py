"""The arrays a run trains and evaluates on: built TFDS splits, or generated synthetic data."""

from __future__ import annotations

import os
from collections.abc import Sequence

import ml_collections
import numpy as np

from fer_jax import synthetic_data


def data_dir(config: ml_collections.ConfigDict) -> str:
    """`config.data_dir`, or TFDS's default `~/tensorflow_datasets`."""
    return os.path.expanduser(config.data_dir or "~/tensorflow_datasets")


def load_split_arrays(config: ml_collections.ConfigDict, split: str) -> dict[str, np.ndarray]:
    """All features of one split: 'image' (N, 48, 48, 1) uint8, 'label' (N,) int32, ...

    With `config.manual_dir` set, builds the dataset from those files first if needed.
    Raises FileNotFoundError (with the manual-download instructions) if it is not built.
    """
    if config.dataset == "synthetic":
        sizes = config.synthetic
        if split not in synthetic_data.SPLIT_SEEDS or split not in sizes:
            raise ValueError(f"synthetic data has no split {split!r}")
        return synthetic_data.make_split(
            sizes[split],
            seed=1000 * config.seed + synthetic_data.SPLIT_SEEDS[split],
            noise=sizes.noise,
        )
    import data_pipelines

    if config.manual_dir:
        data_pipelines.build(
            config.dataset,
            data_dir=data_dir(config),
            manual_dir=os.path.expanduser(config.manual_dir),
        )
    arrays = data_pipelines.load_split(config.dataset, split, data_dir(config))
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
