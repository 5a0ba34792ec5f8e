"""Builders of realistic review-queue contents for tests: a tenant, submissions, verdicts and items."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy.orm import Session

from moderation.blobs import BlobStore
from moderation.config import Settings
from moderation.db import new_id, utcnow
from moderation.engine.prompts import DEFAULT_CATEGORIES
from moderation.processing.service import review_priority
from moderation.review import service
from moderation.review.models import ReviewDecision, ReviewItem, ReviewState
from moderation.reviewers.schemas import ReviewerRef
from moderation.submissions.models import Decision, SubmissionStatus, Verdict
from moderation.submissions.service import submit
from moderation.tenants.models import Tenant
from moderation.tenants.service import create_tenant
from moderation.webhooks.models import WebhookEndpoint
from tests.conftest import make_jpeg


def make_tenant(
    session: Session, settings: Settings, name: str | None = None, *, hook: str | None = None
) -> Tenant:
    """A tenant, subscribed to ``submission.reviewed`` at ``hook`` when given."""
    tenant = create_tenant(session, name or f"t-{uuid.uuid4().hex[:8]}", settings).tenant
    if hook:
        session.add(
            WebhookEndpoint(
                tenant_id=tenant.id, url=hook, events=["submission.reviewed"], secret="whsec_AAAAAAAAAAAAAAAA"
            )
        )
        session.flush()
    return tenant


def add_review_item(
    session: Session,
    tenant: Tenant,
    blob_store: BlobStore,
    settings: Settings,
    *,
    caption: str = "caption",
    conflict: float = 0.5,
    scores: dict[str, float] | None = None,
    image: bytes | None = None,
    external_id: str | None = None,
    description: str = "A photo.",
    visible_text: str = "",
    explanation: str = "The model was unsure.",
    seed: int = 0,
) -> ReviewItem:
    """A submission judged ``review`` by the model, with its verdict and a pending review item."""
    submission = submit(
        session,
        tenant,
        image=image or make_jpeg(64, 48, seed=seed),
        caption=caption,
        blob_store=blob_store,
        settings=settings,
        external_id=external_id,
    ).submission
    category_scores = {c.name: 0.02 for c in DEFAULT_CATEGORIES}
    category_scores.update(scores or {})
    categories: list[dict[str, Any]] = [{"name": k, "score": v} for k, v in category_scores.items()]
    submission.status = SubmissionStatus.in_review
    session.add(
        Verdict(
            id=new_id(),
            submission_id=submission.id,
            decision=Decision.review,
            conflict_score=conflict,
            confidence=0.4,
            categories=categories,
            description=description,
            visible_text=visible_text,
            explanation=explanation,
            reasons=[f"conflict_score {conflict:.2f} lies between the thresholds"],
            model_name="Qwen/Qwen3-VL-8B-Instruct",
            model_revision="test",
            prompt_version="test",
            inference_ms=120.0,
            decided_at=utcnow(),
        )
    )
    item = ReviewItem(
        id=new_id(),
        submission_id=submission.id,
        tenant_id=tenant.id,
        state=ReviewState.pending,
        priority=review_priority(conflict, category_scores),
        reason=f"conflict_score {conflict:.2f} lies between the thresholds",
        categories=[],
        details={},
    )
    session.add(item)
    session.flush()
    return item


def claim_and_decide(
    session: Session,
    who: ReviewerRef,
    decision: ReviewDecision,
    categories: list[str] | None = None,
    note: str | None = None,
) -> ReviewItem:
    """``who`` claims the next item of the queue and decides it."""
    item = service.claim_next(session, who, 600)
    assert item is not None and item.lease_token is not None
    return service.decide(
        session,
        item.id,
        reviewer=who,
        lease_token=item.lease_token,
        decision=decision,
        categories=categories,
        note=note,
    )
