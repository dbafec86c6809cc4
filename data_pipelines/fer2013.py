"""TFDS builder `fer2013`: FER2013 from a manually downloaded file (nothing is ever downloaded).

Build with `tfds build fer2013 --imports=data_pipelines --manual_dir=DIR --data_dir=DATA` or
`tfds.builder('fer2013', data_dir=DATA).download_and_prepare(download_config=
tfds.download.DownloadConfig(manual_dir=DIR))`; DIR holds one of the files listed in
`fer2013_csv.SOURCE_FILES`. Splits: train (Usage Training, 28,709), public_test (PublicTest,
3,589), private_test (PrivateTest, 3,589).
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

from data_pipelines import fer2013_csv, files, tf_cpu  # noqa: F401  (tf_cpu hides the GPUs)
from data_pipelines.labels import CLASS_NAMES

_DESCRIPTION = """\
FER2013 (Goodfellow et al., ICML 2013 workshop "Challenges in Representation Learning"):
35,887 48x48 grayscale face images labelled with one of 7 expressions. Splits follow the CSV's
Usage column: train (Training), public_test (PublicTest), private_test (PrivateTest). The
literature selects models on public_test and reports private_test.
"""

_CITATION = """\
@inproceedings{goodfellow2013challenges,
  title={Challenges in Representation Learning: A Report on Three Machine Learning Contests},
  author={Goodfellow, Ian J. and Erhan, Dumitru and Carrier, Pierre Luc and Courville, Aaron
          and Mirza, Mehdi and Hamner, Ben and others},
  booktitle={Neural Information Processing (ICONIP)},
  pages={117--124},
  year={2013}
}
"""

MANUAL_DOWNLOAD_INSTRUCTIONS = fer2013_csv.MANUAL_DOWNLOAD_INSTRUCTIONS


class Fer2013(tfds.core.GeneratorBasedBuilder):
    """FER2013, 48x48 gray faces, 7 expressions, from a manually downloaded CSV or archive."""

    VERSION = tfds.core.Version(files.TFDS_VERSIONS["fer2013"])
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS

    def _info(self) -> tfds.core.DatasetInfo:
        size = fer2013_csv.IMAGE_SIZE
        return tfds.core.DatasetInfo(
            builder=self,
            description=_DESCRIPTION,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(size, size, 1), dtype=np.uint8),
                    "label": tfds.features.ClassLabel(names=CLASS_NAMES),
                    "index": tfds.features.Scalar(
                        dtype=np.int64, doc="0-based data row of the original CSV"
                    ),
                }
            ),
            supervised_keys=("image", "label"),
            disable_shuffling=True,  # Examples stay in CSV row order.
            homepage="https://www.kaggle.com/c/challenges-in-representation-learning-facial-expression-recognition-challenge",
            citation=_CITATION,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        splits = files.builder_splits("fer2013", dl_manager)
        return {split: self._generate_examples(arrays) for split, arrays in splits.items()}

    def _generate_examples(self, arrays: dict[str, np.ndarray]):
        yield from files.examples(arrays, key="index")
