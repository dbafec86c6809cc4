"""Post-hoc logit adjustment by the training classes' prior: rare classes get their due.

A model trained on FER2013 (436 disgust faces, 7,215 happy) learns its prior and almost never
says "disgust". Subtracting `tau * log prior` from the logits (Menon et al., "Long-tail learning
via logit adjustment", ICLR 2021) makes it one for balanced classes. `tau` is chosen on the select
split (`choose_tau`), never on the reported one, and stored in the shipped weights' manifest
(`pretrained.set_logit_adjustment`); `Recognizer` applies it unless `adjust=False` (`--no_adjust`).
On probabilities: `p' = p * exp(offsets) / sum(p * exp(offsets))`, the softmax of the adjusted
logits.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

# The grid `choose_tau` searches: 0 (none) to 2 in steps of 0.05.
TAU_GRID = tuple(round(0.05 * i, 2) for i in range(41))
# Mean per-class recall within this of the best counts as the best: on FER2013 PublicTest two
# disgust faces of 56 move it by 0.51 points, so its maximum over tau sits on a plateau of noise
# (cycle 5: 64.6-64.8% for tau 0.7-1.1) across which accuracy falls 2.9 points.
TOLERANCE = 0.005


def class_prior(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """`(K,)` float64 class frequencies of integer `labels` (each class at least once)."""
    counts = np.bincount(np.asarray(labels), minlength=num_classes).astype(np.float64)
    if counts.shape != (num_classes,) or (counts == 0).any():
        raise ValueError(f"labels must hold every class 0..{num_classes - 1}, counts {counts}")
    return counts / counts.sum()


def offsets(tau: float, prior: Sequence[float]) -> np.ndarray:
    """`(K,)` float32 logit offsets `-tau * log prior`, shifted to mean 0 (the shift changes
    no probability)."""
    prior = np.asarray(prior, np.float64)
    if tau < 0 or prior.ndim != 1 or (prior <= 0).any():
        raise ValueError(f"tau must be >= 0 and the prior positive, got {tau} and {prior}")
    out = -tau * np.log(prior / prior.sum())
    return (out - out.mean()).astype(np.float32)


def adjust(probabilities: np.ndarray, logit_offsets: np.ndarray | None) -> np.ndarray:
    """`(N, K)` probabilities with `logit_offsets` added to their logits (None: as they are)."""
    probabilities = np.asarray(probabilities, np.float32)
    if logit_offsets is None or len(probabilities) == 0:
        return probabilities
    weights = np.exp(np.asarray(logit_offsets, np.float64))
    scaled = probabilities.astype(np.float64) * weights
    return (scaled / scaled.sum(axis=-1, keepdims=True)).astype(np.float32)


def recalls(probabilities: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    """`(accuracy, (K,) per-class recall)` of the argmax of `(N, K)` probabilities."""
    labels = np.asarray(labels)
    predicted = np.argmax(probabilities, axis=-1)
    k = probabilities.shape[-1]
    per_class = np.array([np.mean(predicted[labels == c] == c) for c in range(k)])
    return float(np.mean(predicted == labels)), per_class


def curve(
    probabilities: np.ndarray,
    labels: np.ndarray,
    prior: Sequence[float],
    grid: Sequence[float] = TAU_GRID,
) -> list[dict[str, Any]]:
    """Per tau of `grid`: accuracy, mean per-class recall and per-class recall (lists)."""
    rows = []
    for tau in grid:
        accuracy, per_class = recalls(adjust(probabilities, offsets(tau, prior)), labels)
        rows.append(
            {
                "tau": float(tau),
                "accuracy": accuracy,
                "mean_class_accuracy": float(per_class.mean()),
                "per_class_accuracy": per_class.tolist(),
            }
        )
    return rows


def choose_tau(rows: Sequence[Mapping[str, Any]], tolerance: float = TOLERANCE) -> float:
    """The smallest tau of `curve` rows whose mean per-class recall is within `tolerance` of
    the highest: the least adjustment that balances the classes as well as any."""
    best = max(r["mean_class_accuracy"] for r in rows)
    return float(min(r["tau"] for r in rows if r["mean_class_accuracy"] >= best - tolerance))


def from_manifest(manifest: Mapping[str, Any]) -> np.ndarray | None:
    """The logit offsets a weights manifest records (`logit_adjustment`: tau and prior), or
    None when it records none."""
    entry = manifest.get("logit_adjustment")
    if not entry:
        return None
    return offsets(float(entry["tau"]), entry["prior"])
