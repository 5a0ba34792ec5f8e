"""Classification and calibration metrics as pure functions over plain sequences (numpy inside)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PrecisionRecall:
    """Precision, recall and F1 of one binary prediction, with the counts behind them."""

    precision: float | None
    recall: float | None
    f1: float | None
    true_positives: int
    false_positives: int
    false_negatives: int
    support: int


@dataclass(frozen=True)
class ReliabilityBin:
    """One bin of a reliability diagram: its range, size, mean predicted probability and observed rate."""

    lower: float
    upper: float
    count: int
    mean_probability: float | None
    observed_rate: float | None


def _arrays(labels: Sequence[int | bool], values: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels, dtype=float)
    v = np.asarray(values, dtype=float)
    if y.shape != v.shape or y.ndim != 1:
        raise ValueError("labels and values must be sequences of the same length")
    return y, v


def accuracy(expected: Sequence[str], predicted: Sequence[str]) -> float | None:
    """Share of predictions equal to the expected value; None for no items."""
    if len(expected) != len(predicted):
        raise ValueError("expected and predicted must have the same length")
    if not expected:
        return None
    return sum(e == p for e, p in zip(expected, predicted, strict=True)) / len(expected)


def auroc(labels: Sequence[int | bool], scores: Sequence[float]) -> float | None:
    """Area under the ROC curve by the Mann-Whitney rank statistic (ties count half); None for one class."""
    y, s = _arrays(labels, scores)
    positives = int(y.sum())
    negatives = len(y) - positives
    if positives == 0 or negatives == 0:
        return None
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=float)
    sorted_scores = s[order]
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1  # average of 1-based ranks i+1 .. j+1
        i = j + 1
    rank_sum = float(ranks[y == 1].sum())
    return (rank_sum - positives * (positives + 1) / 2) / (positives * negatives)


def reliability_bins(
    labels: Sequence[int | bool], probabilities: Sequence[float], bins: int = 10
) -> list[ReliabilityBin]:
    """Equal-width probability bins over [0, 1]; a probability of exactly 1 falls in the last bin."""
    y, p = _arrays(labels, probabilities)
    if bins < 1:
        raise ValueError("bins must be at least 1")
    index = np.minimum((np.clip(p, 0.0, 1.0) * bins).astype(int), bins - 1)
    out = []
    for b in range(bins):
        mask = index == b
        count = int(mask.sum())
        out.append(
            ReliabilityBin(
                lower=b / bins,
                upper=(b + 1) / bins,
                count=count,
                mean_probability=float(p[mask].mean()) if count else None,
                observed_rate=float(y[mask].mean()) if count else None,
            )
        )
    return out


def expected_calibration_error(
    labels: Sequence[int | bool], probabilities: Sequence[float], bins: int = 10
) -> float | None:
    """ECE: the size-weighted mean gap between predicted probability and observed rate over the bins."""
    if len(labels) == 0:
        return None
    total = len(labels)
    return float(
        sum(
            b.count / total * abs(b.observed_rate - b.mean_probability)
            for b in reliability_bins(labels, probabilities, bins)
            if b.count and b.observed_rate is not None and b.mean_probability is not None
        )
    )


def brier_score(labels: Sequence[int | bool], probabilities: Sequence[float]) -> float | None:
    """Mean squared difference between probability and outcome."""
    y, p = _arrays(labels, probabilities)
    return float(np.mean((p - y) ** 2)) if len(y) else None


def precision_recall(expected: Sequence[bool], predicted: Sequence[bool]) -> PrecisionRecall:
    """Precision, recall and F1 of binary predictions; a ratio with a zero denominator is None."""
    if len(expected) != len(predicted):
        raise ValueError("expected and predicted must have the same length")
    tp = sum(1 for e, p in zip(expected, predicted, strict=True) if e and p)
    fp = sum(1 for e, p in zip(expected, predicted, strict=True) if not e and p)
    fn = sum(1 for e, p in zip(expected, predicted, strict=True) if e and not p)
    precision = tp / (tp + fp) if tp + fp else None
    recall = tp / (tp + fn) if tp + fn else None
    f1 = (
        2 * precision * recall / (precision + recall)
        if precision is not None and recall is not None and precision + recall
        else None
    )
    return PrecisionRecall(precision, recall, f1, tp, fp, fn, support=tp + fn)
