"""Queue operations beyond claim and decide: resume, release, skip, expiry, escalation, reassignment."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from moderation.audit.models import AuditEntry
from moderation.blobs import LocalBlobStore
from moderation.config import Settings
from moderation.db import utcnow
from moderation.errors import Conflict, InvalidInput
from moderation.review import service
from moderation.review.models import ReviewDecision, ReviewItem, ReviewState
from moderation.reviewers.models import Role
from moderation.reviewers.schemas import Forbidden, ReviewerRef
from moderation.reviewers.service import create_reviewer
from moderation.submissions.models import Submission, SubmissionStatus
from moderation.tenants.models import Tenant
from tests.conftest import RecordingDispatcher
from tests.review.helpers import add_review_item

ANN = ReviewerRef("ann@example.com", Role.reviewer)
BOB = ReviewerRef("bob@example.com", Role.reviewer)
LEA = ReviewerRef("lea@example.com", Role.lead)


def _audit(session: Session, item: ReviewItem) -> list[tuple[str, str]]:
    rows = session.execute(
        select(AuditEntry.actor, AuditEntry.action)
        .where(AuditEntry.subject_type == "review_item", AuditEntry.subject_id == str(item.id))
        .order_by(AuditEntry.at, AuditEntry.id)
    )
    return [(a, b) for a, b in rows]


def test_claiming_again_resumes_the_held_item_and_renews_its_lease(
    session: Session, settings: Settings, tenant: Tenant, blobs: LocalBlobStore
) -> None:
    add_review_item(session, tenant, blobs, settings, conflict=0.5, seed=1)
    add_review_item(session, tenant, blobs, settings, conflict=0.6, seed=2)
    first = service.claim_next(session, ANN, 60)
    assert first is not None
    token, expires = first.lease_token, first.lease_expires_at
    again = service.claim_next(session, ANN, 600)
    assert again is not None and again.id == first.id and again.lease_token == token
    assert again.lease_expires_at is not None and expires is not None and again.lease_expires_at > expires
    assert token is not None
    resumed_until = again.lease_expires_at
    renewed = service.renew(session, first.id, reviewer=ANN, lease_token=token, lease_seconds=900)
    assert renewed.lease_expires_at is not None and renewed.lease_expires_at > resumed_until
    assert _audit(session, first) == [("ann@example.com", "review.claim")]


def test_release_returns_the_item_and_skip_hands_it_to_someone_else(
    session: Session, settings: Settings, tenant: Tenant, blobs: LocalBlobStore
) -> None:
    only = add_review_item(session, tenant, blobs, settings)
    item = service.claim_next(session, ANN, 600)
    assert item is not None and item.lease_token is not None
    service.release(session, item.id, reviewer=ANN, lease_token=item.lease_token)
    assert item.state == ReviewState.pending and item.claimed_by is None
    item = service.claim_next(session, ANN, 600)
    assert item is not None and item.id == only.id and item.lease_token is not None
    service.release(session, item.id, reviewer=ANN, lease_token=item.lease_token, skip=True)
    assert item.excluded_reviewers == ["ann@example.com"]
    assert service.claim_next(session, ANN, 600) is None
    theirs = service.claim_next(session, BOB, 600)
    assert theirs is not None and theirs.id == only.id
    with pytest.raises(Conflict):
        service.release(session, only.id, reviewer=ANN, lease_token=item.lease_token)
    assert [a for _, a in _audit(session, only)] == [
        "review.claim",
        "review.release",
        "review.claim",
        "review.skip",
        "review.claim",
    ]


def test_expired_leases_return_items_to_their_queue(
    session: Session,
    settings: Settings,
    tenant: Tenant,
    blobs: LocalBlobStore,
    dispatched: RecordingDispatcher,
) -> None:
    normal = add_review_item(session, tenant, blobs, settings, conflict=0.5, seed=1)
    urgent = add_review_item(session, tenant, blobs, settings, conflict=0.9, seed=2)
    mine = service.claim_next(session, ANN, 600)
    assert mine is not None and mine.id == urgent.id and mine.lease_token is not None
    service.decide(
        session,
        mine.id,
        reviewer=ANN,
        lease_token=mine.lease_token,
        decision=ReviewDecision.escalate,
        note="?",
    )
    lead_claim = service.claim_next(session, LEA, 600, escalated=True)
    assert lead_claim is not None and lead_claim.id == urgent.id
    bob_claim = service.claim_next(session, BOB, 600)
    assert bob_claim is not None and bob_claim.id == normal.id
    past = utcnow() - timedelta(seconds=1)
    lead_claim.lease_expires_at = past
    bob_claim.lease_expires_at = past
    session.flush()
    # An expired escalation is not up for grabs in the reviewers' queue, only in the leads'.
    assert service.claim_next(session, ANN, 600) is not None
    session.refresh(bob_claim)
    assert bob_claim.claimed_by == "ann@example.com"
    ann_token = bob_claim.lease_token
    bob_claim.lease_expires_at = past
    session.flush()
    assert service.release_expired_leases(session) == 2
    session.refresh(urgent)
    session.refresh(normal)
    assert urgent.state == ReviewState.escalated and urgent.claimed_by is None
    assert normal.state == ReviewState.pending
    # The lease expired but nobody took the item over: its holder may still decide it... after claiming again.
    assert ann_token is not None
    with pytest.raises(Conflict):
        service.decide(
            session, normal.id, reviewer=ANN, lease_token=ann_token, decision=ReviewDecision.approve
        )
    with pytest.raises(Forbidden):
        service.claim_next(session, ANN, 600, escalated=True)
    assert ("ann@example.com", "review.takeover") in _audit(session, normal)


def test_a_holder_whose_lease_expired_may_decide_until_someone_takes_over(
    session: Session,
    settings: Settings,
    tenant: Tenant,
    blobs: LocalBlobStore,
    dispatched: RecordingDispatcher,
) -> None:
    add_review_item(session, tenant, blobs, settings)
    item = service.claim_next(session, ANN, 600)
    assert item is not None and item.lease_token is not None
    item.lease_expires_at = utcnow() - timedelta(seconds=5)
    session.flush()
    decided = service.decide(
        session, item.id, reviewer=ANN, lease_token=item.lease_token, decision=ReviewDecision.approve
    )
    assert decided.state == ReviewState.decided


def test_decisions_need_valid_categories_and_escalations_need_leads(
    session: Session,
    settings: Settings,
    tenant: Tenant,
    blobs: LocalBlobStore,
    dispatched: RecordingDispatcher,
) -> None:
    add_review_item(session, tenant, blobs, settings)
    item = service.claim_next(session, ANN, 600)
    assert item is not None and item.lease_token is not None
    token = item.lease_token
    with pytest.raises(InvalidInput, match="at least one category"):
        service.decide(session, item.id, reviewer=ANN, lease_token=token, decision=ReviewDecision.reject)
    with pytest.raises(InvalidInput, match="unknown categories"):
        service.decide(
            session,
            item.id,
            reviewer=ANN,
            lease_token=token,
            decision=ReviewDecision.reject,
            categories=["nope"],
        )
    assert item.state == ReviewState.claimed and item.lease_token == token
    service.decide(
        session,
        item.id,
        reviewer=ANN,
        lease_token=token,
        decision=ReviewDecision.escalate,
        categories=["violence"],
        note="looks like a weapon?",
    )
    assert item.escalated and item.state == ReviewState.escalated
    lead_item = service.claim_next(session, LEA, 600, escalated=True)
    assert lead_item is not None and lead_item.lease_token is not None
    with pytest.raises(InvalidInput):
        service.decide(
            session,
            item.id,
            reviewer=LEA,
            lease_token=lead_item.lease_token,
            decision=ReviewDecision.escalate,
        )
    service.decide(
        session,
        item.id,
        reviewer=LEA,
        lease_token=lead_item.lease_token,
        decision=ReviewDecision.reject,
        categories=["violence", "weapons"],
    )
    submission = session.get(Submission, item.submission_id)
    assert submission is not None and submission.status == SubmissionStatus.reviewed
    assert submission.final_decision == "block" and item.decided_by == "lea@example.com"
    assert [a for _, a in _audit(session, item)] == [
        "review.claim",
        "review.escalate",
        "review.claim",
        "review.decide",
    ]


def test_leads_reassign_items_and_the_previous_holder_loses_them(
    session: Session,
    settings: Settings,
    tenant: Tenant,
    blobs: LocalBlobStore,
    dispatched: RecordingDispatcher,
) -> None:
    create_reviewer(session, "bob@example.com", "reviewer", "bob's long password")
    create_reviewer(session, "lea@example.com", "lead", "lea's long password")
    urgent = add_review_item(session, tenant, blobs, settings, conflict=0.95, seed=1)
    calm = add_review_item(session, tenant, blobs, settings, conflict=0.4, seed=2)
    mine = service.claim_next(session, ANN, 600)
    assert mine is not None and mine.id == urgent.id and mine.lease_token is not None
    with pytest.raises(Forbidden):
        service.reassign(session, calm.id, actor=ANN, to="bob@example.com")
    with pytest.raises(InvalidInput):
        service.reassign(session, calm.id, actor=LEA, to="nobody@example.com")
    service.reassign(session, calm.id, actor=LEA, to="bob@example.com", note="Bob knows this seller")
    # Nobody else gets an item assigned to Bob, even when the queue is otherwise empty.
    assert service.claim_next(session, ReviewerRef("cy@example.com"), 600) is None
    service.reassign(session, urgent.id, actor=LEA, to="BOB@example.com")
    with pytest.raises(Conflict):
        service.decide(
            session, urgent.id, reviewer=ANN, lease_token=mine.lease_token, decision=ReviewDecision.approve
        )
    first = service.claim_next(session, BOB, 600)
    assert first is not None and first.id == urgent.id and first.assigned_to is None
    entry = session.scalars(
        select(AuditEntry).where(
            AuditEntry.action == "review.reassign", AuditEntry.subject_id == str(urgent.id)
        )
    ).one()
    assert entry.actor == "lea@example.com"
    assert entry.before is not None and entry.before["claimed_by"] == "ann@example.com"
    assert entry.after is not None and entry.after["assigned_to"] == "bob@example.com"
    # Escalations only go to leads.
    assert first.lease_token is not None
    service.decide(
        session, first.id, reviewer=BOB, lease_token=first.lease_token, decision=ReviewDecision.escalate
    )
    with pytest.raises(InvalidInput, match="leads"):
        service.reassign(session, urgent.id, actor=LEA, to="bob@example.com")
    service.reassign(session, urgent.id, actor=LEA, to="lea@example.com")
    lead_item = service.claim_next(session, LEA, 600, escalated=True)
    assert lead_item is not None and lead_item.id == urgent.id
