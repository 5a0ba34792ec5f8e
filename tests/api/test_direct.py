"""Intake served straight from the app's entry answers exactly as through the framework's layers."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi import Request
from fastapi.responses import JSONResponse, Response
from fastapi.testclient import TestClient
from opentelemetry.trace import NoOpTracerProvider
from sqlalchemy.orm import Session, sessionmaker
from starlette.middleware.gzip import GZipMiddleware

from api.app import create_app
from api.body_limit import BodyLimitMiddleware
from api.direct import DirectRoutesAPI
from api.errors import install_error_handlers
from api.routes import submissions
from moderation.config import Settings
from moderation.errors import InvalidInput
from tests.api.conftest import ApiTenant
from tests.conftest import RecordingDispatcher, make_jpeg


def _scope(method: str, path: str, root_path: str = "") -> dict[str, Any]:
    return {"type": "http", "method": method, "path": path, "root_path": root_path}


@pytest.fixture
def app(
    settings: Settings, sessions: sessionmaker[Session], dispatched: RecordingDispatcher, redis_client: object
) -> DirectRoutesAPI:
    """The API app on the test's transaction."""
    app = create_app(settings, dispatcher=dispatched)
    app.state.sessions = app.state.intake_sessions = sessions
    return app


def test_only_intake_posts_are_served_directly(app: DirectRoutesAPI) -> None:
    assert app.direct_endpoint(_scope("POST", "/v1/submissions")) is submissions.create_submission
    assert app.direct_endpoint(_scope("GET", "/v1/submissions")) is None
    assert app.direct_endpoint(_scope("POST", "/v1/submissions/")) is None  # the router redirects it
    assert app.direct_endpoint(_scope("POST", "/v1/submissions/x")) is None
    assert app.direct_endpoint({"type": "websocket", "path": "/v1/submissions"}) is None
    # Behind a proxy's prefix, matched as the router matches it.
    assert app.direct_endpoint(_scope("POST", "/api/v1/submissions", "/api")) is submissions.create_submission
    assert app.direct_endpoint(_scope("POST", "/apiv1/submissions", "/api")) is None


def _exchange(
    client: TestClient, tenant: ApiTenant, key: str
) -> list[tuple[int, dict[str, Any], dict[str, str]]]:
    """Status, JSON body (without the new id and time) and headers of one request of each kind."""
    jpeg = make_jpeg(seed=7)
    files = {"image": ("x.jpg", jpeg, "image/jpeg")}
    answers = [
        client.post("/v1/submissions", files=files, data={"caption": "a cat"}, headers=tenant.headers),
        client.post("/v1/submissions", files=files, data={"caption": "a cat"}),
        client.post("/v1/submissions", files=files, data={"caption": ""}, headers=tenant.headers),
        client.post(
            "/v1/submissions", content=b"x", headers={**tenant.headers, "content-type": "text/plain"}
        ),
        *(
            client.post(
                "/v1/submissions",
                files=files,
                data={"caption": "again"},
                headers={**tenant.headers, "Idempotency-Key": key},
            )
            for _ in range(2)
        ),
    ]
    out = []
    for res in answers:
        body = res.json()
        if "id" in body:
            body = {**body, "id": "…", "created_at": "…"}
        headers = {k: v for k, v in res.headers.items() if k not in ("content-length", "location")}
        out.append((res.status_code, body, headers))
    return out


