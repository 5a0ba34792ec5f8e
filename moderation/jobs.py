"""Background jobs that reach the broker only after the transaction that made their rows commits."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from sqlalchemy import event
from sqlalchemy.orm import Session

logger = logging.getLogger(__name__)

_PENDING_KEY = "moderation_pending_jobs"

QUEUE_GPU = "gpu"
QUEUE_WEBHOOKS = "webhooks"
QUEUE_MAINTENANCE = "maintenance"

TASK_PROCESS_SUBMISSION = "moderation.process_submission"
TASK_DELIVER_WEBHOOK = "moderation.deliver_webhook"
TASK_SWEEP = "moderation.sweep"
TASK_RETENTION = "moderation.retention"


@dataclass(frozen=True)
class Job:
    """A task to run: its registered name, ID-only arguments, queue and optional delay."""

    task: str
    args: tuple[str, ...]
    queue: str
    countdown: float | None = None
    options: dict[str, Any] = field(default_factory=dict)


class JobDispatcher(Protocol):
    """Something that hands jobs to a broker (Celery in production)."""

    def dispatch(self, job: Job) -> None:
        """Send one job to the broker."""


@runtime_checkable
class BatchJobDispatcher(JobDispatcher, Protocol):
    """A dispatcher that can send several jobs at once (one round trip where the broker allows)."""

    def dispatch_many(self, jobs: Sequence[Job]) -> None:
        """Send several jobs to the broker."""


class _NullDispatcher:
    def dispatch(self, job: Job) -> None:
        logger.warning(
            "no job dispatcher configured; dropping %s%s (the sweeper will recover it)", job.task, job.args
        )


_dispatcher: JobDispatcher = _NullDispatcher()


def set_dispatcher(dispatcher: JobDispatcher) -> None:
    """Install the process-wide job dispatcher."""
    global _dispatcher
    _dispatcher = dispatcher


def get_dispatcher() -> JobDispatcher:
    """The process-wide job dispatcher."""
    return _dispatcher


def enqueue_after_commit(session: Session, job: Job) -> None:
    """Queue a job to be dispatched once the session's transaction commits; dropped on rollback."""
    session.info.setdefault(_PENDING_KEY, []).append(job)


def dispatch_now(job: Job) -> None:
    """Dispatch a job immediately; a broker failure is logged, since the sweeper re-enqueues lost work."""
    try:
        _dispatcher.dispatch(job)
    except Exception:
        logger.exception("could not dispatch %s%s; the sweeper will recover it", job.task, job.args)


def dispatch_all(jobs: Sequence[Job]) -> None:
    """Dispatch jobs together where the dispatcher can; broker failures are logged (the sweeper recovers)."""
    if len(jobs) > 1 and isinstance(_dispatcher, BatchJobDispatcher):
        try:
            _dispatcher.dispatch_many(jobs)
        except Exception:
            logger.exception("could not dispatch %d jobs; the sweeper will recover them", len(jobs))
        return
    for job in jobs:
        dispatch_now(job)


@event.listens_for(Session, "after_commit")
def _dispatch_pending(session: Session) -> None:
    dispatch_all(session.info.pop(_PENDING_KEY, []))


@event.listens_for(Session, "after_rollback")
def _drop_pending(session: Session) -> None:
    dropped = session.info.pop(_PENDING_KEY, [])
    if dropped:
        logger.debug("rollback dropped %d pending jobs", len(dropped))
