"""Erasure and retention: a submission's content is blanked, and its image deleted once nothing needs it.

Erasing keeps what a Trust & Safety team must be able to account for (the submission's id, external id,
status, decision, scores, categories, model and times, the review history and the audit trail) and blanks
what the user posted or what describes it: the caption, the metadata, the source URL, the verdict's
description, visible text, explanation and reasons, and the copies of these in stored webhook payloads
(with what receivers answered to them, which may echo them back).
The erased verdict is no longer reused by the verdict cache.

Free text people wrote about the submission goes too: review items' reasons (which quote blocklist and
injection matches), reviewers' notes and the platform's appeal reason, in the review items and in the
audit trail's snapshots. Who did what, and when, stays. Open QA second reviews of the submission are
withdrawn: there is nothing left to check.

Images are content-addressed and shared by every submission of the same bytes, so an erasure only marks
the submission; ``release_erased_images`` (beat's retention run) later deletes an image once no submission
that is not erased refers to it. Both steps are idempotent and resumable: a crash between them leaves
submissions that the next run releases.
"""

from __future__ import annotations

import logging
import random
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from moderation import metrics
from moderation.audit import service as audit
from moderation.audit.repository import AuditRepository
from moderation.blobs import BlobStore
from moderation.config import Settings
from moderation.db import utcnow
from moderation.errors import Conflict, NotFound
from moderation.processing.repository import VerdictCacheRepository
from moderation.review.models import REVIEW_OPEN_STATES, ReviewKind
from moderation.review.repository import ReviewRepository
from moderation.submissions.repository import FINAL_STATUSES, SubmissionRepository
from moderation.tenants.models import Tenant
from moderation.tenants.repository import TenantRepository
from moderation.webhooks.repository import WebhookRepository

logger = logging.getLogger(__name__)

_VERDICT_TEXTS = ("description", "visible_text", "explanation")
#: What erased free text reads afterwards.
ERASED = "(erased)"
#: Keys of audit snapshots that hold free text about a submission.
_AUDIT_FREE_TEXT = ("note", "reason", "appeal_reason")
#: Submissions one erasure or release pass takes.
BATCH = 500


