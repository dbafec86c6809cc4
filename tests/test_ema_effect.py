"""experiments/ema_effect.py: its scoring, and its refusals (the comparison itself needs a run)."""

from __future__ import annotations

import numpy as np
import pytest

from experiments import ema_effect


def test_score_is_accuracy_and_recall_per_class():
    labels = np.array([0, 0, 0, 1, 2, 2])
    predicted = np.array([0, 0, 1, 1, 0, 2])
    probabilities = np.eye(3)[predicted]
    scores = ema_effect.score(probabilities, labels)
    assert scores["accuracy"] == pytest.approx(4 / 6)
    assert scores["per_class_accuracy"] == pytest.approx([2 / 3, 1.0, 0.5])
    assert scores["mean_class_accuracy"] == pytest.approx((2 / 3 + 1.0 + 0.5) / 3)
    assert scores["num_examples"] == 6


def test_a_folder_without_checkpoints_is_refused_by_name(tmp_path):
    with pytest.raises(SystemExit, match=r"is neither a run directory with best/ or checkpoints/"):
        ema_effect.restore(str(tmp_path))
