"""Shared fixtures of the processing tests: a blob store, a tenant with a webhook endpoint, a submit helper."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from moderation.blobs import LocalBlobStore
from moderation.config import Settings
from moderation.submissions.service import submit
from moderation.tenants.models import Tenant
from moderation.tenants.service import create_tenant
from moderation.webhooks.models import WebhookEndpoint
from tests.conftest import make_jpeg


@pytest.fixture
def store(tmp_path: Path) -> LocalBlobStore:
    """A local blob store in the test's folder."""
    return LocalBlobStore(tmp_path / "blobs", fsync=False)


@pytest.fixture
def tenant(sessions: sessionmaker[Session], settings: Settings) -> Tenant:
    """A tenant subscribed to decided and failed events."""
    with sessions() as session, session.begin():
        tenant = create_tenant(session, "acme", settings).tenant
        session.add(
            WebhookEndpoint(
                tenant_id=tenant.id,
                url="http://hooks.example/x",
                events=["submission.decided", "submission.failed"],
                secret="whsec_AAAA",
            )
        )
        session.expunge(tenant)
    return tenant


def submit_one(
    sessions: sessionmaker[Session],
    tenant: Tenant,
    store: LocalBlobStore,
    settings: Settings,
    caption: str,
    image: bytes | None = None,
) -> uuid.UUID:
    """Accept one submission (a small JPEG unless given) and commit it."""
    with sessions() as session, session.begin():
        return submit(
            session,
            tenant,
            image=image or make_jpeg(64, 64),
            caption=caption,
            blob_store=store,
            settings=settings,
        ).submission.id
