"""Evaluation metrics from a confusion matrix (rows: true class, columns: predicted; the paper's
Tables 3 and 4 are its row-normalised form), and their JSON/PNG reports."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from typing import Any

import numpy as np

from data_pipelines.labels import CLASS_NAMES


def metrics_from_confusion(confusion: np.ndarray, *, loss_sum: float | None = None) -> dict:
    """`(K, K)` counts -> accuracy, per-class accuracy (recall) and its mean over the classes
    present (`mean_class_accuracy`, balanced accuracy: what a rare class's misses cost),
    row-normalised matrix, counts."""
    confusion = np.asarray(confusion, np.float64)
    total = confusion.sum()
    per_class_total = confusion.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        normalised = np.where(
            per_class_total[:, None] > 0, confusion / per_class_total[:, None], 0.0
        )
        per_class = np.where(per_class_total > 0, np.diag(confusion) / per_class_total, np.nan)
    names = (
        CLASS_NAMES
        if len(confusion) == len(CLASS_NAMES)
        else tuple(str(i) for i in range(len(confusion)))
    )
    out = {
        "accuracy": float(np.trace(confusion) / total) if total else float("nan"),
        "num_examples": int(round(total)),
        "per_class_accuracy": {n: float(a) for n, a in zip(names, per_class, strict=True)},
        "mean_class_accuracy": float(np.nanmean(per_class)) if total else float("nan"),
        "confusion_counts": np.rint(confusion).astype(int).tolist(),
        "confusion_normalized": normalised.tolist(),
        "class_names": list(names),
    }
    if loss_sum is not None and total:
        out["loss"] = float(loss_sum / total)
    return out


def scalar_metrics(metrics: dict) -> dict[str, float]:
    """The scalars of `metrics_from_confusion`'s output, for TensorBoard."""
    out = {"accuracy": metrics["accuracy"]}
    if "mean_class_accuracy" in metrics:
        out["mean_class_accuracy"] = metrics["mean_class_accuracy"]
    if "loss" in metrics:
        out["loss"] = metrics["loss"]
    for name, value in metrics["per_class_accuracy"].items():
        if np.isfinite(value):
            out[f"accuracy_{name}"] = value
    return out


def read_json(path: str, *, check: bool = True) -> Any:
    """The JSON in `path`; None if there is no such file (`check=False`: or it is unreadable)."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        if check:
            raise
        return None


def write_json(path: str, data: Any, *, indent: int = 2, default: Any = None) -> None:
    """Writes JSON atomically: a reader never sees half a file."""

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=indent, allow_nan=True, default=default)

    _write_atomically(path, ".json", write)


def _write_atomically(path: str, suffix: str, write: Callable[[str], None]) -> None:
    """`write(temporary file)`, then renames it to `path`."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp_", suffix=suffix)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def plot_confusion(normalized: np.ndarray, class_names: list[str], path: str, title: str) -> None:
    """Row-normalised confusion matrix as a PNG heat map (percentages in the cells)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    normalized = np.asarray(normalized)
    fig, ax = plt.subplots(figsize=(6.4, 5.6), dpi=100)
    im = ax.imshow(normalized, cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for i in range(normalized.shape[0]):
        for j in range(normalized.shape[1]):
            v, color = normalized[i, j], "white" if normalized[i, j] > 0.5 else "black"
            ax.text(j, i, f"{100 * v:.1f}", ha="center", va="center", color=color, fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    try:
        _write_atomically(path, ".png", fig.savefig)
    finally:
        plt.close(fig)


def write_report(directory: str, name: str, metrics: dict) -> None:
    """`directory/name.json` (all metrics) and `directory/name_confusion.png`."""
    write_json(os.path.join(directory, f"{name}.json"), metrics)
    plot_confusion(
        metrics["confusion_normalized"],
        metrics["class_names"],
        os.path.join(directory, f"{name}_confusion.png"),
        f"{name}: accuracy {100 * metrics['accuracy']:.2f}%",
    )
