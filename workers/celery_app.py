"""The Celery application: broker, queues, routing and reliability settings."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from celery import Celery, uuid
from kombu import Producer, Queue

from moderation.config import Settings, get_settings
from moderation.jobs import (
    QUEUE_GPU,
    QUEUE_MAINTENANCE,
    QUEUE_WEBHOOKS,
    TASK_DELIVER_WEBHOOK,
    TASK_PROCESS_SUBMISSION,
    TASK_RETENTION,
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
            TASK_RETENTION: {"queue": QUEUE_MAINTENANCE},
        },
        # A job is acknowledged only after it ran, and re-delivered if its worker died holding it.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        broker_connection_retry_on_startup=True,
        # A publish that fails is logged and the sweeper re-enqueues its submission from Postgres, so a
        # broker outage must not hold intake requests (and their store slots) in long retry loops.
        task_publish_retry_policy={
            "max_retries": 1,
            "interval_start": 0,
            "interval_step": 0.2,
            "interval_max": 0.2,
        },
        broker_transport_options={"visibility_timeout": max(3600, settings.processing_lease_seconds * 2)},
        worker_hijack_root_logger=False,
        beat_schedule={
            "sweep": {
                "task": TASK_SWEEP,
                "schedule": settings.sweep_interval_seconds,
                "options": {"expires": 60},
            },
            "retention": {
                "task": TASK_RETENTION,
                "schedule": settings.retention_interval_seconds,
                "options": {"expires": max(60.0, settings.retention_interval_seconds)},
            },
        },
        timezone="UTC",
    )
    return app


class CeleryDispatcher:
    """Sends moderation jobs through a Celery app."""

    def __init__(self, app: Celery) -> None:
        self.app = app
        self._declared: set[str] = set()
        self._sent_event = bool(app.conf.task_send_sent_event)

    def dispatch(self, job: Job) -> None:
        """Send one job to its queue."""
        if job.options:
            self._send_with_options(job)
            return
        with self.app.producer_or_acquire() as producer:
            self._publish(producer, job)

    def dispatch_many(self, jobs: Sequence[Job]) -> None:
        """Send several jobs; on Redis they go out in one pipelined round trip."""
        for job in jobs:
            if job.options:
                self._send_with_options(job)
        plain = [job for job in jobs if not job.options]
        if not plain:
            return
        with self.app.producer_or_acquire() as producer, producer.batch():
            for job in plain:
                self._publish(producer, job)

    def _send_with_options(self, job: Job) -> None:
        self.app.send_task(
            job.task, args=list(job.args), queue=job.queue, countdown=job.countdown, **job.options
        )

    def _publish(self, producer: Producer, job: Job) -> None:
        # The steps of send_task that a job of ID-only arguments needs, without its per-call routing,
        # option merging, result object and queue declaration: about half the CPU of send_task.
        amqp = self.app.amqp
        parent = self.app.current_worker_task
        args = list(job.args)
        message = amqp.create_task_message(
            uuid(),
            job.task,
            args,
            {},
            countdown=job.countdown,
            reply_to=self.app.thread_oid,
            create_sent_event=self._sent_event,
            root_id=(parent.request.root_id or parent.request.id) if parent else None,
            parent_id=parent.request.id if parent else None,
            ignore_result=True,
            argsrepr=repr(args),
            kwargsrepr="{}",
        )
        # Celery declares the queue on every publish (cached per connection, but not free); once per
        # process is enough, as queues outlive connections (durable on AMQP, implicit on Redis).
        declare: list[Queue] | None = [] if job.queue in self._declared else None
        _reuse_redis_client(producer.channel)
        amqp.send_task_message(producer, job.task, message, queue=job.queue, declare=declare)
        self._declared.add(job.queue)


def _reuse_redis_client(channel: Any) -> None:
    """Make a kombu Redis channel publish through one client instead of building one per message.

    kombu's Redis channel creates a new ``redis.Redis`` for every publish, and building one (its table of
    ~170 response callbacks) costs more CPU than the LPUSH itself. The client is only a handle on the
    channel's connection pool, so one per channel serves every publish of that channel.
    """
    create = getattr(channel, "_create_client", None)
    if create is None or "_create_client" in vars(channel):
        return  # not a Redis channel, or already set up
    clients: list[Any] = []

    def create_client(asynchronous: bool = False) -> Any:
        if asynchronous:
            return create(asynchronous=True)
        # kombu replaces the channel's pool after it disconnects one (after a fork, say): follow it.
        if not clients or clients[0].connection_pool is not getattr(channel, "_pool", None):
            clients[:] = [create()]
        return clients[0]

    channel._create_client = create_client


celery_app = make_celery()
