"""The run's metrics, accumulated with `clu.metrics`: `EvalMetrics` per evaluation batch,
combined by `merge` (sums of counts, whatever the batching) into a `report`; `train_summaries`
for training. (Not clu's writers: they import TensorFlow, which training must not need.)
"""

# No `from __future__ import annotations`: clu reads the collections' annotations as classes.
from collections.abc import Mapping, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from clu import metrics as clu_metrics

from fer_jax.training import evaluate


@flax.struct.dataclass
class Confusion(clu_metrics.Metric):
    """`(K, K)` float32 counts of a split: rows the true class, columns the predicted one."""

    counts: jax.Array

    @classmethod
    def from_model_output(
        cls, *, logits: jax.Array, labels: jax.Array, mask: jax.Array, **_: Any
    ) -> "Confusion":
        num_classes = logits.shape[-1]
        truth = jax.nn.one_hot(labels, num_classes) * mask.astype(jnp.float32)[:, None]
        pred = jax.nn.one_hot(jnp.argmax(logits, -1), num_classes)
        return cls(counts=truth.T @ pred)

    def merge(self, other: "Confusion") -> "Confusion":
        return type(self)(counts=self.counts + other.counts)

    def compute(self) -> jax.Array:
        return self.counts


@flax.struct.dataclass
class EvalMetrics(clu_metrics.Collection):
    """One split's (or batch's) evaluation: `confusion`, `loss` (mean cross-entropy of the
    averaged crops' logits) and `accuracy`, over the examples whose mask is set."""

    confusion: Confusion
    loss: clu_metrics.Average.from_output("loss")
    accuracy: clu_metrics.Accuracy


def eval_metrics(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> EvalMetrics:
    """`EvalMetrics` of `(B, K)` logits, `(B,)` int32 labels and a `(B,)` mask (padding
    rows 0)."""
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return EvalMetrics.single_from_model_output(
        logits=logits, labels=labels.astype(jnp.int32), mask=mask, loss=loss
    )


def merge(total: Any, new: Any) -> Any:
    """`total` and `new` (collections, or dicts of them) combined by `merge`."""
    if isinstance(total, Mapping):
        return {name: merge(total[name], new[name]) for name in total}
    return total.merge(new)


def report(totals: EvalMetrics, num_examples: int) -> dict[str, Any]:
    """The report of a split's host-side totals, checking all `num_examples` were counted."""
    counted = int(np.ravel(totals.loss.count)[0])
    if counted != num_examples:
        raise RuntimeError(f"evaluated {counted} examples, expected {num_examples}")
    return evaluate.metrics_from_confusion(
        np.asarray(totals.confusion.counts), loss_sum=float(totals.loss.total)
    )


def train_summaries(
    history: Sequence[Mapping[str, Any]], num_replicas: int, step: int
) -> list[dict[str, float]]:
    """Per model, the means of the training metrics over `history` (a dict per dispatch up to
    global step `step`: `(steps[, K])` arrays) as `train_<name>` scalars. A non-finite loss
    raises `FloatingPointError` naming its step: the run stops before saving it."""
    stacked = jax.device_get(list(history))
    k = num_replicas
    per_step = {  # (steps, K) float32
        name: np.concatenate([np.asarray(h[name], np.float32).reshape(-1, k) for h in stacked])
        for name in stacked[0]
    }
    bad_steps, bad_replicas = np.nonzero(~np.isfinite(per_step["loss"]))
    if bad_steps.size:
        first = step - len(per_step["loss"]) + int(bad_steps[0]) + 1
        value = per_step["loss"][bad_steps[0], bad_replicas[0]]
        which = f" of replica {int(bad_replicas[0])}" if k > 1 else ""
        raise FloatingPointError(
            f"non-finite training loss{which} ({value}) at step {first}; stopping. "
            "The last good checkpoint is kept in the workdir."
        )
    return [
        {
            f"train_{name}": float(clu_metrics.Average.from_model_output(v[:, replica]).compute())
            for name, v in per_step.items()
        }
        for replica in range(k)
    ]
