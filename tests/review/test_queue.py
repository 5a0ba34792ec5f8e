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
from moderation.review.repository import ReviewRepository
from moderation.reviewers.models import Role
from moderation.reviewers.schemas import Forbidden, ReviewerRef
from moderation.reviewers.service import create_reviewer, update_reviewer
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


def test_items_of_a_reviewer_who_leaves_or_is_demoted_go_back_to_the_queue(
    session: Session,
    settings: Settings,
    tenant: Tenant,
    blobs: LocalBlobStore,
    dispatched: RecordingDispatcher,
) -> None:
    dan = create_reviewer(session, "dan@example.com", "reviewer", "dan's long password")
    lea = create_reviewer(session, "lea@example.com", "lead", "lea's long password")
    assigned = add_review_item(session, tenant, blobs, settings, conflict=0.6, seed=1)
    escalation = add_review_item(session, tenant, blobs, settings, conflict=0.7, seed=2)
    held = service.claim_next(session, ANN, 600)
    assert held is not None and held.id == escalation.id and held.lease_token is not None
    service.decide(
        session, held.id, reviewer=ANN, lease_token=held.lease_token, decision=ReviewDecision.escalate
    )
    service.reassign(session, assigned.id, actor=LEA, to="dan@example.com")
    lea_item = service.claim_next(session, LEA, 600, escalated=True)
    assert lea_item is not None and lea_item.id == escalation.id and lea_item.lease_token is not None
    # Nobody else is offered Dan's item while he is active.
    assert service.claim_next(session, BOB, 600) is None
    update_reviewer(session, dan, actor="admin@example.com", active=False)
    offered = service.claim_next(session, BOB, 600)
    assert offered is not None and offered.id == assigned.id and offered.assigned_to is None
    # A lead demoted while holding an escalation can neither keep it nor renew it: it goes back to the leads.
    update_reviewer(session, lea, actor="admin@example.com", role="reviewer")
    back = session.get(ReviewItem, escalation.id)
    assert back is not None and back.state == ReviewState.escalated and back.claimed_by is None
    with pytest.raises(Conflict):
        service.renew(
            session,
            escalation.id,
            reviewer=ReviewerRef("lea@example.com", Role.reviewer),
            lease_token=lea_item.lease_token,
            lease_seconds=600,
        )
    actions = {(e.action, e.actor) for e in session.scalars(select(AuditEntry))}
    assert ("review.hand_back", "admin@example.com") in actions


def test_an_assignment_to_a_reviewer_deactivated_without_a_hand_back_does_not_strand_the_item(
    session: Session,
    settings: Settings,
    tenant: Tenant,
    blobs: LocalBlobStore,
    dispatched: RecordingDispatcher,
) -> None:
    dan = create_reviewer(session, "dan@example.com", "reviewer", "dan's long password")
    item = add_review_item(session, tenant, blobs, settings, seed=3)
    service.reassign(session, item.id, actor=LEA, to="dan@example.com")
    dan.active = False  # as an account disabled before hand-backs existed
    session.flush()
    offered = service.claim_next(session, BOB, 600)
    assert offered is not None and offered.id == item.id


def test_a_reviewer_who_only_skipped_an_appeal_can_still_be_assigned_it(
    session: Session,
    settings: Settings,
    tenant: Tenant,
    blobs: LocalBlobStore,
    dispatched: RecordingDispatcher,
) -> None:
    create_reviewer(session, "bob@example.com", "reviewer", "bob's long password")
    create_reviewer(session, "ann@example.com", "reviewer", "ann's long password")
    add_review_item(session, tenant, blobs, settings, seed=4)
    first = service.claim_next(session, ANN, 600)
    assert first is not None and first.lease_token is not None
    service.decide(
        session,
        first.id,
        reviewer=ANN,
        lease_token=first.lease_token,
        decision=ReviewDecision.reject,
        categories=["spam"],
    )
    appeal = service.appeal(session, tenant, first.submission_id, "not spam")
    taken = service.claim_next(session, BOB, 600)
    assert taken is not None and taken.id == appeal.id and taken.lease_token is not None
    service.release(session, appeal.id, reviewer=BOB, lease_token=taken.lease_token, skip=True)
    assert service.claim_next(session, BOB, 600) is None  # a skip still stops it being offered to Bob
    service.reassign(session, appeal.id, actor=LEA, to="bob@example.com")  # but a lead may hand it to him
    with pytest.raises(InvalidInput, match="decided this before"):
        service.reassign(session, appeal.id, actor=LEA, to="ann@example.com")
    again = service.claim_next(session, BOB, 600)
    assert again is not None and again.id == appeal.id and again.lease_token is not None
    done = service.decide(
        session, appeal.id, reviewer=BOB, lease_token=again.lease_token, decision=ReviewDecision.approve
    )
    assert done.state == ReviewState.decided


def test_an_idle_screen_cannot_renew_its_lease_forever(
    session: Session,
    settings: Settings,
    tenant: Tenant,
    blobs: LocalBlobStore,
    dispatched: RecordingDispatcher,
) -> None:
    add_review_item(session, tenant, blobs, settings, seed=5)
    held = service.claim_next(session, ANN, 600)
    assert held is not None and held.lease_token is not None and held.claimed_at is not None
    renewed = service.renew(
        session, held.id, reviewer=ANN, lease_token=held.lease_token, lease_seconds=600, max_hold_seconds=3600
    )
    assert renewed.lease_expires_at is not None
    held.claimed_at = utcnow() - timedelta(hours=2)  # the screen has renewed it every two minutes since
    session.flush()
    with pytest.raises(Conflict) as refused:
        service.renew(
            session,
            held.id,
            reviewer=ANN,
            lease_token=held.lease_token,
            lease_seconds=600,
            max_hold_seconds=3600,
        )
    assert refused.value.code == "review_hold_expired"
    # Claiming again is deliberate: the reviewer is back at the screen, and a new hold starts.
    again = service.claim_next(session, ANN, 600)
    assert again is not None and again.id == held.id and again.lease_token is not None
    service.renew(
        session,
        held.id,
        reviewer=ANN,
        lease_token=again.lease_token,
        lease_seconds=600,
        max_hold_seconds=3600,
    )


def test_an_unfiltered_listing_shows_the_live_queue_before_decided_items(
    session: Session,
    settings: Settings,
    tenant: Tenant,
    blobs: LocalBlobStore,
    dispatched: RecordingDispatcher,
) -> None:
    create_reviewer(session, "bob@example.com", "reviewer", "bob's long password")
    first = add_review_item(session, tenant, blobs, settings, conflict=0.9, seed=6)
    waiting = add_review_item(session, tenant, blobs, settings, conflict=0.4, seed=7)
    held = service.claim_next(session, ANN, 600)
    assert held is not None and held.id == first.id and held.lease_token is not None
    service.decide(
        session,
        held.id,
        reviewer=ANN,
        lease_token=held.lease_token,
        decision=ReviewDecision.reject,
        categories=["spam"],
    )
    appeal = service.appeal(session, tenant, first.submission_id, "not spam")
    taken = service.claim_next(session, BOB, 600)
    assert taken is not None and taken.id == appeal.id and taken.lease_token is not None
    service.decide(
        session, appeal.id, reviewer=BOB, lease_token=taken.lease_token, decision=ReviewDecision.approve
    )
    listed = [item for item, _ in ReviewRepository(session).list_page()]
    assert [i.id for i in listed] == [waiting.id, appeal.id, first.id]  # open first; then newest decision
