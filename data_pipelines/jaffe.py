"""TFDS builder `jaffe`: the 213 JAFFE photos as FER2013-like 48x48 faces (manual download only).

The examples are `files.jaffe_arrays`' (faces found and cropped by `faces.face_or_centre_crop`).
One split, train (213); cross-validation folds come from `folds.jaffe_folds`.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

from data_pipelines import files, jaffe_files, tf_cpu  # noqa: F401  (tf_cpu hides the GPUs)
from data_pipelines.labels import CLASS_NAMES

_DESCRIPTION = """\
JAFFE, the Japanese Female Facial Expression database (Lyons et al., 1998): 213 photos of 10
subjects posing 7 expressions (6 basic + neutral), preprocessed to 48x48 gray face crops like
FER2013, with FER2013's label codes.
"""

_CITATION = """\
@inproceedings{lyons1998coding,
  title={Coding Facial Expressions with Gabor Wavelets},
  author={Lyons, Michael and Akamatsu, Shigeru and Kamachi, Miyuki and Gyoba, Jiro},
  booktitle={Proceedings Third IEEE International Conference on Automatic Face and Gesture
             Recognition},
  pages={200--205},
  year={1998}
}
"""

MANUAL_DOWNLOAD_INSTRUCTIONS = jaffe_files.MANUAL_DOWNLOAD_INSTRUCTIONS


class Jaffe(tfds.core.GeneratorBasedBuilder):
    """JAFFE, 213 photos as 48x48 gray face crops, 7 expressions, 10 subjects."""

    VERSION = tfds.core.Version(files.TFDS_VERSIONS["jaffe"])
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=_DESCRIPTION,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(48, 48, 1)),
                    "label": tfds.features.ClassLabel(names=CLASS_NAMES),
                    "subject": tfds.features.Text(doc="two-letter subject id, e.g. KA"),
                    "filename": tfds.features.Text(doc="original file name"),
                    "face_detected": tfds.features.Scalar(
                        dtype=np.bool_, doc="False where the centre-crop fallback was used"
                    ),
                }
            ),
            supervised_keys=("image", "label"),
            disable_shuffling=True,  # Examples stay in file-name order.
            homepage="https://zenodo.org/record/3451524",
            citation=_CITATION,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        splits = files.builder_splits("jaffe", dl_manager)
        return {split: self._generate_examples(arrays) for split, arrays in splits.items()}

    def _generate_examples(self, arrays: dict[str, np.ndarray]):
        yield from files.examples(arrays, key="filename")
