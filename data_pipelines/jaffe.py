"""TFDS builder `jaffe`: the 213 JAFFE photos as FER2013-like 48x48 faces (manual download only).

Each photo is read (palette TIFFs through their gray palette), its face found with OpenCV's Haar
cascade and cropped square with a margin, then resized to 48x48 (`faces`, `jaffe_files`); a
photo without a detected face gets the centre crop (`faces.centre_crop_face`), is marked
`face_detected=False`, and the build logs how many fell back. Labels use FER2013's 7 codes.
One split, train (213); cross-validation folds come from `folds.jaffe_folds`.
"""

from __future__ import annotations

import logging

import numpy as np
import tensorflow_datasets as tfds

from data_pipelines import jaffe_files
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

MANUAL_DOWNLOAD_INSTRUCTIONS = """\
JAFFE cannot be downloaded automatically and may not be redistributed. Request it from its
authors (https://zenodo.org/record/3451524, formerly http://www.kasrl.org/jaffe.html) and unpack
it in the manual directory (`--manual_dir`, default <data_dir>/downloads/manual/) so that the 213
TIFF files named like KA.AN1.39.tiff lie there, directly or in a subfolder (the distribution
unpacks to jaffedbase/). Other files (README, rating tables, .DS_Store) are ignored.
"""

_log = logging.getLogger(__name__)


class Jaffe(tfds.core.GeneratorBasedBuilder):
    """JAFFE, 213 photos as 48x48 gray face crops, 7 expressions, 10 subjects."""

    VERSION = tfds.core.Version("1.0.0")
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
        try:
            items = jaffe_files.list_images(dl_manager.manual_dir)
        except (AssertionError, FileNotFoundError) as e:
            raise FileNotFoundError(f"{e}\n\n{MANUAL_DOWNLOAD_INSTRUCTIONS}") from e
        return {"train": self._generate_examples(items)}

    def _generate_examples(self, items: list[jaffe_files.JaffeFile]):
        fallbacks = []
        for item in items:
            face, found = jaffe_files.preprocess(jaffe_files.read_gray(item.path))
            if not found:
                fallbacks.append(item.path.name)
            yield (
                item.path.name,
                {
                    "image": face[:, :, None],
                    "label": item.label,
                    "subject": item.subject,
                    "filename": item.path.name,
                    "face_detected": found,
                },
            )
        if fallbacks:
            _log.warning(
                "JAFFE: no face detected in %d of %d images, used the centre crop: %s",
                len(fallbacks),
                len(items),
                ", ".join(fallbacks),
            )
        else:
            _log.info("JAFFE: a face was detected in each of the %d images", len(items))
