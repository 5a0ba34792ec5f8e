"""Request bodies are capped while they are read, before authentication and parsing."""

from __future__ import annotations

from collections.abc import Iterator

from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from api.app import create_app
from moderation.config import Settings
from tests.api.conftest import ApiTenant
from tests.conftest import RecordingDispatcher, make_jpeg


def _chunks(total: int, size: int = 4096) -> Iterator[bytes]:
    """A body sent without Content-Length (chunked)."""
    for _ in range(total // size):
        yield b"x" * size


def test_bodies_over_the_limit_are_refused_before_authentication_and_parsing(
    settings: Settings, sessions: sessionmaker[Session], dispatched: RecordingDispatcher, tenant: ApiTenant
) -> None:
    settings.max_request_bytes = 8192
    app = create_app(settings, dispatcher=dispatched)
    app.state.sessions = app.state.intake_sessions = sessions
    json_type = {"Content-Type": "application/json"}
    with TestClient(app) as client:
        declared = client.post("/v1/webhook-endpoints", content=b"x" * 20_000, headers=json_type)
        streamed = client.post("/v1/webhook-endpoints", content=_chunks(400_000), headers=json_type)
        for response in (declared, streamed):
            assert response.status_code == 413
            assert response.json()["error"]["code"] == "payload_too_large"
            assert "8192-byte limit" in response.json()["error"]["message"]
        # Under the limit, the route answers as before (here: no key, 401).
        assert client.post("/v1/webhook-endpoints", content=b"{}", headers=json_type).status_code == 401
        # Forms of the review UI are capped too.
        form_type = {"Content-Type": "application/x-www-form-urlencoded"}
        form = client.post("/review/login", content=_chunks(400_000), headers=form_type)
        assert form.status_code == 413
        # Intake keeps its own, image-sized limit.
        image = make_jpeg(400, 300, seed=7)
        assert len(image) > settings.max_request_bytes
        accepted = client.post(
            "/v1/submissions",
            files={"image": ("x.jpg", image, "image/jpeg")},
            data={"caption": "a large upload"},
            headers=tenant.headers,
        )
        assert accepted.status_code == 202, accepted.text
