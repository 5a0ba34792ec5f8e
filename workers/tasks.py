"""Celery tasks: thin adapters that pass IDs into the core services."""

from __future__ import annotations

import logging
import os
import threading
import uuid
from typing import Any
from wsgiref.simple_server import WSGIServer

from celery import signals
from celery.exceptions import WorkerShutdown
from prometheus_client import start_http_server
from sqlalchemy.exc import OperationalError

from moderation import jobs
from moderation.blobs import BlobStore, blob_store_from_settings
from moderation.config import get_settings
from moderation.db import get_sessionmaker, reset_engine
from moderation.engine.base import ModerationEngine
from moderation.net.safe_http import OutboundPolicy, SafeHttpClient
from moderation.processing.service import BatchProcessor, EngineUnhealthy, sweep
from moderation.submissions import erasure
from moderation.webhooks.service import attempt_delivery
from workers.celery_app import CeleryDispatcher, celery_app

logger = logging.getLogger(__name__)

_RETENTION_ROUNDS = 20  # batches per run
_lock = threading.Lock()
_engine: ModerationEngine | None = None
_blob_store: BlobStore | None = None
_http: SafeHttpClient | None = None


def get_engine() -> ModerationEngine:
    """The engine of this worker process, loaded and warmed up once."""
    global _engine
    with _lock:
        if _engine is None:
            from moderation.engine import load_engine

            settings = get_settings()
            engine = load_engine(settings)
            if settings.warmup:
                engine.warmup()
            health = engine.health()
            if not health.ok:
                raise RuntimeError(f"engine failed its health check: {health.detail}")
            logger.info("engine ready: %s on %s", engine.info.name, health.device)
            _engine = engine
        return _engine


def get_blob_store() -> BlobStore:
    """The blob store of this worker process."""
    global _blob_store
    if _blob_store is None:
        _blob_store = blob_store_from_settings(get_settings())
    return _blob_store


def get_http() -> SafeHttpClient:
    """The outbound HTTP client of this worker process."""
    global _http
    if _http is None:
        _http = SafeHttpClient(OutboundPolicy.from_settings(get_settings()))
    return _http


@signals.worker_process_init.connect
def _after_fork(**_: Any) -> None:
    # Connections must not be shared across fork.
    reset_engine()


@signals.worker_init.connect
def _configure(**_: Any) -> None:
    jobs.set_dispatcher(CeleryDispatcher(celery_app))
    serve_metrics(get_settings().worker_metrics_port)


def serve_metrics(port: int | None) -> WSGIServer | None:
    """Serve this worker's Prometheus metrics on ``port`` (a worker has no HTTP server of its own)."""
    if port is None or os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return None  # multi-process mode: the API's /metrics reads every process's files
    try:
        server, _ = start_http_server(port)
    except OSError as exc:  # a second worker on the same host and port: its metrics stay unserved, it runs
        logger.error("could not serve metrics on port %d: %s", port, exc)
        return None
    logger.info("serving worker metrics on port %d", port)
    return server


def _engine_or_shutdown() -> ModerationEngine:
    """This process's engine; a worker whose engine cannot be loaded stops, so that its supervisor restarts it.

    Kept running, it would take every GPU job and fail it before leasing anything: submissions would wait,
    re-sent by the sweeper, with no attempt or error recorded anywhere.
    """
    try:
        return get_engine()
    except Exception as exc:
        logger.critical("the moderation engine could not be loaded (%s); stopping this GPU worker", exc)
        raise WorkerShutdown(f"moderation engine could not be loaded: {exc}") from exc


@signals.worker_ready.connect
def _preload_engine(sender: Any = None, **_: Any) -> None:
    queues = (
        {q.name for q in getattr(getattr(sender, "task_consumer", None), "queues", [])} if sender else set()
    )
    if jobs.QUEUE_GPU in queues:
        # WorkerShutdown is no Exception: Celery's signal dispatch lets it through, and the worker stops.
        _engine_or_shutdown()


@celery_app.task(
    name=jobs.TASK_PROCESS_SUBMISSION,
    acks_late=True,
    autoretry_for=(OperationalError,),
    retry_backoff=True,
    retry_backoff_max=60,
    max_retries=5,
)
def process_submission(*submission_ids: str) -> dict[str, int]:
    """Judge the submissions (and whatever else is queued, as one batch per run)."""
    processor = BatchProcessor(get_sessionmaker(), _engine_or_shutdown(), get_blob_store(), get_settings())
    totals = {"claimed": 0, "decided": 0, "failed": 0}
    try:
        # The first run usually takes the others along as companions; their runs then return at once.
        for submission_id in submission_ids:
            report = processor.run(uuid.UUID(submission_id))
            totals["claimed"] += len(report.claimed)
            totals["decided"] += len(report.decided)
            totals["failed"] += len(report.failed)
    except EngineUnhealthy:
        # Leave: the orchestrator restarts the worker with a fresh device context and a freshly loaded
        # model; the batch's attempts are recorded and the sweeper re-enqueues its submissions.
        logger.critical("the moderation engine is unhealthy; stopping this GPU worker", exc_info=True)
        raise WorkerShutdown("moderation engine unhealthy") from None
    return totals


@celery_app.task(
    name=jobs.TASK_DELIVER_WEBHOOK,
    acks_late=True,
    autoretry_for=(OperationalError,),
    retry_backoff=True,
    max_retries=5,
)
def deliver_webhook(delivery_id: str) -> str | None:
    """Make one attempt at a webhook delivery; the service schedules any retry."""
    outcome = attempt_delivery(get_sessionmaker(), uuid.UUID(delivery_id), get_http(), get_settings())
    return outcome.status.value if outcome.status else None


@celery_app.task(name=jobs.TASK_RETENTION, acks_late=True)
def retention_task() -> dict[str, int]:
    """Erase submissions past the retention period, then delete the images no one needs any more."""
    sessions, settings = get_sessionmaker(), get_settings()
    erased = deleted = 0
    for _ in range(_RETENTION_ROUNDS):  # bounded, so one run cannot hold a maintenance worker for long
        count = erasure.erase_expired(sessions, settings)
        erased += count
        if count < erasure.BATCH:
            break
    for _ in range(_RETENTION_ROUNDS):
        report = erasure.release_erased_images(sessions, get_blob_store())
        deleted += report.deleted
        if report.submissions + report.failed < erasure.BATCH:
            break
    return {"erased": erased, "images_deleted": deleted}


@celery_app.task(name=jobs.TASK_SWEEP, acks_late=True)
def sweep_task() -> dict[str, int]:
    """Recover lost and stalled work."""
    report = sweep(get_sessionmaker(), get_settings())
    return {"requeued": len(report.requeued), "expired": len(report.expired), "failed": len(report.failed)}
