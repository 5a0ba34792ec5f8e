"""Builders of submissions in their final states for tests."""

from __future__ import annotations

from sqlalchemy.orm import Session

from moderation.blobs import BlobStore
from moderation.config import Settings
from moderation.db import new_id, utcnow
from moderation.processing.models import VerdictCacheEntry
from moderation.submissions import service
from moderation.submissions.models import Decision, Submission, SubmissionStatus, Verdict
from moderation.submissions.repository import SubmissionRepository
from moderation.tenants.models import Tenant
from moderation.webhooks.models import WebhookEvent
from moderation.webhooks.service import emit_submission_event
from tests.conftest import make_jpeg


def add_decided(
    session: Session,
    tenant: Tenant,
    store: BlobStore,
    settings: Settings,
    *,
    image: bytes | None = None,
    caption: str = "my holiday in Lisbon",
    status: SubmissionStatus = SubmissionStatus.decided,
) -> Submission:
    """A submission the model decided (allow), with its verdict, a cache entry and a webhook delivery."""
    submission = service.submit(
        session,
        tenant,
        image=image or make_jpeg(64, 48, seed=1),
        caption=caption,
        metadata='{"user": "u-42"}',
        blob_store=store,
        settings=settings,
    ).submission
    submission.status = status
    if status != SubmissionStatus.queued:
        submission.final_decision = Decision.allow
        verdict = Verdict(
            id=new_id(),
            submission_id=submission.id,
            decision=Decision.allow,
            conflict_score=0.1,
            confidence=0.9,
            categories=[{"name": "spam", "score": 0.02}],
            description="A beach at sunset with two people.",
            visible_text="LISBOA 2026",
            explanation="The caption matches the photo.",
            reasons=[
                "conflict_score 0.10 is at most the allow threshold",
                f"blocklist: term 'lisbon' matched in caption (\"{caption[-6:]}\")",
            ],
            model_name="fixture",
            model_revision="test",
            prompt_version="test",
            inference_ms=10.0,
            decided_at=utcnow(),
        )
        session.add(verdict)
        session.flush()
        session.add(
            VerdictCacheEntry(
                verdict_id=verdict.id,
                tenant_id=tenant.id,
                cache_key=f"key-{submission.id}",
                created_at=utcnow(),
            )
        )
    session.flush()
    loaded = SubmissionRepository(session).get(submission.id, fresh=True)
    assert loaded is not None
    if status != SubmissionStatus.queued:
        emit_submission_event(session, WebhookEvent.submission_decided, loaded)
    session.flush()
    return loaded
