"""Routing scores to allow / block / review per tenant thresholds."""

from __future__ import annotations

import math

import pytest

from moderation.errors import InvalidInput
from moderation.policy.categories import validate_custom_categories
from moderation.policy.routing import Thresholds, route
from moderation.submissions.models import Decision

T = Thresholds(block_threshold=0.8, allow_threshold=0.3, min_confidence=0.6)


@pytest.mark.parametrize(
    ("conflict", "confidence", "expected"),
    [
        (0.9, 0.9, Decision.block),
        (0.8, 0.9, Decision.block),
        (0.1, 0.9, Decision.allow),
        (0.3, 0.9, Decision.allow),
        (0.5, 0.9, Decision.review),
        (0.9, 0.5, Decision.review),
        (0.1, 0.5, Decision.review),
    ],
)
def test_conflict_score_thresholds_and_confidence(
    conflict: float, confidence: float, expected: Decision
) -> None:
    assert route(conflict, confidence, {}, T).decision == expected


def test_categories_can_block_or_send_to_review() -> None:
    blocked = route(0.1, 0.9, {"weapons": 0.97, "spam": 0.1}, T)
    assert blocked.decision == Decision.block and any("weapons" in r for r in blocked.reasons)
    risky = route(0.1, 0.9, {"drugs": 0.7}, T)
    assert risky.decision == Decision.review and any("drugs" in r for r in risky.reasons)
    assert route(0.1, 0.9, {"drugs": 0.2}, T).decision == Decision.allow


def test_reasons_explain_the_decision() -> None:
    routing = route(0.85, 0.4, {}, T)
    assert routing.decision == Decision.review
    assert routing.reasons[0].startswith("conflict_score 0.85 >= block threshold")
    assert "confidence 0.40 < minimum 0.60" in routing.reasons[-1]


def test_custom_categories_are_validated() -> None:
    ok = validate_custom_categories([{"name": "gambling", "definition": "Promotes betting  or casinos."}])
    assert ok == [{"name": "gambling", "definition": "Promotes betting or casinos."}]
    for bad in (
        [{"name": "Bad Name", "definition": "x y z"}],
        [{"name": "violence", "definition": "duplicate of a built-in"}],
        [{"name": "gambling", "definition": ""}],
        [{"name": "a_b", "definition": "one"}, {"name": "a_b", "definition": "two"}],
    ):
        with pytest.raises(InvalidInput):
            validate_custom_categories(bad)


def test_scores_that_are_not_numbers_go_to_review() -> None:
    thresholds = Thresholds(block_threshold=0.8, allow_threshold=0.3, min_confidence=0.6)
    for conflict, confidence, categories in (
        (0.1, math.nan, {}),
        (0.1, 0.9, {"sexual": math.nan}),
        (math.inf, 0.9, {}),
    ):
        routing = route(conflict, confidence, categories, thresholds)
        assert routing.decision == Decision.review and "not numbers" in routing.reasons[0]
