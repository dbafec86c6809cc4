"""The real FER2013 builds with the exact per-split, per-class counts, and the files source gives
the same arrays (not in the default run).

Run with `python3 -m pytest -m real_data tests/test_data_real_fer2013.py -s`. The data comes from
$FER2013_DIR (a directory holding fer2013.csv, fer2013.tar.gz or icml_face_data.csv, or the
compact fer2013-compact.bin.xz), else from <repo>/../shared/data/fer2013/fer2013-compact.bin.xz,
restored to a CSV with the restore_csv.py next to it (about 20 s); skipped when neither exists.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import time

import numpy as np
import pytest

import data_pipelines
from data_pipelines import fer2013_csv, files

COMPACT = "fer2013-compact.bin.xz"
SHARED = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data" / "fer2013"
# From shared/data/README.md: rows per split and per class (angry ... neutral).
EXPECTED = {
    "train": [3995, 436, 4097, 7215, 4830, 3171, 4965],
    "public_test": [467, 56, 496, 895, 653, 415, 607],
    "private_test": [491, 55, 528, 879, 594, 416, 626],
}
BLACK_IMAGES = {"train": 11, "public_test": 1, "private_test": 0}


def _manual_dir(tmp_path: pathlib.Path) -> pathlib.Path:
    candidates = [pathlib.Path(os.environ["FER2013_DIR"])] if "FER2013_DIR" in os.environ else []
    candidates.append(SHARED)
    for directory in candidates:
        try:
            return fer2013_csv.find_source(directory).parent
        except FileNotFoundError:
            pass
        if (directory / COMPACT).is_file():
            restore = directory / "restore_csv.py"
            subprocess.run(
                [sys.executable, str(restore), str(directory / COMPACT), str(tmp_path)], check=True
            )
            return tmp_path
    pytest.skip(f"real FER2013 not found: set FER2013_DIR or provide {SHARED / COMPACT}")


@pytest.mark.real_data
def test_real_fer2013_builds_with_the_documented_counts(tmp_path):
    manual_dir = _manual_dir(tmp_path / "manual")
    start = time.perf_counter()
    data_pipelines.build("fer2013", data_dir=tmp_path / "tfds", manual_dir=manual_dir)
    print(f"\nFER2013 build from {manual_dir}: {time.perf_counter() - start:.1f} s")
    for split, counts in EXPECTED.items():
        arrays = data_pipelines.load_split("fer2013", split, tmp_path / "tfds")
        assert arrays["image"].shape == (sum(counts), 48, 48, 1)
        np.testing.assert_array_equal(np.bincount(arrays["label"], minlength=7), counts)
        black = int((arrays["image"].reshape(len(arrays["image"]), -1).max(axis=1) == 0).sum())
        assert black == BLACK_IMAGES[split]
        assert np.all(np.diff(arrays["index"]) > 0)  # CSV row order.
        from_files = files.load_split_from_files("fer2013", split, manual_dir)
        for key, value in arrays.items():
            assert from_files[key].dtype == value.dtype
            np.testing.assert_array_equal(from_files[key], value)
