"""Erasure and retention: a submission's content is blanked, and its image deleted once nothing needs it.

Erasing keeps what a Trust & Safety team must be able to account for (the submission's id, external id,
status, decision, scores, categories, model and times, the review history and the audit trail) and blanks
what the user posted or what describes it: the caption, the metadata, the source URL, the verdict's
description, visible text, explanation and reasons, and the copies of these in stored webhook payloads.
The erased verdict is no longer reused by the verdict cache.

Images are content-addressed and shared by every submission of the same bytes, so an erasure only marks
the submission; ``release_erased_images`` later deletes an image once no submission that is not erased
refers to it. Both steps are idempotent and resumable: a crash between them leaves submissions that the
next run releases.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from moderation import metrics
from moderation.audit import service as audit
from moderation.blobs import BlobStore, BlobStoreError
from moderation.config import Settings
from moderation.db import utcnow
from moderation.errors import Conflict, NotFound
from moderation.jobs import QUEUE_MAINTENANCE, TASK_RELEASE_IMAGES, Job, enqueue_after_commit
from moderation.processing.repository import VerdictCacheRepository
from moderation.review.models import REVIEW_OPEN_STATES
from moderation.review.repository import ReviewRepository
from moderation.submissions.repository import FINAL_STATUSES, SubmissionRepository
from moderation.tenants.models import Tenant
from moderation.webhooks.repository import WebhookRepository

logger = logging.getLogger(__name__)

_VERDICT_TEXTS = ("description", "visible_text", "explanation")
#: Submissions one erasure or release pass takes in one transaction.
BATCH = 500


def release_images_job() -> Job:
    """The maintenance job that deletes the images erased submissions no longer need."""
    return Job(TASK_RELEASE_IMAGES, (), QUEUE_MAINTENANCE)


def erase_submission(session: Session, tenant: Tenant, submission_id: uuid.UUID) -> bool:
    """Erase a tenant's submission; False if it already was. Conflict while it is not final or under review."""
    repo = SubmissionRepository(session)
    submission = repo.get_for_update(submission_id, tenant.id)
    if submission is None:
        raise NotFound("submission not found", code="submission_not_found")
    if submission.erased_at is not None:
        return False
    if submission.status not in FINAL_STATUSES:
        raise Conflict(
            f"a submission can be erased once it is decided, reviewed or failed (this one is "
            f"{submission.status}); retry after its webhook",
            code="submission_not_final",
        )
    if any(
        item.state in REVIEW_OPEN_STATES for item in ReviewRepository(session).for_submission(submission.id)
    ):
        raise Conflict(
            "a reviewer is still to decide this submission (an appeal or a quality check); retry after the "
            "submission.reviewed webhook",
            code="submission_under_review",
        )
    now = utcnow()
    _erase(session, [submission.id], now)
    audit.record(
        session,
        f"tenant:{tenant.name}",
        "submission.erase",
        audit.subject("submission", submission.id),
        None,
        {"erased_at": now.isoformat()},
        submission_id=submission.id,
        tenant_id=tenant.id,
    )
    enqueue_after_commit(session, release_images_job())
    return True


def erase_expired(sessions: sessionmaker[Session], settings: Settings, *, limit: int = BATCH) -> int:
    """Erase up to ``limit`` final submissions older than the retention period; how many were erased."""
    if settings.retention_days <= 0:
        return 0
    now = utcnow()
    with sessions() as session, session.begin():
        ids = SubmissionRepository(session).expired_unerased(
            now - timedelta(days=settings.retention_days), limit
        )
        _erase(session, ids, now)
        if ids:
            enqueue_after_commit(session, release_images_job())
    if ids:
        metrics.SUBMISSIONS_ERASED.labels("retention").inc(len(ids))
        logger.info("retention: erased %d submissions older than %d days", len(ids), settings.retention_days)
    return len(ids)


def release_erased_images(
    sessions: sessionmaker[Session], blob_store: BlobStore, *, limit: int = BATCH
) -> int:
    """Delete the images of up to ``limit`` erased submissions that nothing else needs; how many were deleted.

    An image that a submission not erased still refers to stays. An image the store fails to delete keeps
    its submissions unreleased, so a later run tries again.
    """
    deleted = 0
    with sessions() as session, session.begin():
        repo = SubmissionRepository(session)
        rows = repo.unreleased_images(limit)
        digests = sorted({digest for _, digest in rows})
        in_use = repo.images_in_use(digests)
        failed: set[str] = set()
        for digest in digests:
            if digest in in_use:
                continue
            try:
                blob_store.delete(digest)
            except BlobStoreError as exc:
                logger.error("could not delete erased image %s: %s; the next run tries again", digest, exc)
                failed.add(digest)
                continue
            deleted += 1
        repo.mark_images_released([sid for sid, digest in rows if digest not in failed], utcnow())
    if deleted:
        metrics.ERASED_IMAGES_DELETED.inc(deleted)
        logger.info("deleted %d images of erased submissions", deleted)
    return deleted


def _erase(session: Session, ids: Sequence[uuid.UUID], now: datetime) -> None:
    if not ids:
        return
    SubmissionRepository(session).erase(ids, now)
    VerdictCacheRepository(session).forget_submissions(ids)
    for delivery in WebhookRepository(session).deliveries_for_submissions(ids):
        delivery.payload = _erased_payload(delivery.payload, now)


def _erased_payload(payload: dict[str, Any], now: datetime) -> dict[str, Any]:
    """A stored webhook payload with the submission's content blanked as the submission's was."""
    data = dict(payload.get("data") or {})
    data.update(caption="", metadata={}, erased_at=now.isoformat())
    if isinstance(data.get("verdict"), dict):
        data["verdict"] = {**data["verdict"], **dict.fromkeys(_VERDICT_TEXTS, "")}
    return {**payload, "data": data}
