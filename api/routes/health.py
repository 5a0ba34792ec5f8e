"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from typing import Any, cast

import kombu
from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import REGISTRY, Collector
from sqlalchemy import text

from moderation.jobs import QUEUE_GPU, QUEUE_MAINTENANCE, QUEUE_WEBHOOKS
from moderation.submissions.repository import SubmissionRepository

router = APIRouter(tags=["operations"])


def _broker(url: str) -> kombu.Connection:
    """A short-lived connection to a broker other than the service's Redis, failing fast when it is down."""
    return kombu.Connection(url, connect_timeout=2, transport_options={"socket_timeout": 2})


@router.get("/healthz")
async def healthz(request: Request) -> JSONResponse:
    """The process is alive and can still store submissions (its intake writer's thread is running)."""
    if request.app.state.intake_writer.died:
        # Every submission would wait for a writer that is gone: only a restart brings intake back.
        return JSONResponse({"status": "error", "intake_writer": "stopped"}, status_code=503)
    return JSONResponse({"status": "ok"})


@router.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    """The database, the broker and the blob store are reachable, and intake's writer is running."""
    state = request.app.state
    writer = state.intake_writer
    stuck = writer.busy_for
    checks: dict[str, str] = {"intake_writer": "ok"}
    if not writer.running:
        checks["intake_writer"] = "error: stopped"
    elif stuck > state.settings.intake_timeout_seconds:
        checks["intake_writer"] = f"error: stuck on one batch for {stuck:.0f} s"

    def _check() -> None:
        try:
            with state.sessions() as session:
                session.execute(text("SELECT 1"))
            checks["database"] = "ok"
        except Exception as exc:
            checks["database"] = f"error: {type(exc).__name__}"
        try:
            settings = state.settings
            if settings.broker_url is None:
                state.redis.ping()  # Redis is the broker
            else:
                with _broker(settings.broker_url) as connection:
                    connection.ensure_connection(max_retries=1)
            checks["broker"] = "ok"
        except Exception as exc:
            checks["broker"] = f"error: {type(exc).__name__}"
        try:
            state.blob_store.check()
            checks["blob_store"] = "ok"
        except Exception as exc:
            checks["blob_store"] = f"error: {type(exc).__name__}"

    await run_in_threadpool(_check)
    ok = all(v == "ok" for v in checks.values())
    return JSONResponse(
        {"status": "ok" if ok else "unavailable", "checks": checks}, status_code=200 if ok else 503
    )


def _declared_depth(connection: kombu.Connection, queue: str) -> int:
    """Messages waiting in a broker queue (0 while no worker has declared it yet)."""
    try:
        # A fresh channel per queue: asking about a queue that does not exist closes the channel.
        with connection.channel() as channel:
            return int(channel.queue_declare(queue=queue, passive=True).message_count)
    except connection.channel_errors:
        return 0


#: Seconds the table counts are reused: counting every row of two growing tables at each scrape of each API
#: process would slow scrapes down as the tables grow.
TABLE_COUNTS_MAX_AGE = 30.0
_counts_lock = threading.Lock()


def _table_counts(state: Any) -> tuple[dict[str, int], dict[str, int]] | None:
    """Submissions by status and verdicts by decision, counted at most every TABLE_COUNTS_MAX_AGE seconds."""
    with _counts_lock:
        cached: tuple[float, Any] | None = getattr(state, "table_counts", None)
        if cached is not None and time.monotonic() - cached[0] < TABLE_COUNTS_MAX_AGE:
            return cast(tuple[dict[str, int], dict[str, int]] | None, cached[1])
        try:
            with state.sessions() as session:
                repo = SubmissionRepository(session)
                value = (repo.count_by_status(), repo.count_verdicts_by_decision())
        except Exception:  # a scrape must not fail because the database is down
            value = None
        state.table_counts = (time.monotonic(), value)
        return value


class QueueDepthCollector(Collector):
    """Reads queue depth at scrape time: submissions by status in Postgres, messages per broker queue."""

    def __init__(self, request: Request) -> None:
        self.state = request.app.state

    def collect(self) -> Iterator[Metric]:
        """Yield the gauges."""
        by_status = GaugeMetricFamily("moderation_submissions", "Submissions by status", labels=["status"])
        by_decision = GaugeMetricFamily(
            "moderation_verdicts", "Stored verdicts by decision", labels=["decision"]
        )
        broker = GaugeMetricFamily(
            "moderation_broker_queue_depth", "Messages waiting per queue", labels=["queue"]
        )
        counts = _table_counts(self.state)
        if counts is not None:
            for status, count in counts[0].items():
                by_status.add_metric([status], count)
            for decision, count in counts[1].items():
                by_decision.add_metric([decision], count)
        queues = (QUEUE_GPU, QUEUE_WEBHOOKS, QUEUE_MAINTENANCE)
        try:
            if self.state.settings.broker_url is None:
                for queue in queues:
                    broker.add_metric([queue], int(self.state.redis.llen(queue)))
            else:
                with _broker(self.state.settings.broker_url) as connection:
                    for queue in queues:
                        broker.add_metric([queue], _declared_depth(connection, queue))
        except Exception:  # noqa: S110
            pass
        yield from (by_status, by_decision, broker)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    """Prometheus metrics of this process (and of the workers, in multi-process mode)."""

    def _render() -> bytes:
        registry = CollectorRegistry()
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            MultiProcessCollector(registry)
        else:
            for collector in list(REGISTRY._collector_to_names):
                registry.register(collector)
        registry.register(QueueDepthCollector(request))
        return generate_latest(registry)

    return Response(await run_in_threadpool(_render), media_type=CONTENT_TYPE_LATEST)
