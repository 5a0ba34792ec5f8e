"""Calibration fits and the threshold search, on small hand-checked cases."""

from __future__ import annotations

import pytest

from moderation.evaluation.calibration import (
    RoutingSample,
    best_thresholds,
    decisions,
    evaluate_thresholds,
    fit_isotonic,
    fit_platt,
)


def test_isotonic_pools_adjacent_violators() -> None:
    calibration = fit_isotonic([0.1, 0.2, 0.3, 0.4], [0, 1, 0, 1])
    assert calibration.x == (0.1, 0.2, 0.3, 0.4) and calibration.y == (0.0, 0.5, 0.5, 1.0)
    assert calibration.predict([0.25, 0.15, 0.0, 1.0]) == pytest.approx([0.5, 0.25, 0.0, 1.0])


def test_isotonic_handles_tied_scores() -> None:
    calibration = fit_isotonic([0.5, 0.5, 0.5, 0.9], [0, 1, 1, 1])
    assert calibration.predict([0.5, 0.9]) == pytest.approx([2 / 3, 1.0])


def test_platt_is_monotone_and_separates() -> None:
    calibration = fit_platt([0.1, 0.2, 0.3, 0.7, 0.8, 0.9], [0, 0, 0, 1, 1, 1])
    p = calibration.predict([0.0, 0.5, 1.0])
    assert p[0] < 0.2 < p[1] < 0.8 < p[2]
    assert calibration.params[0] > 0


def _sample(score: float, label: bool, **flags: bool) -> RoutingSample:
    return RoutingSample(
        conflict_score=score,
        label=label,
        category_block=flags.get("category_block", False),
        category_review=flags.get("category_review", False),
        low_confidence=flags.get("low_confidence", False),
    )


SAMPLES = [
    _sample(0.1, False),
    _sample(0.2, False),
    _sample(0.35, False),
    _sample(0.5, True),
    _sample(0.6, False),
    _sample(0.85, True),
    _sample(0.9, True),
]


def test_decisions_follow_the_router() -> None:
    flagged = [
        _sample(0.1, True, category_block=True),
        _sample(0.1, False, category_review=True),
        _sample(0.9, True, low_confidence=True),
    ]
    assert decisions(flagged, 0.3, 0.8) == ["block", "review", "review"]
    choice = evaluate_thresholds(SAMPLES, 0.3, 0.8)
    assert (choice.reviewed, choice.errors) == (3, 0)


def test_zero_error_keeps_only_the_ambiguous_items_in_review() -> None:
    best = best_thresholds(SAMPLES, 0.0)
    assert best is not None
    assert (best.allow_threshold, best.block_threshold) == (0.35, 0.85)
    assert (best.reviewed, best.errors) == (2, 0)


def test_one_error_allowed_reviews_nothing() -> None:
    best = best_thresholds(SAMPLES, 1 / 7)
    assert best is not None
    # (0.6, 0.85) and (0.35, 0.5) both review nothing with one error; the wider band wins.
    assert (best.allow_threshold, best.block_threshold) == (0.6, 0.85)
    assert (best.reviewed, best.errors) == (0, 1)


def test_impossible_target() -> None:
    assert best_thresholds([_sample(0.1, False, category_block=True)], 0.0) is None
    assert best_thresholds([], 0.1) is None
