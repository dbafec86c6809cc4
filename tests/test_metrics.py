"""`fer_jax.training.metrics`: the clu collections give the same numbers as counting by hand,
merging batches equals evaluating them at once, and a non-finite loss names its step."""

import numpy as np
import pytest

from fer_jax.training import metrics


def _batch(rng, n, k=7):
    logits = rng.normal(size=(n, k)).astype(np.float32)
    labels = rng.integers(0, k, n).astype(np.int32)
    return logits, labels


def test_eval_metrics_count_by_hand_and_ignore_padding():
    rng = np.random.default_rng(0)
    logits, labels = _batch(rng, 12)
    mask = np.array([1] * 9 + [0] * 3, bool)
    report = metrics.report(metrics.eval_metrics(logits, labels, mask), num_examples=9)
    pred = logits.argmax(-1)
    want = np.zeros((7, 7))
    np.add.at(want, (labels[:9], pred[:9]), 1)
    np.testing.assert_array_equal(report["confusion_counts"], want)
    assert report["accuracy"] == pytest.approx(np.mean(pred[:9] == labels[:9]))
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    assert report["loss"] == pytest.approx(-np.mean(log_p[np.arange(9), labels[:9]]), rel=1e-5)


def test_merged_batches_equal_one_batch_and_clu_accuracy_agrees():
    rng = np.random.default_rng(1)
    logits, labels = _batch(rng, 40)
    mask = np.ones(40, bool)
    whole = metrics.eval_metrics(logits, labels, mask)
    parts = [
        metrics.eval_metrics(logits[i : i + 8], labels[i : i + 8], mask[i : i + 8])
        for i in range(0, 40, 8)
    ]
    merged = parts[0]
    for part in parts[1:]:
        merged = metrics.merge(merged, part)
    np.testing.assert_array_equal(merged.confusion.counts, whole.confusion.counts)
    assert int(merged.loss.count) == 40
    counts = np.asarray(merged.confusion.counts)
    assert float(merged.accuracy.compute()) == pytest.approx(np.trace(counts) / 40)


def test_report_refuses_a_miscounted_split():
    rng = np.random.default_rng(2)
    logits, labels = _batch(rng, 5)
    with pytest.raises(RuntimeError, match="evaluated 5 examples, expected 6"):
        metrics.report(metrics.eval_metrics(logits, labels, np.ones(5, bool)), num_examples=6)


def _history(losses, k=1):
    out = []
    for loss in losses:
        shape = (len(loss) // k, k) if k > 1 else (len(loss),)
        value = np.asarray(loss, np.float32).reshape(shape)
        out.append(
            {name: value for name in ("loss", "accuracy", "feature_norm")}
            | {"learning_rate": value, "lambda": value}
        )
    return out


def test_train_summaries_are_the_means_per_replica():
    history = _history([[1.0, 2.0], [3.0, 6.0]])
    (summary,) = metrics.train_summaries(history, num_replicas=1, step=4)
    assert summary == {
        f"train_{n}": pytest.approx(3.0)
        for n in ("loss", "accuracy", "feature_norm", "learning_rate", "lambda")
    }
    two = _history([[1.0, 10.0, 3.0, 30.0]], k=2)  # steps x replicas: (2, 2)
    first, second = metrics.train_summaries(two, num_replicas=2, step=2)
    assert first["train_loss"] == pytest.approx(2.0) and second["train_loss"] == pytest.approx(20.0)


def test_every_metric_the_step_returns_is_summarised():
    """The metrics are named once, by `train_step`: a new one reaches the summaries."""
    history = [{**h, "new_metric": h["loss"] * 2} for h in _history([[1.0, 2.0]])]
    (summary,) = metrics.train_summaries(history, num_replicas=1, step=2)
    assert summary["train_new_metric"] == pytest.approx(3.0)


def test_non_finite_loss_stops_with_the_step_and_replica():
    history = _history([[1.0], [np.nan], [np.inf]])
    with pytest.raises(FloatingPointError, match="at step 9"):
        metrics.train_summaries(history, num_replicas=1, step=10)
    history = _history([[1.0, 1.0, 1.0, np.inf]], k=2)
    with pytest.raises(FloatingPointError, match="of replica 1 .* at step 2"):
        metrics.train_summaries(history, num_replicas=2, step=2)
