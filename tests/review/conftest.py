"""Fixtures of the review tests: blobs, a tenant with a review webhook, accounts and an API client."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from api.app import create_app
from moderation.blobs import LocalBlobStore
from moderation.config import Settings
from moderation.reviewers.service import create_reviewer
from moderation.tenants.models import Tenant
from tests.conftest import RecordingDispatcher
from tests.review.helpers import make_tenant


@pytest.fixture
def blobs(tmp_path: Path) -> LocalBlobStore:
    """A local blob store under tmp_path."""
    return LocalBlobStore(tmp_path / "blobs", fsync=False)


@pytest.fixture
def tenant(session: Session, settings: Settings) -> Tenant:
    """A tenant whose reviewed submissions are sent to a webhook endpoint."""
    return make_tenant(session, settings, hook="https://hooks.example/moderation")


@pytest.fixture
def app_client(
    settings: Settings, sessions: sessionmaker[Session], dispatched: RecordingDispatcher, redis_client: object
) -> Iterator[TestClient]:
    """The API on the test's transaction, reached as http://localhost (cookies without Secure)."""
    app = create_app(settings, dispatcher=dispatched)
    app.state.sessions = app.state.intake_sessions = sessions
    app.state.blob_store = LocalBlobStore(settings.effective_blob_dir, fsync=False)
    with TestClient(app, base_url="http://localhost") as client:
        yield client


@dataclass
class Account:
    """A reviewer account and its password."""

    email: str
    password: str
    role: str


@pytest.fixture
def accounts(sessions: sessionmaker[Session]) -> dict[str, Account]:
    """A reviewer, a lead and an admin."""
    made = {}
    with sessions() as session, session.begin():
        for role in ("reviewer", "lead", "admin"):
            account = Account(f"{role}@example.com", f"{role} password 123", role)
            create_reviewer(session, account.email, role, account.password)
            made[role] = account
    return made


def login(client: TestClient, account: Account) -> str:
    """Sign in through the real login form; the session's CSRF token."""
    page = client.get("/review/login")
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert token is not None, page.text
    response = client.post(
        "/review/login",
        data={
            "email": account.email,
            "password": account.password,
            "csrf_token": token.group(1),
            "next": "/review",
        },
        follow_redirects=False,
    )
    assert response.status_code == 303, response.text
    home = client.get("/review")
    csrf = re.search(r'<meta name="csrf-token" content="([^"]+)"', home.text)
    assert csrf is not None
    return csrf.group(1)
