"""The Celery task adapters: what a GPU worker does when its engine breaks."""

from __future__ import annotations

import socket
import types
import urllib.request
import uuid
from typing import Any

import celery.signals
import pytest
from celery.exceptions import WorkerShutdown

from moderation.processing.service import BatchProcessor, EngineUnhealthy
from workers import tasks


def test_an_unhealthy_engine_shuts_the_worker_down(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: BatchProcessor, submission_id: uuid.UUID) -> Any:
        raise EngineUnhealthy("engine unhealthy after a failed batch: CUDA error")

    monkeypatch.setattr(BatchProcessor, "run", broken)
    for getter in ("get_sessionmaker", "get_engine", "get_blob_store"):
        monkeypatch.setattr(tasks, getter, lambda: None)
    with pytest.raises(WorkerShutdown):
        tasks.process_submission.run(str(uuid.uuid4()))


class _Consumer:
    """What Celery's worker_ready signal passes: the consumer, with the queues it reads."""

    def __init__(self, queue: str) -> None:
        self.task_consumer = types.SimpleNamespace(queues=[types.SimpleNamespace(name=queue)])


def test_a_gpu_worker_whose_model_cannot_load_stops_instead_of_failing_every_job(
    monkeypatch: pytest.MonkeyPatch, settings: Any, tmp_path: Any
) -> None:
    broken = settings.model_copy(
        update={"model": str(tmp_path / "no-such-model"), "engine_backend": "transformers"}
    )
    monkeypatch.setattr(tasks, "get_settings", lambda: broken)
    monkeypatch.setattr(tasks, "_engine", None)
    consumer = _Consumer("gpu")
    # At start-up: Celery's signal dispatch swallows an Exception, but not WorkerShutdown.
    with pytest.raises(WorkerShutdown, match="could not be loaded"):
        celery.signals.worker_ready.send(sender=consumer)
    # And in a job, should the first load have been skipped.
    with pytest.raises(WorkerShutdown, match="could not be loaded"):
        tasks.process_submission.run(str(uuid.uuid4()))
    # A worker of the other queues does not load the model at all.
    other = _Consumer("webhooks")
    celery.signals.worker_ready.send(sender=other)


def test_a_job_naming_several_submissions_judges_them_in_one_batch(
    monkeypatch: pytest.MonkeyPatch,
    sessions: Any,
    settings: Any,
    dispatched: Any,
    tmp_path: Any,
) -> None:
    from moderation.blobs import LocalBlobStore
    from moderation.tenants.service import create_tenant
    from tests.processing.conftest import submit_one
    from tests.processing.test_service import ScriptedEngine

    store = LocalBlobStore(tmp_path / "blobs", fsync=False)
    with sessions() as session, session.begin():
        tenant = create_tenant(session, "acme", settings).tenant
        session.expunge(tenant)
    ids = [submit_one(sessions, tenant, store, settings, f"post {n} conflict=0.1") for n in range(3)]
    engine = ScriptedEngine()
    monkeypatch.setattr(tasks, "get_sessionmaker", lambda: sessions)
    monkeypatch.setattr(tasks, "get_engine", lambda: engine)
    monkeypatch.setattr(tasks, "get_blob_store", lambda: store)
    monkeypatch.setattr(tasks, "get_settings", lambda: settings)
    totals = tasks.process_submission.run(*(str(i) for i in ids))
    # The first run takes the other two along; theirs then find them judged and lease nothing.
    assert totals == {"claimed": 3, "decided": 3, "failed": 0} and engine.batches == [3]


def test_a_worker_serves_its_metrics_unless_the_api_collects_them(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    server = tasks.serve_metrics(port)
    assert server is not None
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
            body = answer.read().decode()
        assert "moderation_verdicts_total" in body and "moderation_webhook_attempts_total" in body
        assert tasks.serve_metrics(port) is None  # the port is taken: logged, and the worker runs on
    finally:
        server.shutdown()
        server.server_close()
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", "/tmp")
    assert tasks.serve_metrics(port) is None
    assert tasks.serve_metrics(None) is None


def test_the_retention_task_erases_expired_submissions_and_deletes_their_images(
    monkeypatch: pytest.MonkeyPatch, sessions: Any, settings: Any, dispatched: Any, tmp_path: Any
) -> None:
    from datetime import timedelta

    from sqlalchemy import update

    from moderation.blobs import LocalBlobStore
    from moderation.db import utcnow
    from moderation.jobs import QUEUE_MAINTENANCE, TASK_RETENTION
    from moderation.submissions.models import Submission
    from tests.review.helpers import make_tenant
    from tests.submissions.helpers import add_decided
    from workers.celery_app import celery_app

    store = LocalBlobStore(tmp_path / "blobs", fsync=False)
    with sessions() as session, session.begin():
        submission = add_decided(session, make_tenant(session, settings), store, settings)
        session.execute(
            update(Submission)
            .where(Submission.id == submission.id)
            .values(created_at=utcnow() - timedelta(days=8))
        )
    monkeypatch.setattr(tasks, "get_sessionmaker", lambda: sessions)
    monkeypatch.setattr(tasks, "get_blob_store", lambda: store)
    monkeypatch.setattr(tasks, "get_settings", lambda: settings.model_copy(update={"retention_days": 7}))

    assert tasks.retention_task.run() == {"erased": 1, "images_deleted": 1}
    assert not store.exists(submission.image_sha256)
    assert tasks.retention_task.run() == {"erased": 0, "images_deleted": 0}
    # Beat runs it, on the maintenance queue.
    assert any(entry["task"] == TASK_RETENTION for entry in celery_app.conf.beat_schedule.values())
    assert celery_app.conf.task_routes[TASK_RETENTION] == {"queue": QUEUE_MAINTENANCE}
