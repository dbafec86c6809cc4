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

from data_pipelines import fer2013_csv
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

MANUAL_DOWNLOAD_INSTRUCTIONS = """\
FER2013 cannot be downloaded automatically. Get it from Kaggle's "Challenges in Representation
Learning: Facial Expression Recognition Challenge"
(https://www.kaggle.com/c/challenges-in-representation-learning-facial-expression-recognition-challenge/data)
and put ONE of these files directly in the manual directory (`--manual_dir`, default
<data_dir>/downloads/manual/):
  fer2013.tar.gz          the original archive (holds fer2013/fer2013.csv; read in place)
  fer2013.csv             the original CSV (columns emotion,pixels,Usage), or
  fer2013/fer2013.csv     the same, from unpacking fer2013.tar.gz there
  icml_face_data.csv      the later CSV (columns emotion, Usage, pixels)
"""


class Fer2013(tfds.core.GeneratorBasedBuilder):
    """FER2013, 48x48 gray faces, 7 expressions, from a manually downloaded CSV or archive."""

    VERSION = tfds.core.Version("1.0.0")
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
        try:
            manual_dir = dl_manager.manual_dir
            source = fer2013_csv.find_source(manual_dir)
        except (AssertionError, FileNotFoundError) as e:
            raise FileNotFoundError(f"{e}\n\n{MANUAL_DOWNLOAD_INSTRUCTIONS}") from e
        rows = fer2013_csv.read_fer2013(source)
        return {
            split: self._generate_examples(rows, split)
            for split in fer2013_csv.USAGE_SPLITS.values()
        }

    def _generate_examples(self, rows: fer2013_csv.Fer2013Rows, split: str):
        for i in np.flatnonzero(rows.splits == split):
            yield (
                int(i),
                {"image": rows.images[i, :, :, None], "label": int(rows.labels[i]), "index": i},
            )
