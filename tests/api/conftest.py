"""An API app wired to the test's rolled-back transaction, with a tenant and its key."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from api.app import create_app
from moderation.config import Settings
from moderation.tenants.models import Tenant
from moderation.tenants.service import create_tenant
from tests.conftest import RecordingDispatcher


@dataclass
class ApiTenant:
    """A tenant and the headers that authenticate as it."""

    tenant: Tenant
    key: str

    @property
    def headers(self) -> dict[str, str]:
        """Authorization headers."""
        return {"Authorization": f"Bearer {self.key}"}


@pytest.fixture
def client(
    settings: Settings, sessions: sessionmaker[Session], dispatched: RecordingDispatcher, redis_client: object
) -> Iterator[TestClient]:
    """A test client of the API on the test's transaction."""
    app = create_app(settings, dispatcher=dispatched)
    app.state.sessions = app.state.intake_sessions = sessions
    with TestClient(app) as test_client:
        yield test_client


def _tenant(sessions: sessionmaker[Session], settings: Settings, name: str) -> ApiTenant:
    with sessions() as session, session.begin():
        issued = create_tenant(session, name, settings)
        session.expunge(issued.tenant)
    return ApiTenant(issued.tenant, issued.key)


@pytest.fixture
def tenant(sessions: sessionmaker[Session], settings: Settings) -> ApiTenant:
    """A tenant with an API key."""
    return _tenant(sessions, settings, "acme")


@pytest.fixture
def other_tenant(sessions: sessionmaker[Session], settings: Settings) -> ApiTenant:
    """A second tenant, to check isolation."""
    return _tenant(sessions, settings, "globex")


@pytest.fixture
def image_server() -> Iterator[str]:
    """A local HTTP server that serves one JPEG at /image.jpg; yields its URL."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from tests.conftest import make_jpeg

    body = make_jpeg(100, 80)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path != "/image.jpg":
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/image.jpg"
    server.shutdown()
