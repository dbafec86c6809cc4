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

# JAFFE file-name expression code -> class code in CLASS_NAMES (the codes in that order).
JAFFE_EXPRESSION_CODES: dict[str, int] = {
    code: label for label, code in enumerate(("AN", "DI", "FE", "HA", "SA", "SU", "NE"))
}
