"""Claiming review items under a lease and recording reviewers' decisions."""

from __future__ import annotations

import uuid
from datetime import timedelta

from sqlalchemy.orm import Session

from moderation.db import utcnow
from moderation.errors import Conflict, InvalidInput, NotFound
from moderation.review.models import ReviewDecision, ReviewItem, ReviewState
from moderation.review.repository import ReviewRepository
from moderation.submissions.models import Decision, SubmissionStatus
from moderation.submissions.repository import SubmissionRepository
from moderation.webhooks.models import WebhookEvent
from moderation.webhooks.service import emit_submission_event

FINAL_DECISIONS = {ReviewDecision.approve: Decision.allow, ReviewDecision.reject: Decision.block}
ESCALATION_PRIORITY_BOOST = 50


def claim_next(
    session: Session, reviewer: str, lease_seconds: int, *, escalated: bool = False
) -> ReviewItem | None:
    """Lease the most urgent free item to a reviewer (SKIP LOCKED: two reviewers never get the same item)."""
    now = utcnow()
    states = [ReviewState.escalated] if escalated else [ReviewState.pending]
    item = ReviewRepository(session).next_claimable(now, states)
    if item is None:
        return None
    item.details = {**(item.details or {}), "escalated": item.state == ReviewState.escalated or escalated}
    item.state = ReviewState.claimed
    item.claimed_by = reviewer
    item.lease_token = uuid.uuid4()
    item.lease_expires_at = now + timedelta(seconds=lease_seconds)
    session.flush()
    return item


def decide(
    session: Session,
    item_id: uuid.UUID,
    *,
    reviewer: str,
    lease_token: uuid.UUID,
    decision: ReviewDecision,
    categories: list[str] | None = None,
    note: str | None = None,
) -> ReviewItem:
    """Record a reviewer's decision; refused when the reviewer's lease was taken over by someone else."""
    repo = ReviewRepository(session)
    item = repo.get(item_id, for_update=True)
    if item is None:
        raise NotFound("review item not found", code="review_item_not_found")
    if item.state != ReviewState.claimed or item.lease_token != lease_token or item.claimed_by != reviewer:
        raise Conflict("this item is no longer claimed by you; claim it again", code="review_lease_lost")
    if note is not None and len(note) > 2000:
        raise InvalidInput("note is longer than 2000 characters", code="invalid_note")
    now = utcnow()
    item.claimed_by = None
    item.lease_token = None
    item.lease_expires_at = None
    if decision == ReviewDecision.escalate:
        item.state = ReviewState.escalated
        item.priority = max(0, item.priority - ESCALATION_PRIORITY_BOOST)
        item.note = note
        item.details = {**(item.details or {}), "escalated_by": reviewer, "escalated_at": now.isoformat()}
        session.flush()
        return item
    item.state = ReviewState.decided
    item.decision = decision
    item.categories = sorted(set(categories or []))
    item.note = note
    item.decided_by = reviewer
    item.decided_at = now
    submissions = SubmissionRepository(session)
    submission = submissions.get(item.submission_id)
    assert submission is not None
    submission.status = SubmissionStatus.reviewed
    submission.final_decision = FINAL_DECISIONS[decision]
    session.flush()
    emit_submission_event(session, WebhookEvent.submission_reviewed, submission, item)
    return item
