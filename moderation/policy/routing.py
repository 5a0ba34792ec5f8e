"""Turning engine scores into a decision, per the tenant's thresholds."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from moderation.submissions.models import Decision


@dataclass(frozen=True)
class Thresholds:
    """A tenant's routing thresholds."""

    block_threshold: float
    allow_threshold: float
    min_confidence: float
    category_block_threshold: float = 0.95
    category_review_threshold: float = 0.6


@dataclass(frozen=True)
class Routing:
    """The decision and the reasons that led to it."""

    decision: Decision
    reasons: list[str] = field(default_factory=list)


def route(
    conflict_score: float, confidence: float, category_scores: dict[str, float], thresholds: Thresholds
) -> Routing:
    """Decide allow / block / review from the conflict score, confidence and category scores."""
    unusable = [
        name
        for name, value in (
            ("conflict_score", conflict_score),
            ("confidence", confidence),
            *category_scores.items(),
        )
        if not math.isfinite(value)
    ]
    if unusable:  # every comparison with NaN is false: it would read as "nothing to worry about"
        return Routing(
            Decision.review, [f"scores that are not numbers ({', '.join(unusable)}): sent to review"]
        )
    reasons: list[str] = []
    blocking = sorted(
        (name for name, score in category_scores.items() if score >= thresholds.category_block_threshold)
    )
    risky = sorted(
        name
        for name, score in category_scores.items()
        if thresholds.category_review_threshold <= score < thresholds.category_block_threshold
    )
    if conflict_score >= thresholds.block_threshold:
        reasons.append(
            f"conflict_score {conflict_score:.2f} >= block threshold {thresholds.block_threshold:.2f}"
        )
        decision = Decision.block
    elif conflict_score <= thresholds.allow_threshold:
        reasons.append(
            f"conflict_score {conflict_score:.2f} <= allow threshold {thresholds.allow_threshold:.2f}"
        )
        decision = Decision.allow
    else:
        reasons.append(f"conflict_score {conflict_score:.2f} lies between the thresholds")
        decision = Decision.review
    if blocking:
        reasons.append(f"category score >= {thresholds.category_block_threshold:.2f}: {', '.join(blocking)}")
        decision = Decision.block
    elif risky and decision == Decision.allow:
        reasons.append(f"category score >= {thresholds.category_review_threshold:.2f}: {', '.join(risky)}")
        decision = Decision.review
    if decision != Decision.review and confidence < thresholds.min_confidence:
        reasons.append(f"confidence {confidence:.2f} < minimum {thresholds.min_confidence:.2f}")
        decision = Decision.review
    return Routing(decision=decision, reasons=reasons)
