"""Webhook endpoints, signed deliveries, retries with backoff and the record of attempts."""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from standardwebhooks.webhooks import Webhook

from moderation.blobs import LocalBlobStore
from moderation.config import Settings
from moderation.errors import BlockedDestination, InvalidInput
from moderation.jobs import TASK_DELIVER_WEBHOOK
from moderation.net.safe_http import OutboundPolicy, SafeHttpClient
from moderation.submissions.models import Submission
from moderation.submissions.service import submit
from moderation.tenants.service import create_tenant
from moderation.webhooks.models import DeliveryStatus, WebhookAttempt, WebhookDelivery, WebhookEvent
from moderation.webhooks.schemas import WebhookEndpointCreate
from moderation.webhooks.service import (
    UNFINISHED_ATTEMPT,
    attempt_delivery,
    backoff_seconds,
    create_endpoint,
    emit_submission_event,
)
from tests.conftest import RecordingDispatcher, make_jpeg
from tests.webhooks.conftest import Receiver


def _setup(
    sessions: sessionmaker[Session], settings: Settings, url: str, tmp_path
) -> tuple[str, list[WebhookDelivery]]:  # type: ignore[no-untyped-def]
    settings.allow_private_network = True
    with sessions() as session, session.begin():
        tenant = create_tenant(session, "acme", settings).tenant
        endpoint = create_endpoint(
            session, tenant, WebhookEndpointCreate(url=url, events=["submission.decided"]), settings
        )
        sub = submit(
            session,
            tenant,
            image=make_jpeg(32, 32),
            caption="hello",
            blob_store=LocalBlobStore(tmp_path),
            settings=settings,
        ).submission
        session.flush()
        sub = session.get(Submission, sub.id)
        assert sub is not None
        session.refresh(sub, ["verdict"])
        deliveries = emit_submission_event(session, WebhookEvent.submission_decided, sub)
        # Not subscribed: no delivery.
        assert emit_submission_event(session, WebhookEvent.submission_reviewed, sub) == []
        return endpoint.secret, deliveries


def test_delivery_is_signed_per_standard_webhooks(
    sessions: sessionmaker[Session],
    settings: Settings,
    receiver: Receiver,
    dispatched: RecordingDispatcher,
    tmp_path,
) -> None:  # type: ignore[no-untyped-def]
    secret, deliveries = _setup(sessions, settings, receiver.url, tmp_path)
    assert secret.startswith("whsec_")
    assert dispatched.tasks(TASK_DELIVER_WEBHOOK) == [str(deliveries[0].id)]
    with SafeHttpClient(OutboundPolicy(allow_private=True)) as client:
        outcome = attempt_delivery(sessions, deliveries[0].id, client, settings)
    assert outcome.status == DeliveryStatus.succeeded
    headers, body = receiver.requests[0]
    payload = Webhook(secret).verify(body, headers)
    assert payload["type"] == "submission.decided"
    assert payload["data"]["caption"] == "hello"
    assert headers["webhook-id"] == deliveries[0].message_id
    # A second job for the same delivery does nothing.
    with SafeHttpClient(OutboundPolicy(allow_private=True)) as client:
        assert attempt_delivery(sessions, deliveries[0].id, client, settings).status is None
    assert len(receiver.requests) == 1


def test_failures_retry_with_backoff_and_every_attempt_is_recorded(
    sessions: sessionmaker[Session],
    settings: Settings,
    receiver: Receiver,
    dispatched: RecordingDispatcher,
    tmp_path,
) -> None:  # type: ignore[no-untyped-def]
    settings.webhook_max_attempts = 3
    receiver.statuses = [500, 503, 500]
    _, deliveries = _setup(sessions, settings, receiver.url, tmp_path)
    delivery_id = deliveries[0].id
    outcomes = []
    with SafeHttpClient(OutboundPolicy(allow_private=True)) as client:
        for _ in range(3):
            outcome = attempt_delivery(sessions, delivery_id, client, settings)
            outcomes.append(outcome)
            # Make the retry due now instead of waiting for its backoff.
            with sessions() as session, session.begin():
                row = session.get(WebhookDelivery, delivery_id)
                assert row is not None
                if row.next_attempt_at is not None:
                    row.next_attempt_at = row.created_at
    assert [o.status for o in outcomes] == [
        DeliveryStatus.pending,
        DeliveryStatus.pending,
        DeliveryStatus.failed,
    ]
    assert all(o.retry_in and o.retry_in > 0 for o in outcomes[:2])
    retries = [j for j in dispatched.jobs if j.task == TASK_DELIVER_WEBHOOK and j.countdown]
    assert len(retries) == 2
    with sessions() as session:
        attempts = session.scalars(select(WebhookAttempt).order_by(WebhookAttempt.attempt)).all()
        assert [(a.attempt, a.status_code) for a in attempts] == [(1, 500), (2, 503), (3, 500)]
        assert all(a.error == f"HTTP {a.status_code}" for a in attempts)


