"""Class-prior logit adjustment (`fer_jax.inference.prior_adjustment`): the arithmetic, the
choice of tau, its place in a weights manifest and the recognizer's default."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fer_jax.inference import prior_adjustment
from fer_jax.inference.recognizer import Recognizer
from fer_jax.model import pretrained
from fer_jax.training import evaluate
from tests.test_pretrained import saved, weights_env  # noqa: F401 (fixtures)

PRIOR = np.array([0.14, 0.015, 0.14, 0.25, 0.17, 0.11, 0.175])


def test_adjusted_probabilities_are_the_softmax_of_the_offset_logits():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, 7))
    offsets = prior_adjustment.offsets(0.7, PRIOR)
    raw = -0.7 * np.log(PRIOR / PRIOR.sum())
    np.testing.assert_allclose(offsets, raw - raw.mean(), rtol=1e-5, atol=1e-6)
    softmax = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    shifted = logits + offsets
    want = np.exp(shifted) / np.exp(shifted).sum(-1, keepdims=True)
    np.testing.assert_allclose(prior_adjustment.adjust(softmax, offsets), want, rtol=1e-5)
    unchanged = prior_adjustment.adjust(softmax, None)
    np.testing.assert_array_equal(unchanged, softmax.astype(np.float32))
    assert offsets[1] == offsets.max()  # the rarest class gains the most


def test_a_prior_skewed_model_is_balanced_by_tau_chosen_on_its_recall():
    """Scores that favour the frequent classes by log prior: tau = 1 undoes it exactly, and
    `choose_tau` finds it from the per-class recall."""
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 7, 4000)
    logits = rng.normal(size=(4000, 7)) + 1.5 * np.eye(7)[labels] + np.log(PRIOR)
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    rows = prior_adjustment.curve(probs, labels, PRIOR)
    assert [r["tau"] for r in rows] == list(prior_adjustment.TAU_GRID)
    tau = prior_adjustment.choose_tau(rows)
    assert 0.5 <= tau <= 1.2
    none, chosen = rows[0], next(r for r in rows if r["tau"] == tau)
    assert chosen["mean_class_accuracy"] > none["mean_class_accuracy"] + 0.05
    assert chosen["per_class_accuracy"][1] > none["per_class_accuracy"][1] + 0.3
    with pytest.raises(ValueError, match="every class"):
        prior_adjustment.class_prior(np.array([0, 1, 1]), 7)


def test_mean_class_accuracy_is_reported_beside_accuracy():
    confusion = np.array([[8, 2], [1, 1]])
    report = evaluate.metrics_from_confusion(confusion)
    assert report["accuracy"] == pytest.approx(9 / 12)
    assert report["mean_class_accuracy"] == pytest.approx((0.8 + 0.5) / 2)
    assert evaluate.scalar_metrics(report)["mean_class_accuracy"] == report["mean_class_accuracy"]


def test_the_manifest_carries_the_adjustment_and_the_recognizer_applies_it_by_default(
    weights_env,  # noqa: F811
):
    faces = np.random.default_rng(2).integers(0, 256, (3, 48, 48), np.uint8)
    raw = Recognizer.pretrained(crops=1)
    assert raw.logit_offsets is None  # nothing recorded yet
    before = raw.predict_faces(faces)
    sha = pretrained.read_manifest()["sha256"]
    entry = {"tau": 1.0, "prior": PRIOR.tolist(), "chosen_on": "a test"}
    path = pretrained.set_logit_adjustment(None, entry)
    try:
        with open(path) as f:
            manifest = json.load(f)
        assert manifest["logit_adjustment"]["tau"] == 1.0 and manifest["sha256"] == sha
        pretrained.load()  # the weights file still verifies against its manifest
        adjusted = Recognizer.pretrained(crops=1)
        np.testing.assert_allclose(adjusted.logit_offsets, prior_adjustment.offsets(1.0, PRIOR))
        want = prior_adjustment.adjust(before, adjusted.logit_offsets)
        np.testing.assert_allclose(adjusted.predict_faces(faces), want, rtol=1e-5, atol=1e-7)
        unadjusted = Recognizer.pretrained(crops=1, adjust=False)
        assert unadjusted.logit_offsets is None
        np.testing.assert_allclose(unadjusted.predict_faces(faces), before, rtol=1e-6)
        with pytest.raises(ValueError, match="needs tau and prior"):
            pretrained.set_logit_adjustment(None, {"tau": 1.0})
    finally:
        pretrained.set_logit_adjustment(None, None)
    assert "logit_adjustment" not in pretrained.read_manifest()


def test_the_least_tau_within_tolerance_of_the_best_recall_is_chosen():
    recall = [0.50, 0.60, 0.640, 0.646, 0.648, 0.630]
    rows = [{"tau": 0.1 * i, "mean_class_accuracy": r} for i, r in enumerate(recall)]
    assert prior_adjustment.choose_tau(rows) == pytest.approx(0.3)  # 0.646 >= 0.648 - 0.005
    assert prior_adjustment.choose_tau(rows, tolerance=0.0) == pytest.approx(0.4)
    assert prior_adjustment.choose_tau(rows, tolerance=0.01) == pytest.approx(0.2)
