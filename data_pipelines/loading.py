"""The TFDS side: the builders `fer2013` and `jaffe` (from manually downloaded files; nothing is
ever downloaded), building them, loading whole splits into memory, pipelines over built splits.
Importing this module registers the builders and hides the GPUs from TensorFlow (`tf_cpu`).

Build with `tfds build fer2013 --imports=data_pipelines --manual_dir=DIR --data_dir=DATA`,
`build('fer2013', data_dir=DATA, manual_dir=DIR)` (the same for `jaffe`). The examples are
`files.load_split_from_files`' arrays, in source order:

- `fer2013`: DIR holds one of the files listed in `fer2013_csv.SOURCE_FILES`. Splits: train
  (Usage Training, 28,709), public_test (PublicTest, 3,589), private_test (PrivateTest, 3,589).
- `jaffe`: the 213 JAFFE photos as FER2013-like 48x48 faces (`files.jaffe_arrays`: faces found
  and cropped by `faces.face_or_centre_crop`). One split, train (213); cross-validation folds
  come from `folds.jaffe_folds`.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from data_pipelines import fer2013_csv, files, jaffe_files
from data_pipelines.labels import CLASS_NAMES
from data_pipelines.pipelines import eval_dataset_from_arrays, train_dataset_from_arrays
from data_pipelines.tf_cpu import tf  # hides the GPUs from TensorFlow

# Dataset -> the fer_jax.main flags that read its downloaded files without building anything.
FILES_SOURCE_FLAGS = {
    "fer2013": "--config.data_source=files --config.manual_dir=/path/to/dir_with_fer2013.csv",
    "jaffe": "--config.data_source=files --config.jaffe.manual_dir=/path/to/jaffedbase "
    "(with configs/jaffe.py: --config.manual_dir)",
}


class _FromFiles(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A builder of `files.builder_splits`: each example keyed by its feature `KEY`; the
    description, homepage, citation and features of `_info` are the subclass's."""

    RELEASE_NOTES = {"1.0.0": "Initial release."}
    KEY = ""
    DESCRIPTION = HOMEPAGE = CITATION = ""

    def _features(self) -> dict[str, Any]:
        raise NotImplementedError

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.DESCRIPTION,
            features=tfds.features.FeaturesDict(self._features()),
            supervised_keys=("image", "label"),
            disable_shuffling=True,  # Examples stay in source order.
            homepage=self.HOMEPAGE,
            citation=self.CITATION,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        splits = files.builder_splits(self.name, dl_manager)
        return {split: self._generate_examples(arrays) for split, arrays in splits.items()}

    def _generate_examples(self, arrays: dict[str, np.ndarray]):
        yield from files.examples(arrays, key=self.KEY)


class Fer2013(_FromFiles):
    """FER2013, 48x48 gray faces, 7 expressions, from a manually downloaded CSV or archive."""

    VERSION = tfds.core.Version(files.TFDS_VERSIONS["fer2013"])
    MANUAL_DOWNLOAD_INSTRUCTIONS = fer2013_csv.MANUAL_DOWNLOAD_INSTRUCTIONS
    KEY = "index"
    HOMEPAGE = "https://www.kaggle.com/c/challenges-in-representation-learning-facial-expression-recognition-challenge"
    DESCRIPTION = """\
FER2013 (Goodfellow et al., ICML 2013 workshop "Challenges in Representation Learning"):
35,887 48x48 grayscale face images labelled with one of 7 expressions. Splits follow the CSV's
Usage column: train (Training), public_test (PublicTest), private_test (PrivateTest). The
literature selects models on public_test and reports private_test.
"""
    CITATION = """\
@inproceedings{goodfellow2013challenges,
  title={Challenges in Representation Learning: A Report on Three Machine Learning Contests},
  author={Goodfellow, Ian J. and Erhan, Dumitru and Carrier, Pierre Luc and Courville, Aaron
          and Mirza, Mehdi and Hamner, Ben and others},
  booktitle={Neural Information Processing (ICONIP)},
  pages={117--124},
  year={2013}
}
"""

    def _features(self) -> dict[str, Any]:
        size = fer2013_csv.IMAGE_SIZE
        return {
            "image": tfds.features.Image(shape=(size, size, 1), dtype=np.uint8),
            "label": tfds.features.ClassLabel(names=CLASS_NAMES),
            "index": tfds.features.Scalar(
                dtype=np.int64, doc="0-based data row of the original CSV"
            ),
        }


class Jaffe(_FromFiles):
    """JAFFE, 213 photos as 48x48 gray face crops, 7 expressions, 10 subjects."""

    VERSION = tfds.core.Version(files.TFDS_VERSIONS["jaffe"])
    MANUAL_DOWNLOAD_INSTRUCTIONS = jaffe_files.MANUAL_DOWNLOAD_INSTRUCTIONS
    KEY = "filename"
    HOMEPAGE = "https://zenodo.org/record/3451524"
    DESCRIPTION = """\
JAFFE, the Japanese Female Facial Expression database (Lyons et al., 1998): 213 photos of 10
subjects posing 7 expressions (6 basic + neutral), preprocessed to 48x48 gray face crops like
FER2013, with FER2013's label codes.
"""
    CITATION = """\
@inproceedings{lyons1998coding,
  title={Coding Facial Expressions with Gabor Wavelets},
  author={Lyons, Michael and Akamatsu, Shigeru and Kamachi, Miyuki and Gyoba, Jiro},
  booktitle={Proceedings Third IEEE International Conference on Automatic Face and Gesture
             Recognition},
  pages={200--205},
  year={1998}
}
"""

    def _features(self) -> dict[str, Any]:
        return {
            "image": tfds.features.Image(shape=(48, 48, 1)),
            "label": tfds.features.ClassLabel(names=CLASS_NAMES),
            "subject": tfds.features.Text(doc="two-letter subject id, e.g. KA"),
            "filename": tfds.features.Text(doc="original file name"),
            "face_detected": tfds.features.Scalar(
                dtype=np.bool_, doc="False where the centre-crop fallback was used"
            ),
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
