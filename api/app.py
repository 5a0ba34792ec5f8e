"""The FastAPI application factory."""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import anyio.to_thread
import redis
import redis.asyncio
from fastapi import FastAPI
from sqlalchemy.orm import sessionmaker

from api.body_limit import BodyLimitMiddleware
from api.deps import TenantCache
from api.direct import DirectRoutesAPI
from api.errors import install_error_handlers
from api.routes import appeals, health, policy, review, submissions, tenant, webhooks
from api.ui import routes as review_ui
from moderation import jobs
from moderation.blobs import blob_store_from_settings
from moderation.config import Settings, get_settings
from moderation.db import make_engine
from moderation.ratelimit import RateLimiter
from moderation.submissions.intake import IntakeWriter, intake_sessionmaker

logger = logging.getLogger(__name__)


def create_app(
    settings: Settings | None = None, *, dispatcher: jobs.JobDispatcher | None = None
) -> DirectRoutesAPI:
    """Build the API application."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.redis = redis.Redis.from_url(settings.redis_url, socket_timeout=2, socket_connect_timeout=2)
        # The limiter's one round trip per request runs on the event loop, not in a worker thread.
        app.state.redis_async = redis.asyncio.Redis.from_url(
            settings.redis_url, socket_timeout=2, socket_connect_timeout=2
        )
        app.state.rate_limiter = RateLimiter(app.state.redis_async)
        app.state.intake_writer = IntakeWriter(
            app.state.intake_sessions,
            app.state.blob_store,
            max_batch=settings.intake_batch_max,
            job_interval=settings.intake_job_interval_ms / 1000,
            job_max_submissions=settings.batch_max_size,
        )
        app.state.intake_writer.start()
        if dispatcher is not None:
            jobs.set_dispatcher(dispatcher)
        else:
            from workers.celery_app import CeleryDispatcher, make_celery

            publisher = make_celery(settings)
            # This process only publishes: a broker that stops answering fails a publish in seconds (the
            # sweeper re-sends the job) instead of holding intake's writer on a dead socket.
            publisher.conf.broker_transport_options = {
                **publisher.conf.broker_transport_options,
                "socket_timeout": 5,
                "socket_connect_timeout": 5,
            }
            jobs.set_dispatcher(CeleryDispatcher(publisher))
        # Everything imported and built so far lives as long as the process: keep it out of the cyclic
        # garbage collector's scans, whose full passes over it otherwise stall requests for milliseconds.
        gc.collect()
        gc.freeze()
        if settings.allow_private_network:
            logger.warning(
                "DEVELOPMENT MODE: image_url fetches and webhooks may reach private and loopback addresses"
            )
        yield
        # Requests still waiting on the writer are answered before the process goes.
        await anyio.to_thread.run_sync(app.state.intake_writer.close)
        await anyio.to_thread.run_sync(app.state.blob_store.close)
        app.state.redis.close()
        await app.state.redis_async.aclose()

    app = DirectRoutesAPI(
        title="Moderation API",
        version="1",
        description="Image + caption content moderation with explanatory verdicts, human review and webhooks.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.sessions = sessionmaker(
        bind=make_engine(settings.database_url, statement_timeout_seconds=settings.intake_timeout_seconds),
        expire_on_commit=False,
    )
    app.state.intake_sessions = intake_sessionmaker(settings)
    app.state.blob_store = blob_store_from_settings(settings)
    app.state.tenant_cache = TenantCache()
    app.state.fetch_limiter = anyio.CapacityLimiter(settings.fetch_concurrency)
    install_error_handlers(app)
    # Intake caps its own body (sized for an image, and in time) as it reads it.
    app.add_middleware(
        BodyLimitMiddleware,
        limit=settings.max_request_bytes,
        timeout=settings.request_body_timeout_seconds,
        exempt={"/v1/submissions"},
    )
    app.include_router(health.router)
    app.include_router(submissions.router)
    app.include_router(webhooks.router)
    app.include_router(tenant.router)
    app.include_router(appeals.router)
    app.include_router(review.router)
    app.include_router(review_ui.router)
    app.include_router(policy.router)
    # Intake is the one route under sustained load: it skips the framework's per-request layers.
    app.serve_directly(submissions.create_submission)
    return app