def test_backoff_grows_exponentially_with_jitter(settings: Settings) -> None:
    rng = random.Random(1)
    delays = [backoff_seconds(n, settings, rng) for n in range(1, 8)]
    for n, delay in enumerate(delays, start=1):
        ceiling = min(
            settings.webhook_backoff_max_seconds, settings.webhook_backoff_base_seconds * 2 ** (n - 1)
        )
        assert ceiling / 2 <= delay <= ceiling
    assert backoff_seconds(30, settings, rng) <= settings.webhook_backoff_max_seconds


def test_endpoint_urls_follow_the_outbound_policy(
    sessions: sessionmaker[Session], settings: Settings
) -> None:
    with sessions() as session, session.begin():
        tenant = create_tenant(session, "acme", settings).tenant
        for url in (
            "http://127.0.0.1:9/x",
            "http://169.254.169.254/",
            "http://10.0.0.1/hook",
            "ftp://example.com/",
        ):
            with pytest.raises((BlockedDestination, InvalidInput)):
                create_endpoint(
                    session, tenant, WebhookEndpointCreate(url=url, events=["submission.decided"]), settings
                )
        with pytest.raises(InvalidInput):
            create_endpoint(
                session, tenant, WebhookEndpointCreate(url="https://example.com", events=["nope"]), settings
            )
        ok = create_endpoint(
            session,
            tenant,
            WebhookEndpointCreate(url="https://example.com/hook", events=["submission.reviewed"]),
            settings,
        )
        assert ok.secret.startswith("whsec_")


class _WorkerDies(SafeHttpClient):
    """The worker process is killed while the request is in flight (nothing after it runs)."""

    def post(
        self, url: str, content: bytes, headers: Mapping[str, str] | None = None, timeout: float | None = None
    ) -> tuple[int, str]:
        raise SystemExit("killed")


def _die_during_an_attempt(sessions: sessionmaker[Session], delivery_id: Any, settings: Settings) -> None:
    """An attempt whose worker is killed while its request is in flight."""
    with pytest.raises(SystemExit), _WorkerDies(OutboundPolicy(allow_private=True)) as dying:
        attempt_delivery(sessions, delivery_id, dying, settings)


def _make_due(sessions: sessionmaker[Session], delivery_id: object) -> None:
    with sessions() as session, session.begin():
        row = session.get(WebhookDelivery, delivery_id)
        assert row is not None
        row.next_attempt_at = row.created_at


def test_an_attempt_whose_worker_dies_is_recorded_and_counts_against_the_limit(
    sessions: sessionmaker[Session],
    settings: Settings,
    receiver: Receiver,
    dispatched: RecordingDispatcher,
    tmp_path,
) -> None:  # type: ignore[no-untyped-def]
    settings.webhook_max_attempts = 2
    _, deliveries = _setup(sessions, settings, receiver.url, tmp_path)
    delivery_id = deliveries[0].id
    _die_during_an_attempt(sessions, delivery_id, settings)
    with sessions() as session:
        (started,) = session.scalars(select(WebhookAttempt)).all()
        assert (started.attempt, started.status_code, started.error) == (1, None, UNFINISHED_ATTEMPT)
    receiver.statuses = [500]
    with SafeHttpClient(OutboundPolicy(allow_private=True)) as client:
        _make_due(sessions, delivery_id)  # as the sweeper finds it once the lease runs out
        assert attempt_delivery(sessions, delivery_id, client, settings).status == DeliveryStatus.failed
        assert len(receiver.requests) == 1
        _make_due(sessions, delivery_id)
        assert attempt_delivery(sessions, delivery_id, client, settings).status is None  # settled: no request
    assert len(receiver.requests) == 1
    with sessions() as session:
        attempts = session.scalars(select(WebhookAttempt).order_by(WebhookAttempt.attempt)).all()
        assert [(a.attempt, a.error) for a in attempts] == [(1, UNFINISHED_ATTEMPT), (2, "HTTP 500")]


