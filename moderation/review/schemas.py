"""JSON shapes of the review queue, its items, decisions and reports."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field

from moderation.review.models import ReviewItem
from moderation.submissions.models import Submission
from moderation.submissions.schemas import SubmissionOut
from moderation.text import StorableText


class ReviewItemOut(BaseModel):
    """A review item; ``lease_token`` is shown only to the reviewer holding it."""

    id: uuid.UUID
    submission_id: uuid.UUID
    tenant_id: uuid.UUID
    tenant: str | None = None
    kind: str
    state: str
    escalated: bool
    priority: int
    reason: str
    claimed_by: str | None
    assigned_to: str | None
    lease_token: uuid.UUID | None
    lease_expires_at: datetime | None
    decision: str | None
    categories: list[str]
    note: str | None
    decided_by: str | None
    decided_at: datetime | None
    created_at: datetime
    origin_id: uuid.UUID | None
    image_url: str
    submission: SubmissionOut | None = None

    @classmethod
    def from_model(
        cls,
        item: ReviewItem,
        *,
        viewer: str | None = None,
        submission: Submission | None = None,
        tenant: str | None = None,
        redact: bool = False,
    ) -> ReviewItemOut:
        """Build from the ORM row, revealing the lease token only to its holder.

        ``redact`` hides the human decisions a blind QA second review must not see: this item's decision,
        note and decider, the item it checks, and the submission's final decision.
        """
        out = cls(
            id=item.id,
            submission_id=item.submission_id,
            tenant_id=item.tenant_id,
            tenant=tenant,
            kind=str(item.kind),
            state=str(item.state),
            escalated=item.escalated,
            priority=item.priority,
            reason=item.reason,
            claimed_by=item.claimed_by,
            assigned_to=item.assigned_to,
            lease_token=item.lease_token if viewer is not None and viewer == item.claimed_by else None,
            lease_expires_at=item.lease_expires_at,
            decision=str(item.decision) if item.decision else None,
            categories=list(item.categories or []),
            note=item.note,
            decided_by=item.decided_by,
            decided_at=item.decided_at,
            created_at=item.created_at,
            origin_id=item.origin_id,
            image_url=f"/v1/review/submissions/{item.submission_id}/image",
            submission=SubmissionOut.from_model(submission) if submission is not None else None,
        )
        if not redact:
            return out
        hidden = out.model_copy(
            update={
                "decision": None,
                "categories": [],
                "note": None,
                "decided_by": None,
                "decided_at": None,
                "origin_id": None,
            }
        )
        if hidden.submission is not None:
            hidden.submission = hidden.submission.model_copy(update={"review": None, "final_decision": None})
        return hidden


class ClaimIn(BaseModel):
    """Which queue to claim from: the reviewers' queue, or the leads' escalations."""

    queue: Literal["review", "escalations"] = "review"


class LeaseIn(BaseModel):
    """The lease token of a claimed item."""

    lease_token: uuid.UUID


class DecisionIn(BaseModel):
    """A reviewer's decision on an item they hold."""

    lease_token: uuid.UUID
    decision: Literal["approve", "reject", "escalate"]
    categories: list[str] = Field(default_factory=list, max_length=40)
    note: str | None = Field(default=None, max_length=2000)


class ReassignIn(BaseModel):
    """Hand an open item to another reviewer (leads)."""

    to: str = Field(min_length=3, max_length=320)
    note: str | None = Field(default=None, max_length=2000)


class AppealIn(BaseModel):
    """A tenant's appeal of a decision."""

    reason: StorableText | None = Field(default=None, max_length=2000)


class QaSampleIn(BaseModel):
    """How many decided items to send for a second review, from the last ``days`` days."""

    count: int = Field(default=20, ge=1, le=500)
    days: int = Field(default=30, ge=1, le=365)
    tenant_id: uuid.UUID | None = None


class QueueOverview(BaseModel):
    """What the queue looks like right now."""

    pending: int
    claimed: int
    escalated: int
    appeals: int
    qa: int
    open_total: int
    decided_24h: int
    decided_24h_by_decision: dict[str, int]
    oldest_age_seconds: float | None
    by_category: dict[str, int]


class Confusion(BaseModel):
    """A 2×2 confusion matrix of one rater (rows) against another (columns)."""

    both_block: int = 0
    a_block_b_allow: int = 0
    a_allow_b_block: int = 0
    both_allow: int = 0

    @property
    def total(self) -> int:
        """All pairs."""
        return self.both_block + self.a_block_b_allow + self.a_allow_b_block + self.both_allow

    @property
    def agreement(self) -> float | None:
        """Share of pairs where both agree."""
        return (self.both_block + self.both_allow) / self.total if self.total else None

    @property
    def kappa(self) -> float | None:
        """Cohen's kappa: agreement beyond what chance would give."""
        n = self.total
        if not n:
            return None
        observed = (self.both_block + self.both_allow) / n
        a_block = (self.both_block + self.a_block_b_allow) / n
        b_block = (self.both_block + self.a_allow_b_block) / n
        expected = a_block * b_block + (1 - a_block) * (1 - b_block)
        return 1.0 if expected == 1 else (observed - expected) / (1 - expected)


class CategoryAgreement(BaseModel):
    """How the model's category scores line up with reviewers' reject categories."""

    name: str
    true_positive: int
    false_positive: int
    false_negative: int
    true_negative: int
    precision: float | None
    recall: float | None
    agreement: float | None

    @property
    def flagged(self) -> bool:
        """Whether the model or a reviewer flagged this category at least once."""
        return bool(self.true_positive or self.false_positive or self.false_negative)


class ThresholdPoint(BaseModel):
    """Routing thresholds and what they would have done on the labelled items."""

    allow_threshold: float
    block_threshold: float
    review_share: float
    error_rate: float
    errors: int


class ThresholdSuggestion(BaseModel):
    """For one tenant: its thresholds, and the ones that review least at no higher error rate."""

    tenant: str
    labeled: int
    current: ThresholdPoint
    suggested: ThresholdPoint | None
    note: str


class ModelAgreementReport(BaseModel):
    """Model versus reviewer over a period: confusion matrix, per category, and threshold suggestions."""

    days: int
    labeled: int
    confusion: Confusion
    agreement: float | None
    kappa: float | None
    categories: list[CategoryAgreement]
    thresholds: list[ThresholdSuggestion]


class ReviewerAgreement(BaseModel):
    """How often QA second reviews agreed with one reviewer's decisions."""

    reviewer: str
    checked: int
    agreed: int


class QaReport(BaseModel):
    """Agreement between reviewers on QA second reviews."""

    days: int
    pairs: int
    confusion: Confusion
    agreement: float | None
    kappa: float | None
    category_overlap: float | None
    by_reviewer: list[ReviewerAgreement]
    open_qa_items: int
