"""Judging submissions in batches under a lease, and sweeping up work that was lost."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from datetime import timedelta

from PIL import Image
from sqlalchemy.orm import Session, sessionmaker

from moderation import metrics
from moderation.blobs import BlobStore
from moderation.config import Settings
from moderation.db import new_id, utcnow
from moderation.engine.base import (
    BatchPartlyFailed,
    EngineRequest,
    EngineResult,
    ModelInfo,
    ModerationEngine,
)
from moderation.errors import NotFound
from moderation.jobs import Job, enqueue_after_commit
from moderation.policy.blocklist import Blocklist
from moderation.policy.categories import categories_for
from moderation.policy.decision import (
    POLICY_MODEL_NAME,
    POLICY_RULES_VERSION,
    KnownImageMatch,
    PolicyVerdict,
    after_engine,
    before_engine,
)
from moderation.policy.perceptual import image_hashes
from moderation.policy.repository import KnownImageRepository
from moderation.policy.routing import Thresholds
from moderation.policy.service import blocklist_for, find_known_image
from moderation.processing.models import VerdictCacheEntry
from moderation.processing.repository import VerdictCacheRepository
from moderation.review.models import ReviewItem, ReviewState
from moderation.review.repository import ReviewRepository
from moderation.review.service import release_expired_leases
from moderation.submissions.models import Decision, ProcessingAttempt, Submission, SubmissionStatus, Verdict
from moderation.submissions.repository import FencedMove, SubmissionRepository
from moderation.submissions.service import process_job
from moderation.submissions.structure import ImageStructureError, check_jpeg
from moderation.tenants.models import Tenant
from moderation.tenants.repository import TenantRepository
from moderation.webhooks.models import WebhookEndpoint, WebhookEvent
from moderation.webhooks.repository import WebhookRepository
from moderation.webhooks.service import delivery_job, emit_submission_event

logger = logging.getLogger(__name__)

MAX_ERROR_CHARS = 2000

#: Error code at the start of ``last_error`` of a submission whose stored image cannot be decoded.
IMAGE_UNDECODABLE = "image_undecodable"


class _UnusableImage(Exception):
    """A submission's image cannot be loaded from the blob store or cannot be decoded."""


def worker_name() -> str:
    """Host and process of this worker, recorded with each attempt."""
    return f"{socket.gethostname()}:{os.getpid()}"


class EngineUnhealthy(RuntimeError):
    """The engine failed and its health check fails too: this worker process cannot judge anything."""


@dataclass
class BatchReport:
    """What one batch run did."""

    claimed: list[uuid.UUID] = field(default_factory=list)
    decided: list[uuid.UUID] = field(default_factory=list)
    failed: list[uuid.UUID] = field(default_factory=list)
    requeued: list[uuid.UUID] = field(default_factory=list)
    lease_lost: list[uuid.UUID] = field(default_factory=list)
    inference_seconds: float = 0.0


@dataclass
class _Leased:
    submission: Submission
    token: uuid.UUID


@dataclass
class _Prepared:
    item: _Leased
    tenant: Tenant
    request: EngineRequest
    cache_key: str | None = None


def _in_review(draft: _Draft) -> bool:
    return draft.verdict.decision == Decision.review


@dataclass
class _Draft:
    """A verdict ready to be written for one leased submission, with its cache bookkeeping."""

    item: _Leased
    tenant: Tenant
    verdict: Verdict
    priority: int
    cache_key: str | None = None
    cached_from: uuid.UUID | None = None


def review_priority(conflict_score: float, category_scores: dict[str, float]) -> int:
    """Queue priority of a review item (lower is sooner): items leaning to block come first."""
    risk = max([conflict_score, *category_scores.values()])
    return round(100 - 50 * risk)


#: Images are decoded to at most this many times the engine's pixel budget (the engine scales them further).
DECODE_BUDGET_FACTOR = 16


