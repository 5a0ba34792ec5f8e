"""The human-review queue: leased claims, decisions, skips, reassignment, appeals, QA and reports.

Every action is written to the audit log in the same transaction as the change it describes. A reviewer
is given as a ``ReviewerRef`` (email and role, checked) or a bare email (a trusted internal caller).
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.orm import Session

from moderation.audit import service as audit
from moderation.blobs import BlobStore
from moderation.db import new_id, utcnow
from moderation.errors import Conflict, InvalidInput, NotFound
from moderation.policy.categories import categories_for
from moderation.review import queries
from moderation.review.models import ReviewDecision, ReviewItem, ReviewKind, ReviewState
from moderation.review.repository import ReviewRepository
from moderation.reviewers.models import Reviewer, Role
from moderation.reviewers.repository import ReviewerRepository
from moderation.reviewers.schemas import ReviewerRef
from moderation.submissions.models import Decision, SubmissionStatus
from moderation.submissions.repository import SubmissionRepository
from moderation.tenants.models import Tenant
from moderation.tenants.repository import TenantRepository
from moderation.webhooks.models import WebhookEvent
from moderation.webhooks.service import emit_submission_event

FINAL_DECISIONS = {ReviewDecision.approve: Decision.allow, ReviewDecision.reject: Decision.block}
ESCALATION_PRIORITY_BOOST = 50
APPEAL_PRIORITY = 5
QA_PRIORITY = 200
MAX_NOTE_CHARS = 2000

ReviewerLike = ReviewerRef | Reviewer | str


def _snapshot(item: ReviewItem) -> dict[str, Any]:
    return audit.jsonable(
        {
            "state": item.state,
            "escalated": item.escalated,
            "priority": item.priority,
            "claimed_by": item.claimed_by,
            "assigned_to": item.assigned_to,
            "lease_expires_at": item.lease_expires_at,
            "decision": item.decision,
            "categories": list(item.categories or []),
            "note": item.note,
            "decided_by": item.decided_by,
        }
    )


def _record(
    session: Session,
    actor: str,
    action: str,
    item: ReviewItem,
    before: dict[str, Any] | None,
    extra: dict[str, Any] | None = None,
) -> None:
    after = _snapshot(item)
    if before is not None:
        before, after = audit.changed(before, after)
    audit.record(
        session,
        actor,
        action,
        audit.subject("review_item", item.id),
        before,
        {**after, **(extra or {})},
        submission_id=item.submission_id,
        tenant_id=item.tenant_id,
    )


def _get(session: Session, item_id: uuid.UUID) -> ReviewItem:
    item = ReviewRepository(session).get(item_id, for_update=True)
    if item is None:
        raise NotFound("review item not found", code="review_item_not_found")
    return item


def _previous_deciders(item: ReviewItem) -> list[str]:
    """Who made the decision an appeal or QA item checks: they may not decide it (a skip is no decision)."""
    details = item.details or {}
    if "previous_deciders" in details:
        return list(details["previous_deciders"])
    return list(item.excluded_reviewers or [])  # items made before deciders were recorded apart


def _clear_claim(item: ReviewItem) -> None:
    """Forget who holds the item and their lease."""
    item.claimed_by = None
    item.claimed_at = None
    item.lease_token = None
    item.lease_expires_at = None


def _back_to_queue(item: ReviewItem) -> None:
    """Return the item unclaimed to its queue (escalated ones to the leads')."""
    item.state = ReviewState.escalated if item.escalated else ReviewState.pending
    _clear_claim(item)


def _holding(item: ReviewItem, reviewer: str, lease_token: uuid.UUID) -> None:
    if item.state != ReviewState.claimed or item.lease_token != lease_token or item.claimed_by != reviewer:
        raise Conflict("this item is no longer claimed by you; claim it again", code="review_lease_lost")


def claim_next(
    session: Session, reviewer: ReviewerLike, lease_seconds: int, *, escalated: bool = False
) -> ReviewItem | None:
    """Lease the most urgent free item to a reviewer (SKIP LOCKED: two reviewers never get the same item).

    A reviewer who already holds a live lease in that queue gets that item back, with the lease renewed;
    items a lead assigned to them come next, then the queue by priority and age.
    """
    ref = ReviewerRef.of(reviewer)
    if escalated:
        ref.require(Role.lead, "handle escalations")
    now = utcnow()
    repo = ReviewRepository(session)
    held = repo.held_by(ref.email, now, escalated=escalated)
    if held is not None:
        held.lease_expires_at = now + timedelta(seconds=lease_seconds)
        held.claimed_at = now  # claiming is deliberate: a new hold starts
        session.flush()
        return held
    item = repo.next_claimable(now, escalated=escalated, reviewer=ref.email, assigned=True)
    if item is None:
        item = repo.next_claimable(now, escalated=escalated, reviewer=ref.email)
    if item is None:
        return None
    before = _snapshot(item)
    took_over = item.state == ReviewState.claimed
    item.state = ReviewState.claimed
    item.claimed_by = ref.email
    item.claimed_at = now
    item.assigned_to = None
    item.lease_token = uuid.uuid4()
    item.lease_expires_at = now + timedelta(seconds=lease_seconds)
    session.flush()
    _record(session, ref.email, "review.takeover" if took_over else "review.claim", item, before)
    return item


def renew(
    session: Session,
    item_id: uuid.UUID,
    *,
    reviewer: ReviewerLike,
    lease_token: uuid.UUID,
    lease_seconds: int,
    max_hold_seconds: float | None = None,
) -> ReviewItem:
    """Extend the lease of an item the reviewer still holds (a review screen left open keeps its item).

    Renewals stop ``max_hold_seconds`` after the claim: a screen left open and idle must not keep an item
    from everyone else forever (claiming it again, a deliberate act, starts a new hold).
    """
    ref = ReviewerRef.of(reviewer)
    item = _get(session, item_id)
    _holding(item, ref.email, lease_token)
    now = utcnow()
    held_for = now - item.claimed_at if item.claimed_at is not None else timedelta(0)
    if max_hold_seconds is not None and held_for > timedelta(seconds=max_hold_seconds):
        raise Conflict(
            f"you have held this item for over {max_hold_seconds / 60:g} minutes; claim it again to go on",
            code="review_hold_expired",
        )
    if item.escalated:
        # Whoever may no longer decide it (demoted since the claim) must not keep it from the leads.
        ref.require(Role.lead, "hold escalated items")
    item.lease_expires_at = now + timedelta(seconds=lease_seconds)
    session.flush()
    return item


def release(
    session: Session,
    item_id: uuid.UUID,
    *,
    reviewer: ReviewerLike,
    lease_token: uuid.UUID,
    skip: bool = False,
) -> ReviewItem:
    """Give a held item back to its queue; a skip also stops it being offered to this reviewer again."""
    ref = ReviewerRef.of(reviewer)
    item = _get(session, item_id)
    _holding(item, ref.email, lease_token)
    before = _snapshot(item)
    _back_to_queue(item)
    if skip and ref.email not in (item.excluded_reviewers or []):
        item.excluded_reviewers = [*(item.excluded_reviewers or []), ref.email]
    session.flush()
    _record(session, ref.email, "review.skip" if skip else "review.release", item, before)
    return item


def _validate_categories(session: Session, item: ReviewItem, categories: list[str]) -> list[str]:
    tenant = TenantRepository(session).get(item.tenant_id)
    known = {c.name for c in categories_for(tenant)} if tenant is not None else set()
    unknown = sorted(set(categories) - known)
    if unknown:
        raise InvalidInput(f"unknown categories {unknown}; known: {sorted(known)}", code="invalid_categories")
    return sorted(set(categories))


def decide(
    session: Session,
    item_id: uuid.UUID,
    *,
    reviewer: ReviewerLike,
    lease_token: uuid.UUID,
    decision: ReviewDecision,
    categories: list[str] | None = None,
    note: str | None = None,
) -> ReviewItem:
    """Record a reviewer's decision; refused when the reviewer's lease was taken over by someone else.

    Approve or reject makes the submission ``reviewed`` with its final decision and sends
    ``submission.reviewed``; escalate hands the item to the leads. A QA second review only records its
    decision, for the agreement report.
    """
    ref = ReviewerRef.of(reviewer)
    decision = ReviewDecision(decision)
    item = _get(session, item_id)
    _holding(item, ref.email, lease_token)
    if ref.email in _previous_deciders(item) and item.kind != ReviewKind.review:
        raise Conflict("a different reviewer must decide this item", code="review_needs_other_reviewer")
    if item.escalated:
        ref.require(Role.lead, "decide escalated items")
    if note is not None:
        note = note.strip() or None
        if note is not None and len(note) > MAX_NOTE_CHARS:
            raise InvalidInput(f"note is longer than {MAX_NOTE_CHARS} characters", code="invalid_note")
    chosen = _validate_categories(session, item, list(categories or []))
    if decision == ReviewDecision.reject and not chosen:
        raise InvalidInput("a rejection needs at least one category", code="categories_required")
    if decision == ReviewDecision.escalate and (item.escalated or item.kind == ReviewKind.qa):
        raise InvalidInput("this item cannot be escalated further", code="cannot_escalate")
    before = _snapshot(item)
    now = utcnow()
    _clear_claim(item)
    if decision == ReviewDecision.escalate:
        item.state = ReviewState.escalated
        item.escalated = True
        item.priority = max(0, item.priority - ESCALATION_PRIORITY_BOOST)
        item.note = note
        item.categories = chosen
        item.details = {**(item.details or {}), "escalated_by": ref.email, "escalated_at": now.isoformat()}
        session.flush()
        _record(session, ref.email, "review.escalate", item, before)
        return item
    item.state = ReviewState.decided
    item.decision = decision
    item.categories = chosen if decision == ReviewDecision.reject else []
    item.note = note
    item.decided_by = ref.email
    item.decided_at = now
    session.flush()
    _record(session, ref.email, "review.decide", item, before, {"kind": item.kind})
    if item.kind == ReviewKind.qa:
        return item
    submission = SubmissionRepository(session).get(item.submission_id)
    assert submission is not None
    sub_before = {"status": submission.status, "final_decision": submission.final_decision}
    submission.status = SubmissionStatus.reviewed
    submission.final_decision = FINAL_DECISIONS[decision]
    session.flush()
    audit.record(
        session,
        ref.email,
        "submission.reviewed",
        audit.subject("submission", submission.id),
        audit.jsonable(sub_before),
        audit.jsonable({"status": submission.status, "final_decision": submission.final_decision}),
        submission_id=submission.id,
        tenant_id=submission.tenant_id,
    )
    emit_submission_event(session, WebhookEvent.submission_reviewed, submission, item)
    return item


def reassign(
    session: Session, item_id: uuid.UUID, *, actor: ReviewerLike, to: str, note: str | None = None
) -> ReviewItem:
    """Hand an open item to another reviewer (leads); any current holder loses the lease."""
    ref = ReviewerRef.of(actor)
    ref.require(Role.lead, "reassign items")
    item = _get(session, item_id)
    if item.state not in (ReviewState.pending, ReviewState.claimed, ReviewState.escalated):
        raise Conflict("only open items can be reassigned", code="review_item_closed")
    target = ReviewerRepository(session).by_email(to.strip().lower())
    if target is None or not target.active:
        raise InvalidInput(f"no active reviewer {to}", code="reviewer_not_found")
    if item.escalated and not ReviewerRef.of(target).can(Role.lead):
        raise InvalidInput("escalated items go to leads or admins", code="reviewer_not_lead")
    if target.email in _previous_deciders(item) and item.kind != ReviewKind.review:
        raise InvalidInput(f"{target.email} decided this before; pick someone else", code="reviewer_excluded")
    before = _snapshot(item)
    _back_to_queue(item)
    item.assigned_to = target.email
    item.excluded_reviewers = [r for r in (item.excluded_reviewers or []) if r != target.email]
    session.flush()
    _record(session, ref.email, "review.reassign", item, before, {"note": note} if note else None)
    return item


def appeal(
    session: Session, tenant: Tenant, submission_id: uuid.UUID, reason: str | None = None
) -> ReviewItem:
    """A tenant appeals a final decision: the submission goes back to the queue, first in line.

    Whoever made the decision being appealed cannot decide the appeal. A submission is appealed once.
    """
    submissions = SubmissionRepository(session)
    submission = submissions.get(submission_id, tenant_id=tenant.id)
    if submission is None:
        raise NotFound("submission not found", code="submission_not_found")
    session.refresh(submission, with_for_update=True)
    if submission.erased_at is not None:
        raise Conflict("an erased submission cannot be appealed", code="submission_erased")
    if submission.status not in (SubmissionStatus.decided, SubmissionStatus.reviewed):
        raise Conflict(
            f"only decided or reviewed submissions can be appealed (this one is {submission.status})",
            code="not_appealable",
        )
    repo = ReviewRepository(session)
    history = repo.for_submission(submission.id)
    if any(i.kind == ReviewKind.appeal for i in history):
        raise Conflict("this submission was already appealed", code="already_appealed")
    if reason is not None:
        reason = " ".join(reason.split()) or None
        if reason is not None and len(reason) > MAX_NOTE_CHARS:
            raise InvalidInput(f"reason is longer than {MAX_NOTE_CHARS} characters", code="invalid_reason")
    previous = next(
        (i for i in reversed(history) if i.kind != ReviewKind.qa and i.state == ReviewState.decided), None
    )
    before = {"status": submission.status, "final_decision": submission.final_decision}
    item = repo.add(
        ReviewItem(
            id=new_id(),
            submission_id=submission.id,
            tenant_id=tenant.id,
            kind=ReviewKind.appeal,
            state=ReviewState.pending,
            priority=APPEAL_PRIORITY,
            reason="appeal" + (f": {reason}" if reason else ""),
            categories=[],
            excluded_reviewers=[previous.decided_by] if previous and previous.decided_by else [],
            origin_id=previous.id if previous else None,
            details={
                "appeal_reason": reason,
                "appealed_decision": str(submission.final_decision or ""),
                "previous_deciders": [previous.decided_by] if previous and previous.decided_by else [],
            },
        )
    )
    submission.status = SubmissionStatus.in_review
    session.flush()
    audit.record(
        session,
        f"tenant:{tenant.name}",
        "submission.appeal",
        audit.subject("submission", submission.id),
        audit.jsonable(before),
        {"status": "in_review", "review_item": str(item.id), "reason": reason},
        submission_id=submission.id,
        tenant_id=tenant.id,
    )
    return item


def view_image(
    session: Session, blob_store: BlobStore, submission_id: uuid.UUID, viewer: ReviewerLike
) -> tuple[bytes, str]:
    """A submission's image for a reviewer, its viewing recorded in the audit trail (who saw what, when)."""
    data, content_type = queries.submission_image(session, blob_store, submission_id)
    submission = ReviewRepository(session).submissions([submission_id])[submission_id]
    audit.record(
        session,
        ReviewerRef.of(viewer).email,
        "submission.view_image",
        audit.subject("submission", submission_id),
        submission_id=submission_id,
        tenant_id=submission.tenant_id,
    )
    return data, content_type


def sample_for_qa(
    session: Session, actor: ReviewerLike, count: int, *, days: int = 30, tenant_id: uuid.UUID | None = None
) -> list[ReviewItem]:
    """Send a random sample of recent human decisions for a blind second review by someone else (leads)."""
    ref = ReviewerRef.of(actor)
    ref.require(Role.lead, "sample items for QA")
    if not 1 <= count <= 500:
        raise InvalidInput("count must be between 1 and 500", code="invalid_count")
    repo = ReviewRepository(session)
    originals = repo.sample_for_qa(count, since=utcnow() - timedelta(days=days), tenant_id=tenant_id)
    # Share-locked until commit: an erasure cannot slip in between this check and the new QA items.
    unerased = repo.unerased_submissions_locked([o.submission_id for o in originals])
    created = []
    for original in [o for o in originals if o.submission_id in unerased]:
        qa = repo.add(
            ReviewItem(
                id=new_id(),
                submission_id=original.submission_id,
                tenant_id=original.tenant_id,
                kind=ReviewKind.qa,
                state=ReviewState.pending,
                priority=QA_PRIORITY,
                reason="QA second review",
                categories=[],
                excluded_reviewers=[original.decided_by] if original.decided_by else [],
                origin_id=original.id,
                details={
                    "sampled_by": ref.email,
                    "previous_deciders": [original.decided_by] if original.decided_by else [],
                },
            )
        )
        _record(session, ref.email, "review.qa_sample", qa, None, {"origin_id": str(original.id)})
        created.append(qa)
    return created


def hand_back_items_of(session: Session, reviewer: Reviewer, *, actor: str) -> list[ReviewItem]:
    """Give back the open items a reviewer holds or was assigned that they may no longer work on.

    A deactivated reviewer keeps none; one who is no longer a lead keeps no escalations. Without this an
    item assigned to them would never be offered to anyone else.
    """
    ref = ReviewerRef.of(reviewer)
    handed: list[ReviewItem] = []
    for item in ReviewRepository(session).open_items_of(ref.email):
        if reviewer.active and not (item.escalated and not ref.can(Role.lead)):
            continue
        before = _snapshot(item)
        if item.claimed_by == ref.email:
            _back_to_queue(item)
        if item.assigned_to == ref.email:
            item.assigned_to = None
        session.flush()
        _record(session, actor, "review.hand_back", item, before, {"reviewer": ref.email})
        handed.append(item)
    return handed


def release_expired_leases(
    session: Session, now: datetime | None = None, actor: str = "system:sweeper"
) -> int:
    """Return items whose lease expired to their queue, each release audited; how many."""
    released = ReviewRepository(session).release_expired(now or utcnow())
    for item_id, submission_id, tenant_id, holder in released:
        audit.record(
            session,
            actor,
            "review.lease_expired",
            audit.subject("review_item", item_id),
            {"claimed_by": holder},
            {"claimed_by": None},
            submission_id=submission_id,
            tenant_id=tenant_id,
        )
    return len(released)