def erase_submission(session: Session, tenant: Tenant, submission_id: uuid.UUID) -> bool:
    """Erase a tenant's submission; False if it already was. Conflict while it is being judged or appealed."""
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
        item.state in REVIEW_OPEN_STATES and item.kind != ReviewKind.qa
        for item in ReviewRepository(session).for_submission(submission.id)
    ):
        raise Conflict(
            "a reviewer is still to decide this submission's appeal; retry after its submission.reviewed "
            "webhook",
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
    return True


def erase_expired(sessions: sessionmaker[Session], settings: Settings, *, limit: int = BATCH) -> int:
    """Erase up to ``limit`` final submissions older than their tenant's retention period; how many were.

    A tenant's own ``retention_days`` overrides ``MODERATION_RETENTION_DAYS`` (0 keeps everything). Every
    tenant with a period gets an equal share of ``limit`` first, then those with more to erase share what
    is left, starting from a different tenant each pass: a tenant with a long backlog (one that has just
    shortened its period) cannot hold the others past their deadlines. Each tenant is erased in a
    transaction of its own, under its period as it is then; one that fails is logged and skipped.
    """
    now = utcnow()
    with sessions() as session:
        periods = TenantRepository(session).retention_days()
    active = [tenant for tenant, own in periods if _period(settings, own) > 0]
    if not active or limit <= 0:
        return 0
    start = random.randrange(len(active))
    active = active[start:] + active[:start]
    share = -(-limit // len(active))
    erased = 0
    more: list[uuid.UUID] = []  # tenants that filled their share
    for tenant_id in active:
        count = _erase_expired_of(sessions, settings, tenant_id, min(share, limit - erased), now)
        erased += count
        if count == share:
            more.append(tenant_id)
        if erased >= limit:
            return erased
    for tenant_id in more:
        erased += _erase_expired_of(sessions, settings, tenant_id, limit - erased, now)
        if erased >= limit:
            break
    return erased


def _period(settings: Settings, own_days: int | None) -> int:
    """A tenant's retention period in days: its own, or the service's default (0: keep everything)."""
    return settings.retention_days if own_days is None else own_days


def _erase_expired_of(
    sessions: sessionmaker[Session], settings: Settings, tenant_id: uuid.UUID, limit: int, now: datetime
) -> int:
    """Erase up to ``limit`` of one tenant's expired submissions; how many were (0 on failure, logged)."""
    try:
        with sessions() as session, session.begin():
            # Read again, and held against a change, so that a period lengthened a moment ago is honoured.
            found = TenantRepository(session).retention_days_of(tenant_id)
            if found is None:
                return 0  # the tenant is gone
            days = _period(settings, found.days)
            if days <= 0:
                return 0
            ids = SubmissionRepository(session).expired_unerased(tenant_id, now - timedelta(days=days), limit)
            _erase(session, ids, now)
    except Exception:
        logger.exception("retention: could not erase the expired submissions of tenant %s", tenant_id)
        return 0
    if ids:
        metrics.SUBMISSIONS_ERASED.labels("retention").inc(len(ids))
        logger.info(
            "retention: erased %d submissions of tenant %s older than %d days", len(ids), tenant_id, days
        )
    return len(ids)


@dataclass
class ReleaseReport:
    """What one pass of ``release_erased_images`` did."""

    submissions: int = 0  # erased submissions whose claim on their image was released
    deleted: int = 0  # images deleted because no submission needs them any more
    failed: int = 0  # images the store could not delete (their submissions stay for the next pass)


def release_erased_images(
    sessions: sessionmaker[Session], blob_store: BlobStore, *, limit: int = BATCH
) -> ReleaseReport:
    """Delete the images of up to ``limit`` erased submissions that nothing else needs.

    Each image is checked and deleted on its own, with no transaction open while the store works: neither
    an erasure nor an appeal waits for the store, and intake has the least time to post the same bytes
    again between the check and the delete. An image the store fails to delete keeps its submissions
    unreleased for the next pass.
    """
    report = ReleaseReport()
    with sessions() as session:
        rows = SubmissionRepository(session).unreleased_images(limit)
    by_digest: dict[str, list[uuid.UUID]] = {}
    for submission_id, digest in rows:
        by_digest.setdefault(digest, []).append(submission_id)
    for digest, ids in by_digest.items():
        with sessions() as session:
            in_use = bool(SubmissionRepository(session).images_in_use([digest]))
        if not in_use:
            try:
                blob_store.delete(digest)
            except Exception as exc:  # one image the store refuses must not hold back the others
                logger.error("could not delete erased image %s: %s; the next pass tries again", digest, exc)
                report.failed += 1
                continue
            report.deleted += 1
            _check_nothing_lost(sessions, digest)
        with sessions() as session, session.begin():
            SubmissionRepository(session).mark_images_released(ids, utcnow())
        report.submissions += len(ids)
    if report.deleted:
        metrics.ERASED_IMAGES_DELETED.inc(report.deleted)
        logger.info("deleted %d images of erased submissions", report.deleted)
    return report


def _check_nothing_lost(sessions: sessionmaker[Session], digest: str) -> None:
    """Say so loudly when the same bytes were posted again while their last copy was being deleted."""
    with sessions() as session:
        if SubmissionRepository(session).images_in_use([digest]):
            metrics.ERASED_IMAGE_RACES.inc()
            logger.error(
                "image %s was posted again while it was being deleted: its new submission will fail with "
                "'image could not be loaded' and has to be posted again",
                digest,
            )


def _erase(session: Session, ids: Sequence[uuid.UUID], now: datetime) -> None:
    if not ids:
        return
    SubmissionRepository(session).erase(ids, now)
    VerdictCacheRepository(session).forget_submissions(ids)
    webhooks = WebhookRepository(session)
    deliveries = webhooks.deliveries_for_submissions(ids)
    for delivery in deliveries:
        delivery.payload = _erased_payload(delivery.payload, now)
    webhooks.forget_responses([delivery.id for delivery in deliveries])
    reviews = ReviewRepository(session)
    for item in reviews.delete_open_qa_items(ids):
        audit.record(
            session,
            "system:erasure",
            "review.qa_withdrawn",
            audit.subject("review_item", item.id),
            {"state": str(item.state), "claimed_by": item.claimed_by},
            None,
            submission_id=item.submission_id,
            tenant_id=item.tenant_id,
        )
    reviews.redact_items_of(ids, ERASED)
    audit_log = AuditRepository(session)
    redacted = [
        (entry.id, _erased_snapshot(entry.before), _erased_snapshot(entry.after))
        for entry in audit_log.for_submissions(ids)
        if _has_free_text(entry.before) or _has_free_text(entry.after)
    ]
    audit_log.redact_snapshots(redacted)


def _erased_payload(payload: dict[str, Any], now: datetime) -> dict[str, Any]:
    """A stored webhook payload with the submission's content blanked as the submission's was."""
    data = dict(payload.get("data") or {})
    data.update(caption="", metadata={}, erased_at=now.isoformat())
    if isinstance(data.get("verdict"), dict):
        data["verdict"] = {**data["verdict"], **dict.fromkeys(_VERDICT_TEXTS, ""), "reasons": []}
    return {**payload, "data": data}


def _has_free_text(snapshot: dict[str, Any] | None) -> bool:
    return snapshot is not None and any(
        snapshot.get(key) not in (None, "", ERASED) for key in _AUDIT_FREE_TEXT
    )


def _erased_snapshot(snapshot: dict[str, Any] | None) -> dict[str, Any] | None:
    """An audit snapshot with its free text replaced."""
    if not snapshot:
        return snapshot
    return {key: ERASED if key in _AUDIT_FREE_TEXT and value else value for key, value in snapshot.items()}
