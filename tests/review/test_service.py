"""Claiming review items under leases and deciding them."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from moderation.blobs import LocalBlobStore
from moderation.config import Settings
from moderation.db import new_id, utcnow
from moderation.errors import Conflict
from moderation.review.models import ReviewDecision, ReviewItem, ReviewState
from moderation.review.service import claim_next, decide
from moderation.submissions.models import Submission, SubmissionStatus
from moderation.submissions.service import submit
from moderation.tenants.service import create_tenant
from moderation.webhooks.models import WebhookDelivery, WebhookEndpoint
from tests.conftest import RecordingDispatcher, make_jpeg


def _queue(
    sessions: sessionmaker[Session], settings: Settings, tmp_path, priorities: list[int]
) -> list[uuid.UUID]:  # type: ignore[no-untyped-def]
    ids = []
    with sessions() as session, session.begin():
        tenant = create_tenant(session, f"t-{uuid.uuid4().hex[:6]}", settings).tenant
        session.add(
            WebhookEndpoint(
                tenant_id=tenant.id,
                url="https://h.example/x",
                events=["submission.reviewed"],
                secret="whsec_AAAA",
            )
        )
        for i, priority in enumerate(priorities):
            sub = submit(
                session,
                tenant,
                image=make_jpeg(32, 32, seed=i),
                caption=f"c{i}",
                blob_store=LocalBlobStore(tmp_path),
                settings=settings,
            ).submission
            sub.status = SubmissionStatus.in_review
            item = ReviewItem(
                id=new_id(),
                submission_id=sub.id,
                tenant_id=tenant.id,
                priority=priority,
                state=ReviewState.pending,
            )
            session.add(item)
            session.flush()
            ids.append(item.id)
    return ids


def test_claims_follow_priority_and_decisions_finish_the_submission(
    sessions: sessionmaker[Session], settings: Settings, dispatched: RecordingDispatcher, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    low, high = _queue(sessions, settings, tmp_path, [90, 10])
    with sessions() as session, session.begin():
        first = claim_next(session, "ann@example.com", 600)
        assert first is not None and first.id == high
        second = claim_next(session, "bob@example.com", 600)
        assert second is not None and second.id == low
        assert claim_next(session, "cy@example.com", 600) is None
        decided = decide(
            session,
            first.id,
            reviewer="ann@example.com",
            lease_token=first.lease_token,  # type: ignore[arg-type]
            decision=ReviewDecision.reject,
            categories=["scam_fraud"],
            note="fake product",
        )
        assert decided.state == ReviewState.decided
        submission = session.get(Submission, decided.submission_id)
        assert submission is not None
        assert submission.status == SubmissionStatus.reviewed and submission.final_decision == "block"
        delivery = session.scalars(select(WebhookDelivery)).one()
        assert delivery.event_type == "submission.reviewed"
        assert delivery.payload["data"]["review"]["decision"] == "reject"
        assert delivery.payload["data"]["review"]["final_decision"] == "block"


def test_a_decision_after_takeover_is_refused(
    sessions: sessionmaker[Session], settings: Settings, dispatched: RecordingDispatcher, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    (only,) = _queue(sessions, settings, tmp_path, [50])
    with sessions() as session, session.begin():
        mine = claim_next(session, "ann@example.com", 600)
        assert mine is not None
        token = mine.lease_token
        mine.lease_expires_at = utcnow() - timedelta(seconds=1)
        session.flush()
        theirs = claim_next(session, "bob@example.com", 600)
        assert theirs is not None and theirs.id == only and theirs.claimed_by == "bob@example.com"
        with pytest.raises(Conflict):
            decide(
                session, only, reviewer="ann@example.com", lease_token=token, decision=ReviewDecision.approve
            )  # type: ignore[arg-type]
        escalated = decide(
            session,
            only,
            reviewer="bob@example.com",
            lease_token=theirs.lease_token,
            decision=ReviewDecision.escalate,  # type: ignore[arg-type]
        )
        assert escalated.state == ReviewState.escalated and escalated.priority == 0
        assert claim_next(session, "cy@example.com", 600) is None
        lead = claim_next(session, "lead@example.com", 600, escalated=True)
        assert lead is not None and lead.id == only