def test_when_the_last_attempt_dies_the_delivery_fails_instead_of_retrying_forever(
    sessions: sessionmaker[Session],
    settings: Settings,
    receiver: Receiver,
    dispatched: RecordingDispatcher,
    tmp_path,
) -> None:  # type: ignore[no-untyped-def]
    settings.webhook_max_attempts = 1
    _, deliveries = _setup(sessions, settings, receiver.url, tmp_path)
    delivery_id = deliveries[0].id
    _die_during_an_attempt(sessions, delivery_id, settings)
    _make_due(sessions, delivery_id)
    with SafeHttpClient(OutboundPolicy(allow_private=True)) as client:
        assert attempt_delivery(sessions, delivery_id, client, settings).status == DeliveryStatus.failed
    assert receiver.requests == []
    with sessions() as session:
        row = session.get(WebhookDelivery, delivery_id)
        assert row is not None and row.status == DeliveryStatus.failed and row.next_attempt_at is None
        assert "gave up after 1 attempts" in (row.last_error or "")


def test_an_attempt_that_outlived_its_lease_does_not_undo_a_later_success(
    sessions: sessionmaker[Session],
    settings: Settings,
    receiver: Receiver,
    dispatched: RecordingDispatcher,
    tmp_path,
) -> None:  # type: ignore[no-untyped-def]
    settings.webhook_max_attempts = 2
    _, deliveries = _setup(sessions, settings, receiver.url, tmp_path)
    delivery_id = deliveries[0].id
    policy = OutboundPolicy(allow_private=True)

    class StalledThenFailed(SafeHttpClient):
        """Stalls past its lease, during which another worker delivers; then its own request fails."""

        def post(
            self,
            url: str,
            content: bytes,
            headers: Mapping[str, str] | None = None,
            timeout: float | None = None,
        ) -> tuple[int, str]:
            _make_due(sessions, delivery_id)
            with SafeHttpClient(policy) as other_worker:
                later = attempt_delivery(sessions, delivery_id, other_worker, settings)
            assert later.status == DeliveryStatus.succeeded
            return 500, "too late"

    with StalledThenFailed(policy) as stalled:
        assert attempt_delivery(sessions, delivery_id, stalled, settings).status is None
    with sessions() as session:
        row = session.get(WebhookDelivery, delivery_id)
        assert row is not None and row.status == DeliveryStatus.succeeded and row.last_error is None
        attempts = session.scalars(select(WebhookAttempt).order_by(WebhookAttempt.attempt)).all()
        assert [(a.attempt, a.status_code) for a in attempts] == [(1, 500), (2, 200)]


def test_logs_show_a_webhook_endpoint_by_its_origin_only(
    sessions: sessionmaker[Session],
    settings: Settings,
    receiver: Receiver,
    dispatched: RecordingDispatcher,
    tmp_path,
    caplog: pytest.LogCaptureFixture,
) -> None:  # type: ignore[no-untyped-def]
    secret_url = receiver.url.rstrip("/") + "/hooks/tok_abc123?key=s3cr3t"
    _, deliveries = _setup(sessions, settings, secret_url, tmp_path)
    with caplog.at_level("INFO"), SafeHttpClient(OutboundPolicy(allow_private=True)) as client:
        attempt_delivery(sessions, deliveries[0].id, client, settings)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "webhook delivery" in logged and "http://127.0.0.1" in logged
    assert "tok_abc123" not in logged and "s3cr3t" not in logged


def test_an_answer_that_arrives_after_the_erasure_of_its_submission_is_not_kept(
    sessions: sessionmaker[Session],
    settings: Settings,
    receiver: Receiver,
    dispatched: RecordingDispatcher,
    tmp_path,
) -> None:  # type: ignore[no-untyped-def]
    from sqlalchemy import update

    from moderation.db import utcnow

    _, deliveries = _setup(sessions, settings, receiver.url, tmp_path)
    delivery_id = deliveries[0].id
    policy = OutboundPolicy(allow_private=True)

    class ErasedWhileWaiting(SafeHttpClient):
        """The platform erases the submission while the receiver is still answering (and echoes it)."""

        def post(
            self,
            url: str,
            content: bytes,
            headers: Mapping[str, str] | None = None,
            timeout: float | None = None,
        ) -> tuple[int, str]:
            with sessions() as session, session.begin():
                session.execute(
                    update(Submission)
                    .where(Submission.id == deliveries[0].submission_id)
                    .values(erased_at=utcnow(), caption="")
                )
            return 400, '{"echo": "hello"}'

    with ErasedWhileWaiting(policy) as client:
        attempt_delivery(sessions, delivery_id, client, settings)
    with sessions() as session:
        attempt = session.scalars(
            select(WebhookAttempt).where(WebhookAttempt.delivery_id == delivery_id)
        ).one()
        assert attempt.status_code == 400 and attempt.response_excerpt == ""
