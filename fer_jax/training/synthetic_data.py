"""A small generated dataset that a tiny network learns in seconds (no downloads needed).

Class k of 7 is a bright horizontal band centred on row `6 + 6k` of a 48x48 image, on a
random dark background with Gaussian noise. Bands are invariant under horizontal flips and
survive the 0..4 pixel random crops, so the training augmentation keeps the labels valid.
Images are uint8 `(N, 48, 48, 1)`, like FER2013; each example also gets one of 10 "subjects".
"""

from __future__ import annotations

import numpy as np

NUM_CLASSES = 7
NUM_SUBJECTS = 10
SPLIT_SEEDS = {"train": 0, "public_test": 1, "private_test": 2}


def make_split(num_examples: int, *, seed: int, noise: float = 0.25) -> dict[str, np.ndarray]:
    """`{'image': (N, 48, 48, 1) uint8, 'label': (N,) int32, 'subject': (N,) str}`.

    Labels cycle through the classes (balanced); `noise` is the Gaussian std in [0, 1] units.
    """
    rng = np.random.default_rng(seed)
    labels = (np.arange(num_examples) % NUM_CLASSES).astype(np.int32)
    rng.shuffle(labels)
    rows = np.arange(48)[None, :, None]
    centre = (6 + 6 * labels)[:, None, None] + rng.integers(-1, 2, size=(num_examples, 1, 1))
    band = np.exp(-0.5 * ((rows - centre) / 2.0) ** 2)  # (N, 48, 1)
    background = rng.uniform(0.1, 0.3, size=(num_examples, 1, 1))
    images = background + 0.6 * band + noise * rng.normal(size=(num_examples, 48, 48))
    images = np.clip(np.rint(images * 255), 0, 255).astype(np.uint8)[..., None]
    subjects = np.array([f"S{i % NUM_SUBJECTS}" for i in range(num_examples)])
    return {"image": images, "label": labels, "subject": subjects}
