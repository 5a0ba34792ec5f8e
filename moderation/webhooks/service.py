"""Registering webhook endpoints, recording events and delivering them with retries."""

from __future__ import annotations

import logging
import random
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta

import orjson
from sqlalchemy.orm import Session, sessionmaker

from moderation import metrics
from moderation.config import Settings
from moderation.db import new_id, utcnow
from moderation.errors import InvalidInput, ModerationError, NotFound
from moderation.jobs import QUEUE_WEBHOOKS, TASK_DELIVER_WEBHOOK, Job, enqueue_after_commit
from moderation.net.safe_http import OutboundPolicy, SafeHttpClient, origin_of, validate_url
from moderation.review.models import ReviewItem
from moderation.submissions.models import Submission
from moderation.submissions.schemas import SubmissionOut
from moderation.tenants.models import Tenant
from moderation.webhooks import signing
from moderation.webhooks.models import (
    DeliveryStatus,
    WebhookAttempt,
    WebhookDelivery,
    WebhookEndpoint,
    WebhookEvent,
)
from moderation.webhooks.repository import WebhookRepository
from moderation.webhooks.schemas import WebhookEndpointCreate

logger = logging.getLogger(__name__)

EVENT_NAMES = frozenset(e.value for e in WebhookEvent)


def delivery_job(delivery_id: uuid.UUID, countdown: float | None = None) -> Job:
    """The job that makes one attempt at a delivery."""
    return Job(task=TASK_DELIVER_WEBHOOK, args=(str(delivery_id),), queue=QUEUE_WEBHOOKS, countdown=countdown)


def create_endpoint(
    session: Session, tenant: Tenant, data: WebhookEndpointCreate, settings: Settings
) -> WebhookEndpoint:
    """Register an endpoint after checking its URL against the outbound (SSRF) policy."""
    unknown = sorted(set(data.events) - EVENT_NAMES)
    if unknown:
        raise InvalidInput(
            f"unknown events {unknown}; known: {sorted(EVENT_NAMES)}", code="invalid_webhook_events"
        )
    validate_url(data.url, OutboundPolicy.from_settings(settings))
    endpoint = WebhookEndpoint(
        id=new_id(),
        tenant_id=tenant.id,
        url=data.url,
        events=sorted(set(data.events)),
        secret=signing.new_secret(),
        enabled=True,
        description=data.description,
    )
    WebhookRepository(session).add(endpoint)
    session.flush()
    return endpoint


def delete_endpoint(session: Session, tenant: Tenant, endpoint_id: uuid.UUID) -> None:
    """Remove one of the tenant's endpoints; pending deliveries to it are dropped with it."""
    endpoint = WebhookRepository(session).get_endpoint(endpoint_id, tenant.id)
    if endpoint is None:
        raise NotFound("webhook endpoint not found", code="webhook_endpoint_not_found")
    session.delete(endpoint)


def emit_submission_event(
    session: Session,
    event: WebhookEvent,
    submission: Submission,
    review: ReviewItem | None = None,
    *,
    endpoints: list[WebhookEndpoint] | None = None,
) -> list[WebhookDelivery]:
    """Record a delivery of the event to each subscribed endpoint; each is sent after commit.

    ``endpoints`` are the tenant's endpoints subscribed to the event, when the caller already has them.
    """
    repo = WebhookRepository(session)
    if endpoints is None:
        endpoints = repo.endpoints_for(submission.tenant_id, event.value)
    if not endpoints:
        return []
    now = utcnow()
    data = SubmissionOut.from_model(submission, review).model_dump(mode="json")
    deliveries = []
    for endpoint in endpoints:
        delivery = WebhookDelivery(
            id=new_id(),
            endpoint_id=endpoint.id,
            tenant_id=submission.tenant_id,
            submission_id=submission.id,
            event_type=event.value,
            message_id=f"msg_{uuid.uuid4().hex}",
            payload={"type": event.value, "timestamp": now.isoformat(), "data": data},
            status=DeliveryStatus.pending,
            attempt_count=0,
            next_attempt_at=now,
        )
        repo.add(delivery)
        deliveries.append(delivery)
        enqueue_after_commit(session, delivery_job(delivery.id))
    return deliveries


def backoff_seconds(attempt: int, settings: Settings, rng: random.Random | None = None) -> float:
    """Delay before retry ``attempt + 1``: exponential in the attempt, with equal jitter."""
    rng = rng or random.Random()
    ceiling = min(
        settings.webhook_backoff_max_seconds, settings.webhook_backoff_base_seconds * 2 ** (attempt - 1)
    )
    return ceiling / 2 + rng.uniform(0, ceiling / 2)


#: The error an attempt carries from its start until its outcome is recorded; an attempt whose worker died
#: during the request keeps it.
UNFINISHED_ATTEMPT = "no outcome recorded: the attempt is under way, or its worker stopped during it"


