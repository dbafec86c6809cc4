"""`config.data_source`: 'tfds' and 'files' give a run the same arrays; bad settings are errors."""

from __future__ import annotations

import numpy as np
import pytest

from configs import fer2013 as fer2013_config
from data_pipelines import synthetic
from fer_jax.training import config_schema, input_data
from fer_jax.user_errors import UserError

ROWS = synthetic.fer2013_rows((6, 3, 2), seed=4)
SPLITS = ["train", "public_test", "private_test"]


@pytest.fixture(scope="module")
def manual_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("manual")
    text = synthetic.fer2013_csv_text(ROWS["images"], ROWS["labels"], ROWS["usages"])
    synthetic.write_fer2013(directory, text, "tar.gz")
    return directory


def _config(**fields):
    config = fer2013_config.get_config()
    config.update(fields)
    return config


def test_files_and_tfds_sources_give_the_same_splits(manual_dir, tmp_path):
    from_files = input_data.load_splits(
        _config(data_source="files", manual_dir=str(manual_dir)), SPLITS
    )
    from_tfds = input_data.load_splits(
        _config(data_source="tfds", manual_dir=str(manual_dir), data_dir=str(tmp_path)), SPLITS
    )
    for split, usage in zip(SPLITS, synthetic.USAGES, strict=True):
        (images, labels), (tfds_images, tfds_labels) = from_files[split], from_tfds[split]
        assert images.dtype == np.uint8 and labels.dtype == tfds_labels.dtype == np.int32
        np.testing.assert_array_equal(images, tfds_images)
        np.testing.assert_array_equal(labels, tfds_labels)
        np.testing.assert_array_equal(labels, ROWS["labels"][ROWS["usages"] == usage])


def test_unknown_data_source_is_an_error_naming_field_value_and_choices():
    with pytest.raises(UserError) as e:
        config_schema.validate(_config(data_source="csv"))
    assert str(e.value) == "config.data_source is 'csv'; allowed: one of 'tfds', 'files'"


def test_files_source_without_manual_dir_is_an_error_naming_it():
    with pytest.raises(ValueError, match=r"config.manual_dir is empty; config.data_source='files'"):
        input_data.load_split_arrays(_config(data_source="files"), "train")


def test_files_source_names_the_manual_dir_when_the_files_are_missing(tmp_path):
    config = _config(data_source="files", manual_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match=f"No FER2013 file in {tmp_path}"):
        input_data.load_split_arrays(config, "train")


def test_configs_without_data_source_use_tfds(tmp_path):
    config = _config(data_dir=str(tmp_path))
    del config["data_source"]
    assert input_data.data_source(config) == "tfds"
    with pytest.raises(FileNotFoundError, match="is not built"):
        input_data.load_split_arrays(config, "train")
