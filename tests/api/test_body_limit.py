"""Request bodies are capped while they are read, before authentication and parsing."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker
from starlette.types import ASGIApp, Message, Receive

from api.app import create_app
from api.body_limit import BodyLimitMiddleware
from api.errors import install_error_handlers
from api.multipart import read_body
from moderation.config import Settings
from moderation.errors import RequestTimeout
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


async def _call(app: ASGIApp, path: str, receive: Receive) -> tuple[int, dict[str, object]]:
    """Drive ``app`` with one POST whose body ``receive`` delivers; its status and JSON answer."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/octet-stream")],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    await app(scope, receive, send)
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, json.loads(body)


def test_a_body_that_trickles_in_is_cut_off_with_408() -> None:
    inner = FastAPI()
    install_error_handlers(inner)

    @inner.post("/echo")
    @inner.post("/v1/submissions")
    async def echo(request: Request) -> dict[str, int]:
        return {"bytes": len(await request.body())}

    app = BodyLimitMiddleware(inner, limit=1000, timeout=0.3, exempt={"/v1/submissions"})

    def trickle(chunks: int, pause: float) -> Receive:
        sent = 0

        async def receive() -> Message:
            nonlocal sent
            if sent == chunks:
                await asyncio.sleep(3600)  # the client keeps the connection open and sends nothing more
            await asyncio.sleep(pause)
            sent += 1
            return {"type": "http.request", "body": b"x", "more_body": sent < chunks}

        return receive

    async def scenario() -> None:
        assert await _call(app, "/echo", trickle(3, 0.01)) == (200, {"bytes": 3})
        status, answer = await _call(app, "/echo", trickle(100, 0.05))
        assert status == 408
        assert answer["error"] == {  # type: ignore[comparison-overlap]
            "code": "request_timeout",
            "message": "the request body did not arrive within 0.3 s",
        }
        # The exempt path (intake) enforces its own limits; the others get the middleware's.
        assert await _call(app, "/v1/submissions", trickle(1500, 0)) == (200, {"bytes": 1500})
        status, answer = await _call(app, "/echo", trickle(1500, 0))
        assert status == 413

    asyncio.run(scenario())


def test_intake_reads_its_body_within_one_deadline() -> None:
    async def scenario() -> None:
        sent = 0

        async def trickle() -> Message:
            nonlocal sent
            await asyncio.sleep(0.05)
            sent += 1
            return {"type": "http.request", "body": b"x", "more_body": True}

        request = Request({"type": "http", "method": "POST", "headers": []}, trickle)
        with pytest.raises(RequestTimeout, match=r"within 0\.3 s"):
            await read_body(request, 1_000_000, too_large="too large", timeout=0.3)
        assert 3 <= sent <= 8

    asyncio.run(scenario())