def verdict_cache_key(
    tenant_id: uuid.UUID, image_sha256: str, caption: str, policy_version: int, model: ModelInfo
) -> str:
    """SHA-256 over everything a verdict depends on: tenant, image bytes, caption, policy and model."""
    material = json.dumps(
        [
            str(tenant_id),
            image_sha256,
            caption,
            policy_version,
            model.name,
            model.revision,
            model.prompt_version,
            model.settings,
        ],
        ensure_ascii=False,
    )
    return hashlib.sha256(material.encode()).hexdigest()


def thresholds_of(tenant: Tenant) -> Thresholds:
    """A tenant's routing thresholds."""
    return Thresholds(
        block_threshold=tenant.block_threshold,
        allow_threshold=tenant.allow_threshold,
        min_confidence=tenant.min_confidence,
        category_block_threshold=tenant.category_block_threshold,
        category_review_threshold=tenant.category_review_threshold,
    )


class BatchProcessor:
    """Claims submissions, runs the engine on them as one batch and writes fenced verdicts."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        engine: ModerationEngine,
        blob_store: BlobStore,
        settings: Settings,
    ) -> None:
        self.sessions = sessions
        self.engine = engine
        self.blob_store = blob_store
        self.settings = settings
        self.worker = worker_name()
        self._blocklists: dict[tuple[uuid.UUID, int], Blocklist] = {}

    def _blocklist(self, tenant: Tenant) -> Blocklist:
        """The tenant's blocklist, normalised once per policy version."""
        key = (tenant.id, tenant.policy_version)
        if key not in self._blocklists:
            if len(self._blocklists) >= 1024:
                self._blocklists.clear()
            self._blocklists[key] = blocklist_for(tenant, self.settings)
        return self._blocklists[key]

    def _claim(self, first_id: uuid.UUID | None, limit: int, fresh_only: bool) -> list[_Leased]:
        with self.sessions() as session, session.begin():
            repo = SubmissionRepository(session)
            token, claimed = repo.claim(
                first_id=first_id,
                limit=limit,
                lease_seconds=self.settings.processing_lease_seconds,
                max_attempts=self.settings.max_attempts,
                fresh_only=fresh_only,
            )
            now = utcnow()
            repo.add_attempts(
                [
                    ProcessingAttempt(
                        id=new_id(),
                        submission_id=s.id,
                        attempt=s.attempts,
                        lease_token=token,
                        worker=self.worker,
                        batch_size=len(claimed),
                        started_at=now,
                    )
                    for s in claimed
                ]
            )
            return [_Leased(s, token) for s in claimed]

    def _claimable(self, submission: Submission) -> bool:
        """Whether a claim could lease this submission now (queued, or its lease ran out)."""
        if submission.attempts >= self.settings.max_attempts:
            return False
        if submission.status == SubmissionStatus.queued:
            return True
        expires = submission.lease_expires_at
        return submission.status == SubmissionStatus.processing and expires is not None and expires < utcnow()

    def claim_batch(self, first_id: uuid.UUID) -> list[_Leased]:
        """Lease the given submission and, unless it is a retry, companions up to the batch size or wait."""
        with self.sessions() as session:
            first = SubmissionRepository(session).get(first_id)
            if first is None or not self._claimable(first):
                # Done, failed, or held under a live lease (often as a companion in an earlier batch):
                # this job has nothing to do, and must not lease (and release) anything else.
                return []
            retry = first.attempts > 0
        # Companions are only submissions never tried: a retried one is judged alone, by its own job.
        leased = self._claim(first_id, 1 if retry else self.settings.batch_max_size, fresh_only=True)
        if not leased or leased[0].submission.id != first_id:
            # Our submission is done or held by another worker; its companions have jobs of their own.
            self._release_unstarted(leased)
            return []
        if retry:
            # A retried submission may be the one that crashed its worker: judge it alone.
            return leased
        deadline = time.monotonic() + self.settings.batch_wait_ms / 1000
        poll = max(0.005, self.settings.batch_wait_ms / 1000 / 5)
        while len(leased) < self.settings.batch_max_size and time.monotonic() < deadline:
            time.sleep(min(poll, max(0.0, deadline - time.monotonic())))
            leased += self._claim(None, self.settings.batch_max_size - len(leased), fresh_only=True)
        return leased

    def _release_unstarted(self, leased: list[_Leased]) -> None:
        if not leased:
            return
        with self.sessions() as session, session.begin():
            repo = SubmissionRepository(session)
            for item in leased:
                repo.finish_fenced(
                    item.submission.id,
                    item.token,
                    {"status": SubmissionStatus.queued, "attempts": item.submission.attempts - 1},
                )
                repo.finish_attempt(item.submission.id, item.token, "released")

    def run(self, first_id: uuid.UUID) -> BatchReport:
        """Process the batch led by ``first_id``; a no-op when it is already done or being processed."""
        report = BatchReport()
        leased = self.claim_batch(first_id)
        if not leased:
            return report
        report.claimed = [item.submission.id for item in leased]
        metrics.BATCH_SIZE.observe(len(leased))
        try:
            self._process(leased, report)
        except EngineUnhealthy:
            raise
        except Exception as exc:
            # Whatever broke (a database error, a bug, a verdict the database refuses), the batch's leases
            # are released now with the error recorded, instead of running out with the real cause lost.
            # Retried, each submission is judged alone, so one that keeps failing fails by itself.
            logger.exception("processing a batch of %d failed", len(leased))
            settled = {*report.decided, *report.failed, *report.requeued, *report.lease_lost}
            pending = [item for item in leased if item.submission.id not in settled]
            metrics.PROCESSING_FAILURES.labels("processing_error").inc(len(pending))
            self._retry_or_fail(pending, f"processing error: {type(exc).__name__}: {exc}", report)
        return report

    def _process(self, leased: list[_Leased], report: BatchReport) -> None:
        """Judge a leased batch and write its verdicts (or release what failed)."""
        with self.sessions() as session:
            tenants = {
                t.id: t
                for t in (
                    TenantRepository(session).get(tid) for tid in {i.submission.tenant_id for i in leased}
                )
                if t is not None
            }
            for tenant in tenants.values():
                session.expunge(tenant)
        prepared: list[_Prepared] = []
        for item in leased:
            tenant = tenants[item.submission.tenant_id]
            try:
                request = self._request_for(item.submission, tenant)
            except _UnusableImage as exc:
                logger.warning("submission %s has an unusable image: %s", item.submission.id, exc)
                self._fail(item, str(exc), report)
                continue
            except Exception as exc:
                # A blob store that is unreachable now (S3 down, an I/O error) may answer on a retry.
                logger.warning("could not load the image of submission %s: %s", item.submission.id, exc)
                metrics.PROCESSING_FAILURES.labels("image_unavailable").inc()
                self._retry_or_fail([item], f"image could not be loaded: {exc}", report)
                continue
            prepared.append(_Prepared(item, tenant, request))
        decided, ready = self._before_engine(prepared)
        if decided:
            self._write_verdicts(decided, report)
        if not ready:
            return
        started = time.perf_counter()
        try:
            results = self.engine.moderate([p.request for p in ready])
        except BatchPartlyFailed as partial:
            # The submissions the engine could not judge are retried (alone); the others' verdicts stand.
            failed = [p for p, r in zip(ready, partial.results, strict=True) if r is None]
            logger.warning("engine failed %d of a batch of %d: %s", len(failed), len(ready), partial.reason)
            metrics.PROCESSING_FAILURES.labels("engine_error").inc(len(failed))
            self._retry_or_fail([p.item for p in failed], f"engine error: {partial.reason}", report)
            judged = [(p, r) for p, r in zip(ready, partial.results, strict=True) if r is not None]
            ready, results = [p for p, _ in judged], [r for _, r in judged]
        except Exception as exc:
            logger.exception("engine failed on a batch of %d", len(ready))
            metrics.PROCESSING_FAILURES.labels("engine_error").inc(len(ready))
            self._retry_or_fail([p.item for p in ready], f"engine error: {type(exc).__name__}: {exc}", report)
            # A failure that leaves the device unusable (a broken CUDA context) would fail every later
            # batch on this worker: check, and stop taking work if the engine no longer answers.
            health = self.engine.health()
            if not health.ok:
                raise EngineUnhealthy(f"engine unhealthy after a failed batch: {health.detail}") from exc
            return
        report.inference_seconds = time.perf_counter() - started
        metrics.INFERENCE_SECONDS.observe(report.inference_seconds)
        per_item_ms = report.inference_seconds * 1000 / len(ready)
        self._write_verdicts(
            [self._engine_draft(p, result, per_item_ms) for p, result in zip(ready, results, strict=True)],
            report,
        )

    def _before_engine(self, prepared: list[_Prepared]) -> tuple[list[_Draft], list[_Prepared]]:
        """Decide what needs no inference (known image, blocklisted caption, cached verdict)."""
        decided: list[_Draft] = []
        ready: list[_Prepared] = []
        if not prepared:
            return decided, ready
        info = self.engine.info
        oldest = utcnow() - timedelta(seconds=self.settings.verdict_cache_max_age_seconds)
        with self.sessions() as session:
            with_known = KnownImageRepository(session).tenants_with_known_images(
                {p.tenant.id for p in prepared}
            )
            cache = VerdictCacheRepository(session)
            for p in prepared:
                submission = p.item.submission
                known: KnownImageMatch | None = None
                if p.tenant.id in with_known:
                    known = find_known_image(
                        session, p.tenant.id, image_hashes(p.request.image), self.settings
                    )
                caption_hits = self._blocklist(p.tenant).match(submission.caption, "caption")
                policy = before_engine(submission.caption, known, caption_hits)
                if policy is not None:
                    metrics.VERDICTS_WITHOUT_INFERENCE.labels("known_image" if known else "blocklist").inc()
                    decided.append(self._policy_draft(p, policy))
                    continue
                if not self.settings.verdict_cache_enabled:
                    ready.append(p)
                    continue
                p.cache_key = verdict_cache_key(
                    p.tenant.id, submission.image_sha256, submission.caption, p.tenant.policy_version, info
                )
                source = cache.find(p.cache_key, newer_than=oldest)
                if source is None:
                    ready.append(p)
                    continue
                metrics.VERDICTS_WITHOUT_INFERENCE.labels("cache").inc()
                decided.append(self._cached_draft(p, source))
        return decided, ready

    def _policy_draft(self, p: _Prepared, policy: PolicyVerdict) -> _Draft:
        verdict = Verdict(
            id=new_id(),
            submission_id=p.item.submission.id,
            decision=policy.decision,
            conflict_score=1.0,
            confidence=1.0,
            categories=[],
            description=policy.description,
            visible_text="",
            explanation=policy.explanation,
            reasons=policy.reasons,
            model_name=POLICY_MODEL_NAME,
            model_revision=f"tenant-policy-v{p.tenant.policy_version}",
            prompt_version=POLICY_RULES_VERSION,
            inference_ms=0.0,
            decided_at=utcnow(),
        )
        return _Draft(p.item, p.tenant, verdict, priority=review_priority(1.0, {}))

    def _cached_draft(self, p: _Prepared, source: Verdict) -> _Draft:
        scores = {str(c["name"]): float(c["score"]) for c in source.categories}
        reason = (
            f"cached: reused verdict {source.id} of submission {source.submission_id} (same image, caption, "
            f"policy version {p.tenant.policy_version} and model {source.model_name}@{source.model_revision}, "
            f"prompt {source.prompt_version}); no inference"
        )
        verdict = Verdict(
            id=new_id(),
            submission_id=p.item.submission.id,
            decision=source.decision,
            conflict_score=source.conflict_score,
            confidence=source.confidence,
            categories=[dict(c) for c in source.categories],
            description=source.description,
            visible_text=source.visible_text,
            explanation=source.explanation,
            reasons=[reason, *source.reasons],
            model_name=source.model_name,
            model_revision=source.model_revision,
            prompt_version=source.prompt_version,
            inference_ms=0.0,
            decided_at=utcnow(),
        )
        return _Draft(
            p.item,
            p.tenant,
            verdict,
            priority=review_priority(source.conflict_score, scores),
            cached_from=source.id,
        )

    def _engine_draft(self, p: _Prepared, result: EngineResult, per_item_ms: float) -> _Draft:
        info = self.engine.info
        outcome = after_engine(
            p.item.submission.caption, result, self._blocklist(p.tenant), thresholds_of(p.tenant)
        )
        verdict = Verdict(
            id=new_id(),
            submission_id=p.item.submission.id,
            decision=outcome.decision,
            conflict_score=_unit(result.conflict_score),
            confidence=_unit(result.confidence),
            categories=[
                {"name": name, "score": _unit(score)} for name, score in outcome.category_scores.items()
            ],
            description=result.description,
            visible_text=result.visible_text,
            explanation=outcome.explanation,
            reasons=outcome.reasons,
            model_name=info.name,
            model_revision=info.revision,
            prompt_version=info.prompt_version,
            inference_ms=per_item_ms,
            decided_at=utcnow(),
        )
        return _Draft(
            p.item,
            p.tenant,
            verdict,
            priority=review_priority(result.conflict_score, outcome.category_scores),
            cache_key=p.cache_key,
        )

    def _request_for(self, submission: Submission, tenant: Tenant) -> EngineRequest:
        try:
            data = self.blob_store.get(submission.image_sha256)
        except NotFound as exc:
            raise _UnusableImage(f"image could not be loaded: {exc}") from exc
        # Intake's structural check walks a JPEG that ends with its end-of-image marker only as far as its
        # first scan: the rest is walked here, before the first full decode of the image.
        try:
            if (
                self.settings.intake_image_check == "structural"
                and data.startswith(b"\xff\xd8\xff")
                and data.endswith(b"\xff\xd9")
            ):
                check_jpeg(data)
        except ImageStructureError as exc:
            raise _UnusableImage(f"{IMAGE_UNDECODABLE}: image is not well formed: {exc}") from exc
        try:
            image = Image.open(io.BytesIO(data))
            # A batch holds its images until it ends: a 200 KB PNG can decode to 200 MB. Far above the
            # engine's pixel budget, decode smaller (JPEG decodes at a reduced scale) and keep only that.
            budget = DECODE_BUDGET_FACTOR * self.settings.image_max_pixels
            if image.width * image.height > budget:
                scale = (budget / (image.width * image.height)) ** 0.5
                image.thumbnail((max(1, int(image.width * scale)), max(1, int(image.height * scale))))
            image.load()
        except Exception as exc:
            raise _UnusableImage(f"{IMAGE_UNDECODABLE}: image could not be decoded: {exc}") from exc
        return EngineRequest(image=image, caption=submission.caption, categories=categories_for(tenant))

    def _write_verdicts(self, drafts: list[_Draft], report: BatchReport) -> None:
        """Write a batch's verdicts in one transaction, a few set-based statements for the whole batch.

        Only submissions whose lease this worker still holds are moved on (one fenced UPDATE); a verdict
        whose lease was lost is discarded, its attempt recorded as such. The report counts them only once
        the transaction has committed: if it fails, the caller releases every lease still held.
        """
        if not drafts:
            return
        decided: list[uuid.UUID] = []
        lost: list[uuid.UUID] = []
        self._write_verdicts_in_transaction(drafts, decided, lost)
        report.decided += decided
        report.lease_lost += lost

    def _write_verdicts_in_transaction(
        self, drafts: list[_Draft], decided: list[uuid.UUID], lost_ids: list[uuid.UUID]
    ) -> None:
        with self.sessions() as session, session.begin():
            repo = SubmissionRepository(session)
            moved = repo.finish_fenced_many(
                [
                    FencedMove(
                        draft.item.submission.id,
                        draft.item.token,
                        SubmissionStatus.in_review if _in_review(draft) else SubmissionStatus.decided,
                        None if _in_review(draft) else draft.verdict.decision,
                    )
                    for draft in drafts
                ]
            )
            lost = [draft for draft in drafts if draft.item.submission.id not in moved]
            for draft in lost:
                logger.warning("lease on %s was lost; discarding this verdict", draft.item.submission.id)
                lost_ids.append(draft.item.submission.id)
            repo.finish_attempts([(d.item.submission.id, d.item.token) for d in lost], "lease_lost")
            kept = [draft for draft in drafts if draft.item.submission.id in moved]
            if not kept:
                return
            # The fence makes this worker the only writer; a verdict already there breaks that and fails
            # the whole transaction (unique submission_id) rather than leave two.
            repo.add_verdicts([draft.verdict for draft in kept])
            VerdictCacheRepository(session).add_many(
                [
                    VerdictCacheEntry(
                        verdict_id=draft.verdict.id,
                        tenant_id=draft.tenant.id,
                        cache_key=draft.cache_key,
                        cached_from_verdict_id=draft.cached_from,
                        created_at=draft.verdict.decided_at,
                    )
                    for draft in kept
                    if draft.cache_key is not None or draft.cached_from is not None
                ]
            )
            reviews = {
                draft.item.submission.id: ReviewItem(
                    id=new_id(),
                    submission_id=draft.item.submission.id,
                    tenant_id=draft.tenant.id,
                    state=ReviewState.pending,
                    priority=draft.priority,
                    reason="; ".join(draft.verdict.reasons),
                    categories=[],
                    details={},
                )
                for draft in kept
                if _in_review(draft)
            }
            ReviewRepository(session).add_many(list(reviews.values()))
            repo.finish_attempts([(d.item.submission.id, d.item.token) for d in kept], "decided")
            submissions = {s.id: s for s in repo.get_many([d.item.submission.id for d in kept], fresh=True)}
            webhooks = WebhookRepository(session)
            endpoints: dict[uuid.UUID, list[WebhookEndpoint]] = {}
            for draft in kept:
                submission_id, tenant_id = draft.item.submission.id, draft.tenant.id
                if tenant_id not in endpoints:  # one lookup per tenant and batch, not per submission
                    endpoints[tenant_id] = webhooks.endpoints_for(
                        tenant_id, WebhookEvent.submission_decided.value
                    )
                emit_submission_event(
                    session,
                    WebhookEvent.submission_decided,
                    submissions[submission_id],
                    reviews.get(submission_id),
                    endpoints=endpoints[tenant_id],
                )
                metrics.VERDICTS.labels(draft.verdict.decision.value).inc()
                decided.append(submission_id)

    def _fail(self, item: _Leased, error: str, report: BatchReport) -> None:
        with self.sessions() as session, session.begin():
            repo = SubmissionRepository(session)
            if repo.finish_fenced(
                item.submission.id,
                item.token,
                {"status": SubmissionStatus.failed, "last_error": error[:MAX_ERROR_CHARS]},
            ):
                repo.finish_attempt(item.submission.id, item.token, "failed", error[:MAX_ERROR_CHARS])
                submission = repo.get(item.submission.id)
                assert submission is not None
                emit_submission_event(session, WebhookEvent.submission_failed, submission)
                report.failed.append(item.submission.id)

    def _retry_or_fail(self, items: list[_Leased], error: str, report: BatchReport) -> None:
        for item in items:
            if item.submission.attempts >= self.settings.max_attempts:
                self._fail(item, error, report)
                continue
            with self.sessions() as session, session.begin():
                repo = SubmissionRepository(session)
                if repo.finish_fenced(
                    item.submission.id,
                    item.token,
                    {
                        "status": SubmissionStatus.queued,
                        "last_error": error[:MAX_ERROR_CHARS],
                        "enqueued_at": utcnow(),
                    },
                ):
                    repo.finish_attempt(item.submission.id, item.token, "error", error[:MAX_ERROR_CHARS])
                    delay = min(60.0, 2.0**item.submission.attempts)
                    job = process_job(item.submission.id)
                    enqueue_after_commit(session, Job(job.task, job.args, job.queue, countdown=delay))
                    report.requeued.append(item.submission.id)


