"""The public JSON shapes of submissions and verdicts (API v1)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from moderation.review.models import ReviewItem, ReviewState
from moderation.submissions.models import Submission, Verdict


class CategoryScore(BaseModel):
    """A policy category and the model's score for it."""

    name: str
    score: float = Field(ge=0.0, le=1.0)


class ModelRef(BaseModel):
    """Which model and prompt produced a verdict."""

    model_config = ConfigDict(protected_namespaces=())

    name: str
    revision: str
    prompt_version: str


class VerdictOut(BaseModel):
    """The explanatory verdict of the model."""

    decision: str
    conflict_score: float = Field(ge=0.0, le=1.0)
    confidence: float = Field(ge=0.0, le=1.0)
    categories: list[CategoryScore]
    description: str
    visible_text: str
    explanation: str
    reasons: list[str]
    model: ModelRef
    decided_at: datetime

    @classmethod
    def from_model(cls, verdict: Verdict) -> VerdictOut:
        """Build from the ORM row."""
        return cls(
            decision=str(verdict.decision),
            conflict_score=verdict.conflict_score,
            confidence=verdict.confidence,
            categories=[CategoryScore(**c) for c in verdict.categories],
            description=verdict.description,
            visible_text=verdict.visible_text,
            explanation=verdict.explanation,
            reasons=list(verdict.reasons or []),
            model=ModelRef(
                name=verdict.model_name,
                revision=verdict.model_revision,
                prompt_version=verdict.prompt_version,
            ),
            decided_at=verdict.decided_at,
        )


class ReviewOut(BaseModel):
    """The human review of a submission, as its tenant sees it: the outcome, never who or internal notes.

    Reviewers' identities and notes (an escalation's "looping in legal", say) stay inside the review tool;
    ``state`` is ``open`` until a decision exists (claimed and escalated are internal states).
    """

    state: str
    decision: str | None
    final_decision: str | None
    categories: list[str]
    decided_at: datetime | None

    @classmethod
    def from_model(cls, item: ReviewItem) -> ReviewOut:
        """Build from the ORM row."""
        decided = item.state == ReviewState.decided
        final = {"approve": "allow", "reject": "block"}.get(str(item.decision)) if decided else None
        return cls(
            state="decided" if decided else "open",
            decision=str(item.decision) if decided and item.decision else None,
            final_decision=final,
            categories=list(item.categories or []) if decided else [],
            decided_at=item.decided_at if decided else None,
        )


class SubmissionAccepted(BaseModel):
    """The answer to an accepted submission."""

    id: uuid.UUID
    status: str
    created_at: datetime


class SubmissionOut(BaseModel):
    """A submission as the tenant sees it."""

    id: uuid.UUID
    external_id: str | None
    status: str
    caption: str
    metadata: dict[str, Any]
    image: dict[str, Any]
    verdict: VerdictOut | None
    review: ReviewOut | None
    final_decision: str | None
    error: str | None
    #: When the platform (or the retention period) had its content erased.
    erased_at: datetime | None = None
    created_at: datetime
    updated_at: datetime

    @classmethod
    def from_model(cls, submission: Submission, review: ReviewItem | None = None) -> SubmissionOut:
        """Build from the ORM row, its verdict and its latest review item."""
        return cls(
            id=submission.id,
            external_id=submission.external_id,
            status=str(submission.status),
            caption=submission.caption,
            metadata=submission.metadata_ or {},
            image={
                "sha256": submission.image_sha256,
                "format": submission.image_format,
                "width": submission.image_width,
                "height": submission.image_height,
                "bytes": submission.image_bytes,
            },
            verdict=VerdictOut.from_model(submission.verdict) if submission.verdict else None,
            review=ReviewOut.from_model(review) if review else None,
            final_decision=str(submission.final_decision) if submission.final_decision else None,
            error=submission.last_error if str(submission.status) == "failed" else None,
            erased_at=submission.erased_at,
            created_at=submission.created_at,
            updated_at=submission.updated_at,
        )


class SubmissionPage(BaseModel):
    """A page of submissions and the cursor of the next page."""

    data: list[SubmissionOut]
    next_cursor: str | None
