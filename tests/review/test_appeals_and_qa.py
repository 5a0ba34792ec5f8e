"""Appeals put a final decision back in the queue for someone else; QA samples get a blind second review."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from moderation.audit.models import AuditEntry
from moderation.blobs import LocalBlobStore
from moderation.config import Settings
from moderation.errors import Conflict, NotFound
from moderation.review import reports, service
from moderation.review.models import ReviewDecision, ReviewKind, ReviewState
from moderation.review.repository import ReviewRepository
from moderation.reviewers.models import Role
from moderation.reviewers.schemas import Forbidden, ReviewerRef
from moderation.submissions.models import Submission, SubmissionStatus
from moderation.submissions.service import get_submission, submit
from moderation.tenants.models import Tenant
from moderation.webhooks.models import WebhookDelivery
from tests.conftest import RecordingDispatcher, make_jpeg
from tests.review.helpers import add_review_item, claim_and_decide, make_tenant

ANN = ReviewerRef("ann@example.com", Role.reviewer)
BOB = ReviewerRef("bob@example.com", Role.reviewer)
LEA = ReviewerRef("lea@example.com", Role.lead)


def _deliveries(session: Session, submission_id: uuid.UUID) -> list[WebhookDelivery]:
    return list(
        session.scalars(
            select(WebhookDelivery)
            .where(WebhookDelivery.submission_id == submission_id)
            .order_by(WebhookDelivery.created_at)
        )
    )


def test_an_appeal_is_decided_first_and_by_someone_else(
    session: Session,
    settings: Settings,
    tenant: Tenant,
    blobs: LocalBlobStore,
    dispatched: RecordingDispatcher,
) -> None:
    appealed = add_review_item(session, tenant, blobs, settings, conflict=0.6, seed=1)
    first = claim_and_decide(session, ANN, ReviewDecision.reject, ["scam_fraud"])
    assert first.id == appealed.id
    other = add_review_item(session, tenant, blobs, settings, conflict=0.99, seed=2)
    item = service.appeal(
        session, tenant, appealed.submission_id, "It is a real product, here is the receipt."
    )
    assert item.kind == ReviewKind.appeal and item.excluded_reviewers == ["ann@example.com"]
    assert item.origin_id == first.id and item.priority < other.priority
    out = get_submission(session, tenant, appealed.submission_id)
    assert out.status == "in_review" and out.final_decision == "block"
    # Ann decided the original: the appeal is not offered to her; Bob gets it before the riskier item.
    ann_next = service.claim_next(session, ANN, 600)
    assert ann_next is not None and ann_next.id == other.id
    decided = claim_and_decide(session, BOB, ReviewDecision.approve)
    assert decided.id == item.id
    out = get_submission(session, tenant, appealed.submission_id)
    assert out.status == "reviewed" and out.final_decision == "allow"
    assert out.review is not None and out.review.decision == "approve" and out.review.state == "decided"
    assert "bob@example.com" not in out.model_dump_json()
    deliveries = _deliveries(session, appealed.submission_id)
    assert [d.event_type for d in deliveries] == ["submission.reviewed", "submission.reviewed"]
    assert deliveries[-1].payload["data"]["final_decision"] == "allow"
    with pytest.raises(Conflict, match="already appealed"):
        service.appeal(session, tenant, appealed.submission_id)
    entry = session.scalars(select(AuditEntry).where(AuditEntry.action == "submission.appeal")).one()
    assert entry.actor == f"tenant:{tenant.name}" and entry.before == {
        "status": "reviewed",
        "final_decision": "block",
    }


def test_only_final_submissions_of_the_tenant_can_be_appealed(
    session: Session, settings: Settings, tenant: Tenant, blobs: LocalBlobStore
) -> None:
    queued = submit(
        session, tenant, image=make_jpeg(32, 32), caption="hi", blob_store=blobs, settings=settings
    ).submission
    with pytest.raises(Conflict, match="queued"):
        service.appeal(session, tenant, queued.id)
    in_review = add_review_item(session, tenant, blobs, settings, seed=3)
    with pytest.raises(Conflict, match="in_review"):
        service.appeal(session, tenant, in_review.submission_id)
    stranger = make_tenant(session, settings)
    with pytest.raises(NotFound):
        service.appeal(session, stranger, queued.id)
    # A model decision (no reviewer before) can be appealed too; nobody is excluded.
    queued.status = SubmissionStatus.decided
    session.flush()
    item = service.appeal(session, tenant, queued.id)
    assert item.excluded_reviewers == [] and item.origin_id is None


def test_qa_second_reviews_are_blind_internal_and_measured(
    session: Session,
    settings: Settings,
    tenant: Tenant,
    blobs: LocalBlobStore,
    dispatched: RecordingDispatcher,
) -> None:
    for seed in range(4):
        add_review_item(session, tenant, blobs, settings, conflict=0.5 + seed / 10, seed=seed)
    firsts = [
        claim_and_decide(session, ANN, ReviewDecision.reject, ["spam"]),
        claim_and_decide(session, ANN, ReviewDecision.reject, ["spam", "scam_fraud"]),
        claim_and_decide(session, ANN, ReviewDecision.approve),
        claim_and_decide(session, BOB, ReviewDecision.approve),
    ]
    with pytest.raises(Forbidden):
        service.sample_for_qa(session, ANN, 5)
    sampled = service.sample_for_qa(session, LEA, 10)
    assert len(sampled) == 4 and {s.origin_id for s in sampled} == {f.id for f in firsts}
    assert all(s.kind == ReviewKind.qa and s.priority == service.QA_PRIORITY for s in sampled)
    assert service.sample_for_qa(session, LEA, 10) == []
    deliveries_before = len(session.scalars(select(WebhookDelivery)).all())
    # Bob cannot second-review his own decision; he gets Ann's three.
    by_origin = {f.id: f for f in firsts}
    bob_done = []
    while (item := service.claim_next(session, BOB, 600)) is not None:
        assert item.lease_token is not None and item.origin_id is not None
        origin = by_origin[item.origin_id]
        assert origin.decided_by == "ann@example.com"
        flip = origin.decision == ReviewDecision.approve
        decision = ReviewDecision.reject if flip else origin.decision
        assert decision is not None
        cats = ["spam"] if decision == ReviewDecision.reject else None
        bob_done.append(
            service.decide(
                session,
                item.id,
                reviewer=BOB,
                lease_token=item.lease_token,
                decision=decision,
                categories=cats,
            )
        )
    assert len(bob_done) == 3
    last = claim_and_decide(session, ANN, ReviewDecision.approve)
    assert last.kind == ReviewKind.qa and by_origin[last.origin_id].decided_by == "bob@example.com"  # type: ignore[index]
    # QA decisions change neither the submission nor what the tenant sees, and send no webhooks.
    assert len(session.scalars(select(WebhookDelivery)).all()) == deliveries_before
    for first in firsts:
        submission = session.get(Submission, first.submission_id)
        assert submission is not None and submission.final_decision == (
            "block" if first.decision == "reject" else "allow"
        )
        latest = ReviewRepository(session).latest_for_submissions([first.submission_id])[first.submission_id]
        assert latest.id == first.id
    report = reports.qa_agreement(session, LEA)
    assert report.pairs == 4 and report.agreement == pytest.approx(3 / 4)
    assert report.confusion.both_block == 2 and report.confusion.a_allow_b_block == 1
    assert report.confusion.both_allow == 1 and report.kappa is not None
    assert report.category_overlap == pytest.approx((1 + 0.5) / 2)
    by_reviewer = {r.reviewer: (r.checked, r.agreed) for r in report.by_reviewer}
    assert by_reviewer == {"ann@example.com": (3, 2), "bob@example.com": (1, 1)}
    assert all(s.state == ReviewState.decided for s in sampled)