def _unit(value: float) -> float:
    return min(1.0, max(0.0, float(value)))


@dataclass
class SweepReport:
    """What one sweep recovered."""

    requeued: list[uuid.UUID] = field(default_factory=list)
    expired: list[uuid.UUID] = field(default_factory=list)
    failed: list[uuid.UUID] = field(default_factory=list)
    webhooks: list[uuid.UUID] = field(default_factory=list)
    review_leases: int = 0


def sweep(sessions: sessionmaker[Session], settings: Settings, *, limit: int = 500) -> SweepReport:
    """Re-enqueue queued work whose job may be lost, recover expired leases and fail what keeps failing."""
    report = SweepReport()
    now = utcnow()
    with sessions() as session, session.begin():
        repo = SubmissionRepository(session)
        stale = repo.stale_queued(
            now - timedelta(seconds=settings.queue_redeliver_seconds),
            limit,
            max_attempts=settings.max_attempts,
        )
        repo.mark_enqueued(stale)
        for submission_id in stale:
            enqueue_after_commit(session, process_job(submission_id))
        report.requeued = stale
    with sessions() as session, session.begin():
        repo = SubmissionRepository(session)
        for submission in repo.expired_leases(now, limit):
            token = submission.lease_token
            if submission.attempts >= settings.max_attempts:
                error = f"gave up after {submission.attempts} attempts; the last worker died or stalled"
                submission.status = SubmissionStatus.failed
                submission.last_error = (submission.last_error or error)[:MAX_ERROR_CHARS]
                report.failed.append(submission.id)
                outcome = "lease_expired_final"
            else:
                submission.status = SubmissionStatus.queued
                submission.enqueued_at = now
                report.expired.append(submission.id)
                enqueue_after_commit(session, process_job(submission.id))
                outcome = "lease_expired"
            submission.lease_token = None
            submission.lease_expires_at = None
            if token is not None:
                repo.finish_attempt(submission.id, token, outcome, "processing lease expired")
        # Only a lowered MAX_ATTEMPTS leaves a queued submission out of attempts: no claim would take it.
        for submission in repo.exhausted_queued(settings.max_attempts, limit):
            error = f"gave up after {submission.attempts} attempts (MAX_ATTEMPTS is {settings.max_attempts})"
            submission.status = SubmissionStatus.failed
            submission.last_error = (submission.last_error or error)[:MAX_ERROR_CHARS]
            report.failed.append(submission.id)
        session.flush()
        for submission_id in report.failed:
            failed = repo.get(submission_id)
            assert failed is not None
            emit_submission_event(session, WebhookEvent.submission_failed, failed)
    with sessions() as session, session.begin():
        overdue = WebhookRepository(session).overdue_deliveries(now - timedelta(seconds=60), limit)
        for delivery_id in overdue:
            enqueue_after_commit(session, delivery_job(delivery_id))
        report.webhooks = overdue
    with sessions() as session, session.begin():
        report.review_leases = release_expired_leases(session, now)
    for kind, items in (("queued", report.requeued), ("lease", report.expired), ("webhook", report.webhooks)):
        if items:
            metrics.SWEEPER_RECOVERED.labels(kind).inc(len(items))
    if report.requeued or report.expired or report.failed or report.webhooks:
        logger.info(
            "sweep: requeued %d queued, %d expired leases, failed %d, %d overdue webhooks",
            len(report.requeued),
            len(report.expired),
            len(report.failed),
            len(report.webhooks),
        )
    return report