def test_direct_and_framework_answers_are_identical(
    settings: Settings,
    sessions: sessionmaker[Session],
    dispatched: RecordingDispatcher,
    redis_client: object,
    tenant: ApiTenant,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    answers = []
    for direct in (True, False):
        app = create_app(settings, dispatcher=dispatched)
        app.state.sessions = app.state.intake_sessions = sessions
        if not direct:
            monkeypatch.setattr(app, "direct_endpoint", lambda scope: None)
        with TestClient(app) as client:
            answers.append(_exchange(client, tenant, key=f"key-{direct}"))
    assert answers[0] == answers[1]
    assert [status for status, _, _ in answers[0]] == [202, 401, 422, 415, 202, 202]
    assert answers[0][5][2]["idempotent-replayed"] == "true"


def test_an_unexpected_error_is_a_json_500_on_the_direct_route(
    app: DirectRoutesAPI, tenant: ApiTenant, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    with TestClient(app, raise_server_exceptions=False) as client:

        def broken(*args: object, **kwargs: object) -> None:
            raise RuntimeError("a bug in the writer")

        monkeypatch.setattr(app.state.intake_writer, "submit_from_loop", broken)
        files = {"image": ("x.jpg", make_jpeg(), "image/jpeg")}
        res = client.post("/v1/submissions", files=files, data={"caption": "x"}, headers=tenant.headers)
        assert res.status_code == 500
        assert res.json() == {"error": {"code": "internal_error", "message": "internal server error"}}
        assert "a bug in the writer" in caplog.text
        assert client.get("/healthz").status_code == 200  # still serving


def _bare_app(**kwargs: Any) -> DirectRoutesAPI:
    """A small app with one direct route that fails on request."""
    app = DirectRoutesAPI(**kwargs)
    install_error_handlers(app)

    @app.post("/echo")
    async def echo(request: Request) -> Response:
        body = await request.body()
        if body == b"bad":
            raise InvalidInput("bad body", code="bad_body")
        if body == b"teapot":
            raise LookupError("no handler of its own")
        return JSONResponse({"got": body.decode(), "path": request.url.path, "app": request.app is app})

    app.serve_directly("POST", "/echo", echo)
    return app


def test_a_direct_route_gets_the_app_and_its_error_handlers() -> None:
    app = _bare_app()
    assert app.direct_endpoint(_scope("POST", "/echo")) is not None
    with TestClient(app, raise_server_exceptions=False) as client:
        assert client.post("/echo", content=b"hi").json() == {"got": "hi", "path": "/echo", "app": True}
        bad = client.post("/echo", content=b"bad")
        assert bad.status_code == 422 and bad.json()["error"]["code"] == "bad_body"
        teapot = client.post("/echo", content=b"teapot")
        assert teapot.status_code == 500 and teapot.json()["error"]["code"] == "internal_error"


def test_a_direct_route_under_the_server_s_root_path() -> None:
    app = _bare_app()
    assert app.direct_endpoint(_scope("POST", "/api/echo", "/api")) is not None
    with TestClient(app, root_path="/api") as client:
        assert client.post("/api/echo", content=b"hi").json()["path"] == "/api/echo"


def test_installed_middleware_that_acts_on_the_route_sends_it_the_framework_s_way() -> None:
    exempting = _bare_app()
    exempting.add_middleware(BodyLimitMiddleware, limit=10, timeout=5, exempt={"/echo"})
    assert exempting.direct_endpoint(_scope("POST", "/echo")) is not None

    limiting = _bare_app()
    limiting.add_middleware(BodyLimitMiddleware, limit=10, timeout=5)
    assert limiting.direct_endpoint(_scope("POST", "/echo")) is None
    with TestClient(limiting) as client:
        assert client.post("/echo", content=b"x" * 11).status_code == 413  # the middleware saw it

    compressing = _bare_app()
    compressing.add_middleware(GZipMiddleware, minimum_size=1)
    assert compressing.direct_endpoint(_scope("POST", "/echo")) is None
    with TestClient(compressing) as client:
        res = client.post("/echo", content=b"hi", headers={"accept-encoding": "gzip"})
        assert res.headers["content-encoding"] == "gzip"


def test_traced_apps_take_the_framework_s_way() -> None:
    traced = _bare_app(telemetry={"tracer_provider": NoOpTracerProvider()})
    assert traced.direct_endpoint(_scope("POST", "/echo")) is None
    # FastAPI's switch is what the check reads: an upgrade that renames it must fail here, not skip traces.
    assert _bare_app()._native_telemetry.enabled() is False  # type: ignore[attr-defined]


def test_only_declared_routes_can_be_served_directly() -> None:
    app = DirectRoutesAPI()

    async def undeclared(request: Request) -> Response:
        return Response()

    with pytest.raises(ValueError, match="include its router first"):
        app.serve_directly("POST", "/undeclared", undeclared)
    app.post("/elsewhere")(undeclared)
    with pytest.raises(ValueError, match="include its router first"):
        app.serve_directly("POST", "/undeclared", undeclared)
