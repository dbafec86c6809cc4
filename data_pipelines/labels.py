"""Expression class names shared by every dataset in this package.

FER2013's label codes define the order: 0 angry, 1 disgust, 2 fear, 3 happy, 4 sad, 5 surprise,
6 neutral. JAFFE's two-letter expression codes map onto the same codes, so a classifier trained
on FER2013 can be fine-tuned and evaluated on JAFFE without remapping.
"""

from __future__ import annotations

CLASS_NAMES: tuple[str, ...] = (
    "angry",
    "disgust",
    "fear",
    "happy",
    "sad",
    "surprise",
    "neutral",
)
NUM_CLASSES: int = len(CLASS_NAMES)

# JAFFE file-name expression code -> class code in CLASS_NAMES.
JAFFE_EXPRESSION_CODES: dict[str, int] = {
    "AN": 0,
    "DI": 1,
    "FE": 2,
    "HA": 3,
    "SA": 4,
    "SU": 5,
    "NE": 6,
}
