"""Metrics against values computed by hand."""

from __future__ import annotations

import pytest

from moderation.evaluation.metrics import (
    accuracy,
    auroc,
    brier_score,
    expected_calibration_error,
    precision_recall,
    reliability_bins,
)


def test_accuracy() -> None:
    assert accuracy(["allow", "block", "review"], ["allow", "review", "review"]) == pytest.approx(2 / 3)
    assert accuracy([], []) is None
    with pytest.raises(ValueError):
        accuracy(["allow"], [])


def test_auroc_counts_ties_as_half() -> None:
    # Positive/negative pairs: (.9,.8)=1 (.9,.3)=1 (.7,.8)=0 (.7,.3)=1 (.3,.8)=0 (.3,.3)=.5 -> 3.5/6.
    assert auroc([1, 0, 1, 0, 1], [0.9, 0.8, 0.7, 0.3, 0.3]) == pytest.approx(3.5 / 6)


def test_auroc_extremes() -> None:
    assert auroc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert auroc([1, 1, 0, 0], [0.1, 0.2, 0.8, 0.9]) == 0.0
    assert auroc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5
    assert auroc([1, 1], [0.3, 0.4]) is None


def test_expected_calibration_error() -> None:
    # Two bins: [.1,.2] -> mean .15, rate 0; [.8,.9] -> mean .85, rate 1; each gap .15, weight .5.
    assert expected_calibration_error([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9], bins=2) == pytest.approx(0.15)
    # Ten bins: bin 0 mean .05 rate .5 (gap .45), bin 9 mean .95 rate 1 (gap .05) -> .25.
    assert expected_calibration_error([0, 1, 1, 1], [0.05, 0.05, 0.95, 0.95]) == pytest.approx(0.25)
    assert expected_calibration_error([0, 1], [0.0, 1.0]) == 0.0
    assert expected_calibration_error([], []) is None


def test_reliability_bins_put_one_in_the_last_bin() -> None:
    bins = reliability_bins([1, 0], [1.0, 0.0], bins=4)
    assert [b.count for b in bins] == [1, 0, 0, 1]
    assert bins[3].mean_probability == 1.0 and bins[3].observed_rate == 1.0 and bins[1].observed_rate is None


def test_brier_score() -> None:
    assert brier_score([1, 0], [0.8, 0.4]) == pytest.approx((0.04 + 0.16) / 2)


def test_precision_recall() -> None:
    pr = precision_recall([True, True, False, False, True], [True, False, True, False, True])
    assert (pr.true_positives, pr.false_positives, pr.false_negatives, pr.support) == (2, 1, 1, 3)
    assert pr.precision == pytest.approx(2 / 3) and pr.recall == pytest.approx(2 / 3)
    assert pr.f1 == pytest.approx(2 / 3)
    none = precision_recall([False, False], [False, False])
    assert none.precision is None and none.recall is None and none.f1 is None
