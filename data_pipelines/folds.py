"""Deterministic k-fold cross-validation splits for JAFFE (numpy only).

Two protocols:

- `random` (Wen et al.'s): folds stratified by label. Within each class the examples are
  shuffled and dealt round-robin to the folds, continuing the deal across classes, so every
  example is in exactly one test fold, fold sizes differ by at most 1 and each class's count
  per fold differs by at most 1.
- `subject` (subject-independent): the distinct subjects are shuffled and split into k groups
  of (nearly) equal size (JAFFE's 10 subjects -> 5 folds of 2); a fold's test part holds every
  image of its subjects, so no subject is in both a fold's training and test parts.

The folds depend only on (labels, subjects, k, protocol, seed). A cross-validation run's
`config.fold_protocol` may also be `both` (`CHOICES`, `protocols_of`): every protocol, each in
its own sub-workdir (`fer_jax.training.cross_validate`).
"""

from __future__ import annotations

import numpy as np

PROTOCOLS = ("random", "subject")  # the first: the paper's, whose figures a summary leads with
BOTH = "both"
CHOICES = (*PROTOCOLS, BOTH)  # what a run's config.fold_protocol may hold


def protocols_of(choice: str) -> tuple[str, ...]:
    """The protocols a run's `config.fold_protocol` (one of `CHOICES`) runs, in order."""
    return PROTOCOLS if choice == BOTH else (choice,)


def jaffe_folds(
    labels: np.ndarray,
    subjects: np.ndarray,
    *,
    k: int = 5,
    protocol: str = "random",
    seed: int = 0,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Splits N examples into k folds.

    Args:
      labels: (N,) int class codes.
      subjects: (N,) subject ids (any hashable, e.g. str).
      k: number of folds, >= 2.
      protocol: 'random' (stratified by label) or 'subject' (subject-independent).
      seed: int seed for the shuffles.

    Returns:
      k pairs `(train_idx, test_idx)`, each (M,) int64 sorted indices into the N examples; the
      test parts partition range(N) and each train part is the complement of its test part.
    """
    labels = np.asarray(labels)
    subjects = np.asarray(subjects)
    if labels.ndim != 1 or subjects.shape != labels.shape:
        raise ValueError(
            f"labels and subjects must be 1-D of equal length, got {labels.shape} and "
            f"{subjects.shape}"
        )
    if k < 2:
        raise ValueError(f"k must be >= 2, got {k}")
    rng = np.random.default_rng(seed)
    n = labels.shape[0]
    fold_of = np.empty(n, dtype=np.int64)
    if protocol == "random":
        if n < k:
            raise ValueError(f"cannot split {n} examples into {k} folds")
        order = np.concatenate(
            [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
        )
        fold_of[order] = np.arange(n) % k
    elif protocol == "subject":
        unique = np.unique(subjects)
        if unique.size < k:
            raise ValueError(f"cannot split {unique.size} subjects into {k} folds")
        groups = np.array_split(rng.permutation(unique.size), k)
        for fold, group in enumerate(groups):
            fold_of[np.isin(subjects, unique[group])] = fold
    else:
        raise ValueError(f"unknown protocol {protocol!r}, expected one of {PROTOCOLS}")
    return [(np.flatnonzero(fold_of != f), np.flatnonzero(fold_of == f)) for f in range(k)]