@dataclass(frozen=True)
class DeliveryOutcome:
    """The result of one delivery attempt and, if it will be retried, after how long."""

    status: DeliveryStatus | None
    retry_in: float | None = None
    status_code: int | None = None


def attempt_delivery(
    sessions: sessionmaker[Session], delivery_id: uuid.UUID, client: SafeHttpClient, settings: Settings
) -> DeliveryOutcome:
    """Make one attempt at a delivery; records the attempt and schedules the retry. Holds no transaction over I/O."""
    lease = settings.webhook_timeout_seconds * 3 + 30
    with sessions() as session, session.begin():
        repo = WebhookRepository(session)
        delivery = repo.claim_delivery(delivery_id, lease)
        if delivery is None:
            return DeliveryOutcome(status=None)
        attempt_no = delivery.attempt_count
        if attempt_no > settings.webhook_max_attempts:
            # The last allowed attempt's worker stopped before it recorded an outcome: none are left.
            delivery.status = DeliveryStatus.failed
            delivery.next_attempt_at = None
            delivery.last_error = (
                f"gave up after {settings.webhook_max_attempts} attempts; the last one's worker stopped "
                f"before recording its outcome (last error: {delivery.last_error or 'none'})"
            )
            logger.warning("webhook delivery %s failed: %s", delivery_id, delivery.last_error)
            return DeliveryOutcome(status=DeliveryStatus.failed)
        endpoint = delivery.endpoint
        url, secret, enabled = endpoint.url, endpoint.secret, endpoint.enabled
        body = orjson.dumps(delivery.payload)
        message_id = delivery.message_id
        # Recorded before the request goes out, so that an attempt whose worker dies during it still shows.
        attempt = WebhookAttempt(
            id=new_id(),
            delivery_id=delivery_id,
            attempt=attempt_no,
            attempted_at=utcnow(),
            status_code=None,
            duration_ms=0.0,
            error=UNFINISHED_ATTEMPT,
        )
        repo.add(attempt)
        attempt_id = attempt.id
    status_code: int | None = None
    excerpt: str | None = None
    error: str | None = None
    started = time.perf_counter()
    if not enabled:
        error = "endpoint disabled"
    else:
        headers = signing.signed_headers(secret, message_id, int(time.time()), body)
        try:
            status_code, excerpt = client.post(url, body, headers, settings.webhook_timeout_seconds)
            if not 200 <= status_code < 300:
                error = f"HTTP {status_code}"
        except ModerationError as exc:
            error = f"{exc.code}: {exc.message}"
        except Exception as exc:  # network failures of every kind count as a failed attempt
            error = f"{type(exc).__name__}: {exc}"
    duration_ms = (time.perf_counter() - started) * 1000
    metrics.WEBHOOK_ATTEMPTS.labels("success" if error is None else "failure").inc()
    with sessions() as session, session.begin():
        repo = WebhookRepository(session)
        # The delivery first, then its attempt: the order erasure takes them in (two orders deadlock).
        delivery = repo.get_delivery(delivery_id, for_update=True)
        assert delivery is not None
        repo.finish_attempt(
            attempt_id,
            status_code=status_code,
            duration_ms=duration_ms,
            error=error,
            response_excerpt=excerpt,
        )
        if error is None:
            # A success stands even if this attempt outlived its lease and a later one is under way.
            if delivery.status != DeliveryStatus.succeeded:
                delivery.status = DeliveryStatus.succeeded
                delivery.delivered_at = utcnow()
                delivery.next_attempt_at = None
                delivery.last_error = None
            outcome = DeliveryOutcome(status=DeliveryStatus.succeeded, status_code=status_code)
        elif delivery.status != DeliveryStatus.pending or delivery.attempt_count != attempt_no:
            # Settled meanwhile, or this attempt outlived its lease and a later one owns the delivery now.
            outcome = DeliveryOutcome(status=None, status_code=status_code)
        elif attempt_no >= settings.webhook_max_attempts or not enabled:
            delivery.status = DeliveryStatus.failed
            delivery.next_attempt_at = None
            delivery.last_error = error
            outcome = DeliveryOutcome(status=DeliveryStatus.failed, status_code=status_code)
        else:
            delay = backoff_seconds(attempt_no, settings)
            delivery.next_attempt_at = utcnow() + timedelta(seconds=delay)
            delivery.last_error = error
            enqueue_after_commit(session, delivery_job(delivery_id, countdown=delay))
            outcome = DeliveryOutcome(status=DeliveryStatus.pending, retry_in=delay, status_code=status_code)
    logger.info(
        "webhook delivery %s attempt %d to %s: %s",
        delivery_id,
        attempt_no,
        origin_of(url),  # the path and query of a receiver's URL often carry its token
        error or f"HTTP {status_code}",
    )
    return outcome
