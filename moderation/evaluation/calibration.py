"""Score calibration (isotonic or Platt) and the search for allow/block thresholds at a target error rate."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

Method = Literal["isotonic", "platt"]


@dataclass(frozen=True)
class Calibration:
    """A monotone map from a raw score to P(positive), fitted on labelled scores."""

    method: Method
    # isotonic: step function through (x, y); platt: y = sigmoid(a * x + b) with params (a, b).
    x: tuple[float, ...] = ()
    y: tuple[float, ...] = ()
    params: tuple[float, float] = (0.0, 0.0)

    def predict(self, scores: Sequence[float]) -> list[float]:
        """Calibrated probabilities of raw scores."""
        s = np.asarray(scores, dtype=float)
        if self.method == "platt":
            a, b = self.params
            return [float(v) for v in 1.0 / (1.0 + np.exp(-(a * s + b)))]
        if not self.x:
            return [0.5] * len(s)
        return [float(v) for v in np.interp(s, self.x, self.y)]

    def as_dict(self) -> dict[str, object]:
        """JSON-ready form."""
        if self.method == "platt":
            return {"method": "platt", "a": self.params[0], "b": self.params[1]}
        return {"method": "isotonic", "x": list(self.x), "y": list(self.y)}


def fit_isotonic(scores: Sequence[float], labels: Sequence[int | bool]) -> Calibration:
    """Isotonic regression by pool-adjacent-violators: the best non-decreasing fit of labels on scores."""
    s = np.asarray(scores, dtype=float)
    y = np.asarray(labels, dtype=float)
    if len(s) == 0:
        return Calibration("isotonic")
    order = np.argsort(s, kind="mergesort")
    s, y = s[order], y[order]
    # Tied scores share one value: start from one block per distinct score.
    uniq, start = np.unique(s, return_index=True)
    sums = list(np.add.reduceat(y, start))
    counts = list(np.diff(np.append(start, len(s))).astype(float))
    lows = list(uniq)
    highs = list(uniq)
    i = 0
    while i < len(sums) - 1:
        if sums[i] / counts[i] > sums[i + 1] / counts[i + 1]:
            sums[i] += sums.pop(i + 1)
            counts[i] += counts.pop(i + 1)
            highs[i] = highs.pop(i + 1)
            lows.pop(i + 1)
            i = max(i - 1, 0)
        else:
            i += 1
    xs: list[float] = []
    ys: list[float] = []
    for low, high, total, count in zip(lows, highs, sums, counts, strict=True):
        value = total / count
        xs.append(float(low))
        ys.append(value)
        if high != low:
            xs.append(float(high))
            ys.append(value)
    return Calibration("isotonic", x=tuple(xs), y=tuple(ys))


def fit_platt(scores: Sequence[float], labels: Sequence[int | bool], iterations: int = 100) -> Calibration:
    """Platt scaling: logistic regression of the label on the score by Newton's method."""
    s = np.asarray(scores, dtype=float)
    y = np.asarray(labels, dtype=float)
    positives, negatives = float(y.sum()), float(len(y) - y.sum())
    if len(s) == 0:
        return Calibration("platt", params=(0.0, 0.0))
    # Platt's smoothed targets keep the fit finite when the classes are separable.
    target = np.where(y == 1, (positives + 1) / (positives + 2), 1 / (negatives + 2))
    a, b = 0.0, math.log((positives + 1) / (negatives + 1))
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-(a * s + b)))
        w = p * (1 - p) + 1e-12
        grad = np.array([np.sum((p - target) * s), np.sum(p - target)])
        hess = np.array([[np.sum(w * s * s), np.sum(w * s)], [np.sum(w * s), np.sum(w)]]) + 1e-9 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        a, b = a - float(step[0]), b - float(step[1])
        if float(np.abs(step).max()) < 1e-10:
            break
    return Calibration("platt", params=(a, b))


@dataclass(frozen=True)
class RoutingSample:
    """One labelled verdict, reduced to what the conflict thresholds cannot change."""

    conflict_score: float
    label: bool  # True: a reviewer blocked it
    category_block: bool  # a category score blocks regardless of the thresholds
    category_review: bool  # a category score turns an allow into a review
    low_confidence: bool  # confidence below the tenant's minimum


@dataclass(frozen=True)
class ThresholdChoice:
    """Allow and block thresholds and what they do on the samples."""

    allow_threshold: float
    block_threshold: float
    review_rate: float
    error_rate: float
    errors: int
    reviewed: int


class _Samples:
    """The samples as arrays, built once for the many threshold pairs of a search."""

    def __init__(self, samples: Sequence[RoutingSample]) -> None:
        self.scores = np.array([x.conflict_score for x in samples], dtype=float)
        self.labels = np.array([x.label for x in samples], dtype=bool)
        self.category_block = np.array([x.category_block for x in samples], dtype=bool)
        self.category_review = np.array([x.category_review for x in samples], dtype=bool)
        self.low_confidence = np.array([x.low_confidence for x in samples], dtype=bool)

    def decisions(self, allow: float, block: float) -> np.ndarray:
        out = np.where(self.scores >= block, 1, np.where(self.scores <= allow, 0, 2))
        out = np.where(self.category_block, 1, np.where(self.category_review & (out == 0), 2, out))
        return np.where((out != 2) & self.low_confidence, 2, out)

    def evaluate(self, allow: float, block: float) -> ThresholdChoice:
        d = self.decisions(allow, block)
        errors = int(np.sum((d == 0) & self.labels) + np.sum((d == 1) & ~self.labels))
        reviewed = int(np.sum(d == 2))
        n = max(len(self.scores), 1)
        return ThresholdChoice(allow, block, reviewed / n, errors / n, errors, reviewed)


def decisions(samples: Sequence[RoutingSample], allow: float, block: float) -> list[str]:
    """What the router would decide for each sample under these conflict thresholds (as in ``route``)."""
    names = ("allow", "block", "review")
    return [names[int(d)] for d in _Samples(samples).decisions(allow, block)]


def evaluate_thresholds(samples: Sequence[RoutingSample], allow: float, block: float) -> ThresholdChoice:
    """Review rate and error rate (automatic decisions that disagree with the label) of a threshold pair."""
    return _Samples(samples).evaluate(allow, block)


def candidate_thresholds(scores: Sequence[float], limit: int = 200) -> list[float]:
    """Thresholds worth trying: 0, 1 and the distinct scores (thinned to quantiles when there are many)."""
    values = sorted({round(float(v), 6) for v in scores} | {0.0, 1.0})
    if len(values) > limit:
        picks = np.quantile(np.asarray(values), np.linspace(0, 1, limit))
        values = sorted({round(float(v), 6) for v in picks} | {0.0, 1.0})
    return values


def best_thresholds(
    samples: Sequence[RoutingSample], target_error: float, candidates: Sequence[float] | None = None
) -> ThresholdChoice | None:
    """The allow <= block pair with the fewest reviews and an error rate at most ``target_error``, if any."""
    if not samples:
        return None
    arrays = _Samples(samples)
    grid = list(candidates) if candidates is not None else candidate_thresholds(arrays.scores.tolist())
    best: ThresholdChoice | None = None
    best_key: tuple[int, int, float] | None = None
    for i, allow in enumerate(grid):
        for block in grid[i:]:
            choice = arrays.evaluate(allow, block)
            if choice.error_rate > target_error + 1e-12:
                continue
            # Ties go to fewer errors, then to the wider review band: the safer of equal choices.
            key = (choice.reviewed, choice.errors, -(block - allow))
            if best_key is None or key < best_key:
                best, best_key = choice, key
    return best
