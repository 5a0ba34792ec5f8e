"""The Celery application: broker, queues, routing and reliability settings."""

from __future__ import annotations

from celery import Celery
from kombu import Queue

from moderation.config import Settings, get_settings
from moderation.jobs import (
    QUEUE_GPU,
    QUEUE_MAINTENANCE,
    QUEUE_WEBHOOKS,
    TASK_DELIVER_WEBHOOK,
    TASK_PROCESS_SUBMISSION,
    TASK_SWEEP,
    Job,
)


def make_celery(settings: Settings | None = None) -> Celery:
    """Build the Celery app; tasks are registered by ``workers.tasks``."""
    settings = settings or get_settings()
    app = Celery("moderation", broker=settings.effective_broker_url, include=["workers.tasks"])
    app.conf.update(
        task_queues=[Queue(QUEUE_GPU), Queue(QUEUE_WEBHOOKS), Queue(QUEUE_MAINTENANCE)],
        task_default_queue=QUEUE_MAINTENANCE,
        task_routes={
            TASK_PROCESS_SUBMISSION: {"queue": QUEUE_GPU},
            TASK_DELIVER_WEBHOOK: {"queue": QUEUE_WEBHOOKS},
            TASK_SWEEP: {"queue": QUEUE_MAINTENANCE},
        },
        # A job is acknowledged only after it ran, and re-delivered if its worker died holding it.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        broker_connection_retry_on_startup=True,
        broker_transport_options={"visibility_timeout": max(3600, settings.processing_lease_seconds * 2)},
        worker_hijack_root_logger=False,
        beat_schedule={
            "sweep": {
                "task": TASK_SWEEP,
                "schedule": settings.sweep_interval_seconds,
                "options": {"expires": 60},
            },
        },
        timezone="UTC",
    )
    return app


class CeleryDispatcher:
    """Sends moderation jobs through a Celery app."""

    def __init__(self, app: Celery) -> None:
        self.app = app

    def dispatch(self, job: Job) -> None:
        """Send one job to its queue."""
        self.app.send_task(
            job.task, args=list(job.args), queue=job.queue, countdown=job.countdown, **job.options
        )


celery_app = make_celery()
