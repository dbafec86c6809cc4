"""JAFFE cross-validation folds: partition, stratification, subject independence, determinism."""

from __future__ import annotations

import numpy as np
import pytest

from data_pipelines import jaffe_folds


def _jaffe_like(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """213 examples: 10 subjects x 7 expressions x 3 repeats, 297 - 213 dropped at random."""
    rng = np.random.default_rng(seed)
    subjects = np.repeat([f"S{i}" for i in range(10)], 21)
    labels = np.tile(np.repeat(np.arange(7), 3), 10)
    keep = np.sort(rng.choice(210, size=203, replace=False))
    subjects = np.concatenate([subjects[keep], ["S0"] * 10])
    labels = np.concatenate([labels[keep], np.arange(10) % 7])
    return labels, subjects


def _check_partition(folds, n: int) -> None:
    tests = np.concatenate([test for _, test in folds])
    np.testing.assert_array_equal(np.sort(tests), np.arange(n))  # Each example in one test fold.
    for train, test in folds:
        assert np.intersect1d(train, test).size == 0
        np.testing.assert_array_equal(np.union1d(train, test), np.arange(n))
        assert np.all(np.diff(train) > 0) and np.all(np.diff(test) > 0)


def test_random_protocol_is_a_stratified_partition():
    labels, subjects = _jaffe_like()
    folds = jaffe_folds(labels, subjects, k=5, protocol="random", seed=0)
    assert len(folds) == 5
    _check_partition(folds, labels.size)
    sizes = [test.size for _, test in folds]
    assert max(sizes) - min(sizes) <= 1
    per_class = np.array([np.bincount(labels[test], minlength=7) for _, test in folds])
    assert np.all(per_class.max(axis=0) - per_class.min(axis=0) <= 1)


def test_subject_protocol_keeps_subjects_apart():
    labels, subjects = _jaffe_like()
    folds = jaffe_folds(labels, subjects, k=5, protocol="subject", seed=3)
    _check_partition(folds, labels.size)
    seen = []
    for train, test in folds:
        test_subjects = set(subjects[test])
        assert len(test_subjects) == 2
        assert not test_subjects & set(subjects[train])
        seen += sorted(test_subjects)
    assert sorted(seen) == sorted(set(subjects))


@pytest.mark.parametrize("protocol", ["random", "subject"])
def test_same_seed_same_folds_other_seed_other_folds(protocol):
    labels, subjects = _jaffe_like()
    a = jaffe_folds(labels, subjects, protocol=protocol, seed=7)
    b = jaffe_folds(labels.copy(), subjects.copy(), protocol=protocol, seed=7)
    c = jaffe_folds(labels, subjects, protocol=protocol, seed=8)
    for (ta, sa), (tb, sb) in zip(a, b, strict=True):
        np.testing.assert_array_equal(ta, tb)
        np.testing.assert_array_equal(sa, sb)
    assert any(not np.array_equal(sa, sc) for (_, sa), (_, sc) in zip(a, c, strict=True))


def test_bad_arguments():
    labels, subjects = _jaffe_like()
    with pytest.raises(ValueError, match="unknown protocol"):
        jaffe_folds(labels, subjects, protocol="loso")
    with pytest.raises(ValueError, match="equal length"):
        jaffe_folds(labels, subjects[:-1])
    with pytest.raises(ValueError, match="cannot split 3 subjects into 5 folds"):
        jaffe_folds(labels[:30], np.repeat(["A", "B", "C"], 10), protocol="subject")
    with pytest.raises(ValueError, match="k must be >= 2"):
        jaffe_folds(labels, subjects, k=1)
