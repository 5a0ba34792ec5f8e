"""Intake served straight from the app's entry answers exactly as through the framework's layers."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from opentelemetry.trace import NoOpTracerProvider
from sqlalchemy.orm import Session, sessionmaker
from starlette.exceptions import HTTPException
from starlette.middleware.gzip import GZipMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

import api.direct
from api.app import create_app
from api.body_limit import BodyLimitMiddleware
from api.direct import DirectRoutesAPI
from api.errors import install_error_handlers
from api.routes import submissions
from moderation.config import Settings
from moderation.errors import InvalidInput
from tests.api.conftest import ApiTenant
from tests.conftest import RecordingDispatcher, make_jpeg

INTAKE = "/v1/submissions"


def _scope(method: str, path: str, root_path: str = "") -> dict[str, Any]:
    return {"type": "http", "method": method, "path": path, "root_path": root_path}


def _framework_way(app: DirectRoutesAPI, monkeypatch: pytest.MonkeyPatch) -> None:
    """Send every request of ``app`` through the framework's layers, as an app without direct routes would."""
    monkeypatch.setattr(app, "direct_app", lambda scope: None)


@pytest.fixture
def app(
    settings: Settings, sessions: sessionmaker[Session], dispatched: RecordingDispatcher, redis_client: object
) -> DirectRoutesAPI:
    """The API app on the test's transaction."""
    app = create_app(settings, dispatcher=dispatched)
    app.state.sessions = app.state.intake_sessions = sessions
    return app


def test_only_intake_posts_are_served_directly(app: DirectRoutesAPI) -> None:
    assert app.direct_app(_scope("POST", INTAKE)) is None  # not started: the first call builds the stack
    with TestClient(app):
        assert app.direct_app(_scope("POST", INTAKE)) is not None
        assert app.direct_app(_scope("GET", INTAKE)) is None
        assert app.direct_app(_scope("POST", INTAKE + "/")) is None  # the router redirects it
        assert app.direct_app(_scope("POST", INTAKE + "/x")) is None
        assert app.direct_app({"type": "websocket", "path": INTAKE}) is None
        # Behind a proxy's prefix, matched as the router matches it.
        assert app.direct_app(_scope("POST", "/api" + INTAKE, "/api")) is not None
        assert app.direct_app(_scope("POST", "/apiv1/submissions", "/api")) is None


def _exchange(
    client: TestClient, app: DirectRoutesAPI, tenant: ApiTenant, key: str, settings: Settings
) -> list[tuple[int, dict[str, Any], dict[str, str]]]:
    """Status, JSON body (without new ids and times) and headers of one intake request of each kind."""
    jpeg = make_jpeg(seed=7)
    files = {"image": ("x.jpg", jpeg, "image/jpeg")}
    keyed = {**tenant.headers, "Idempotency-Key": key}
    answers = [
        client.post(INTAKE, files=files, data={"caption": "a cat"}, headers=tenant.headers),
        client.post(INTAKE, files=files, data={"caption": "a cat"}),
        client.post(INTAKE, files=files, data={"caption": ""}, headers=tenant.headers),
        client.post(INTAKE, content=b"x", headers={**tenant.headers, "content-type": "text/plain"}),
        client.post(INTAKE, json={"caption": "json", "image_base64": "!"}, headers=tenant.headers),
        client.post(
            INTAKE,
            content=b"x",
            headers={**tenant.headers, "content-length": str(settings.max_image_bytes * 2)},
        ),
        *(client.post(INTAKE, files=files, data={"caption": "again"}, headers=keyed) for _ in range(2)),
    ]

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("a bug in the writer")

    writer = app.state.intake_writer
    submit = writer.submit_from_loop
    writer.submit_from_loop = broken
    try:
        answers.append(client.post(INTAKE, files=files, data={"caption": "boom"}, headers=tenant.headers))
    finally:
        writer.submit_from_loop = submit
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
            _framework_way(app, monkeypatch)
        with TestClient(app, raise_server_exceptions=False) as client:
            assert (app.direct_app(_scope("POST", INTAKE)) is not None) is direct
            answers.append(_exchange(client, app, tenant, f"key-{direct}", settings))
    assert answers[0] == answers[1]
    assert [status for status, _, _ in answers[0]] == [202, 401, 422, 415, 422, 413, 202, 202, 500]
    assert answers[0][1][2]["www-authenticate"] == "Bearer"
    assert answers[0][7][2]["idempotent-replayed"] == "true"
    assert answers[0][8][1] == {"error": {"code": "internal_error", "message": "internal server error"}}


def _small_app(include: dict[str, Any] | None = None, **kwargs: Any) -> DirectRoutesAPI:
    """An app with one direct route, ``POST /echo``, that fails on request."""
    app = DirectRoutesAPI(**kwargs)
    install_error_handlers(app)
    router = APIRouter()

    @router.post("/echo")
    async def echo(request: Request) -> Response:
        body = await request.body()
        if body == b"bad":
            raise InvalidInput("bad body", code="bad_body")
        if body == b"gone":
            raise HTTPException(410, "gone for good", headers={"X-Why": "test"})
        if body == b"lookup":
            raise LookupError("has a sync handler")
        if body == b"bug":
            raise RuntimeError("no handler of its own")
        return JSONResponse({"got": body.decode(), "path": request.url.path, "app": request.app is app})

    def lookup_handler(request: Request, exc: Exception) -> Response:
        return PlainTextResponse("looked up", status_code=404)

    app.add_exception_handler(LookupError, lookup_handler)
    app.include_router(router, **(include or {}))
    app.serve_directly(echo)
    return app


def _one_way(
    app: DirectRoutesAPI, direct: bool, monkeypatch: pytest.MonkeyPatch, path: str = "/echo", **kwargs: Any
) -> TestClient:
    """A started client of ``app``, whose requests are served directly or all the framework's way."""
    if not direct:
        _framework_way(app, monkeypatch)
    client = _started(app, **kwargs)
    root_path = kwargs.get("root_path", "")
    assert (app.direct_app(_scope("POST", root_path + path, root_path)) is not None) is direct
    return client


def _started(app: DirectRoutesAPI, **kwargs: Any) -> TestClient:
    client = TestClient(app, raise_server_exceptions=False, **kwargs)
    client.get("/nowhere")  # the first request builds the middleware stack
    return client


def test_a_direct_route_answers_and_fails_as_through_the_framework(monkeypatch: pytest.MonkeyPatch) -> None:
    answers = []
    for direct in (True, False):
        client = _one_way(_small_app(), direct, monkeypatch)
        answers.append(
            [
                (res.status_code, res.text, res.headers.get("x-why"))
                for res in (
                    client.post("/echo", content=body) for body in (b"hi", b"bad", b"gone", b"lookup", b"bug")
                )
            ]
        )
    assert answers[0] == answers[1]
    assert [status for status, _, _ in answers[0]] == [200, 422, 410, 404, 500]
    assert answers[0][0][1] == '{"got":"hi","path":"/echo","app":true}'
    assert answers[0][2][2] == "test"
    assert '"internal_error"' in answers[0][4][1]


def test_an_unexpected_error_still_reaches_the_server_s_log_as_through_the_framework() -> None:
    app = _small_app()
    client = TestClient(app)  # raises what the app re-raises after answering 500
    client.get("/nowhere")
    assert app.direct_app(_scope("POST", "/echo")) is not None
    with pytest.raises(RuntimeError, match="no handler of its own"):
        client.post("/echo", content=b"bug")


def test_debug_tracebacks_are_the_framework_s() -> None:
    app = _small_app(debug=True)
    client = _started(app)
    assert app.direct_app(_scope("POST", "/echo")) is not None
    res = client.post("/echo", content=b"bug", headers={"accept": "text/html"})
    assert (
        res.status_code == 500 and "RuntimeError" in res.text and "text/html" in res.headers["content-type"]
    )


def test_a_direct_route_under_the_server_s_root_path(monkeypatch: pytest.MonkeyPatch) -> None:
    for direct in (True, False):
        app = _small_app()
        # The app's own body limit exempts the route under a root path too (it caps its own body).
        app.add_middleware(BodyLimitMiddleware, limit=4, timeout=5, exempt={"/echo"})
        client = _one_way(app, direct, monkeypatch, root_path="/api")
        res = client.post("/api/echo", content=b"longer than four")
        assert res.status_code == 200 and res.json()["path"] == "/api/echo"


def test_anything_in_the_stack_that_acts_on_the_route_sends_it_the_framework_s_way() -> None:
    exempting = _small_app()
    exempting.add_middleware(BodyLimitMiddleware, limit=10, timeout=5, exempt={"/echo"})
    _started(exempting)
    assert exempting.direct_app(_scope("POST", "/echo")) is not None

    limiting = _small_app()
    limiting.add_middleware(BodyLimitMiddleware, limit=10, timeout=5)
    client = _started(limiting)
    assert limiting.direct_app(_scope("POST", "/echo")) is None
    assert client.post("/echo", content=b"x" * 11).status_code == 413  # the middleware saw it

    compressing = _small_app()
    compressing.add_middleware(GZipMiddleware, minimum_size=1)
    client = _started(compressing)
    assert compressing.direct_app(_scope("POST", "/echo")) is None
    res = client.post("/echo", content=b"hi", headers={"accept-encoding": "gzip"})
    assert res.headers["content-encoding"] == "gzip"

    # An instrumentation that wraps the built stack instead of adding middleware.
    wrapped = _small_app()
    calls: list[str] = []
    build = wrapped.build_middleware_stack

    def build_wrapped() -> ASGIApp:
        inner = build()

        async def instrumented(scope: Scope, receive: Receive, send: Send) -> None:
            calls.append(scope["type"])
            await inner(scope, receive, send)

        return instrumented

    wrapped.build_middleware_stack = build_wrapped  # type: ignore[method-assign]
    client = _started(wrapped)
    assert wrapped.direct_app(_scope("POST", "/echo")) is None
    client.post("/echo", content=b"hi")
    assert calls.count("http") == 2


def test_middleware_cannot_be_added_after_a_direct_request() -> None:
    app = _small_app()
    client = TestClient(app)  # no lifespan: the first request itself goes the framework's way
    assert app.direct_app(_scope("POST", "/echo")) is None
    assert client.post("/echo", content=b"hi").status_code == 200
    assert app.direct_app(_scope("POST", "/echo")) is not None
    with pytest.raises(RuntimeError):
        app.add_middleware(GZipMiddleware)


def test_apps_with_native_telemetry_take_the_framework_s_way(monkeypatch: pytest.MonkeyPatch) -> None:
    traced = _small_app(telemetry={"tracer_provider": NoOpTracerProvider()})
    _started(traced)
    assert traced.direct_app(_scope("POST", "/echo")) is None
    # Telemetry set up once the app serves is seen within the check interval, and stays seen.
    monkeypatch.setattr(api.direct, "RECHECK_SECONDS", 0.05)
    late = _small_app()
    _started(late)
    assert late.direct_app(_scope("POST", "/echo")) is not None
    late._native_telemetry.config["tracer_provider"] = NoOpTracerProvider()  # type: ignore[attr-defined]
    deadline = time.monotonic() + 5
    while late.direct_app(_scope("POST", "/echo")) is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert late.direct_app(_scope("POST", "/echo")) is None
    late._native_telemetry.config["tracer_provider"] = None  # type: ignore[attr-defined]
    time.sleep(0.06)
    assert late.direct_app(_scope("POST", "/echo")) is None
    # FastAPI's switch is what the check reads: an upgrade that renames it must fail here, not skip traces.
    assert _small_app()._native_telemetry.enabled() is False  # type: ignore[attr-defined]


async def _plain(request: Request) -> Response:
    return Response("plain")


async def _with_query(request: Request, x: int = 0) -> Response:
    return Response(str(x))


def _sync(request: Request) -> Response:
    return Response("sync")


async def _echo_name(name: str) -> str:
    return name


def _forbid() -> None:
    raise HTTPException(403, "no")


class _TimedRoute(APIRoute):
    """A route class of its own (its handler could time, log or change requests)."""

    def get_route_handler(self) -> Callable[[Request], Any]:
        return super().get_route_handler()


def _declare(path: str = "/plain", endpoint: Any = _plain, **kwargs: Any) -> Callable[[APIRouter], object]:
    return lambda router: router.add_api_route(
        path, endpoint, methods=kwargs.pop("methods", ["POST"]), **kwargs
    )


@pytest.mark.parametrize(
    ("app_kwargs", "include", "declare", "endpoint", "reason"),
    [
        pytest.param({}, {}, lambda r: None, _plain, "0 routes", id="not-a-route"),
        pytest.param({}, {}, _declare(methods=["POST", "PUT"]), _plain, "one method", id="two-methods"),
        pytest.param(
            {}, {}, _declare(dependencies=[Depends(_forbid)]), _plain, "nothing else", id="route-dependency"
        ),
        pytest.param(
            {"dependencies": [Depends(_forbid)]}, {}, _declare(), _plain, "nothing else", id="app-dependency"
        ),
        pytest.param(
            {},
            {"dependencies": [Depends(_forbid)]},
            _declare(),
            _plain,
            "nothing else",
            id="include-dependency",
        ),
        pytest.param({}, {"max_body_size": 2}, _declare(), _plain, "body size", id="include-body-limit"),
        pytest.param({"max_body_size": 2}, {}, _declare(), _plain, "body size", id="app-body-limit"),
        pytest.param({}, {}, _declare(max_body_size=2), _plain, "body size", id="route-body-limit"),
        pytest.param(
            {}, {}, _declare(endpoint=_with_query), _with_query, "nothing else", id="query-parameter"
        ),
        pytest.param({}, {}, _declare(endpoint=_sync), _sync, "coroutine", id="sync-endpoint"),
        pytest.param(
            {},
            {},
            lambda r: (_declare("/{name}", _echo_name)(r), _declare()(r)),
            _plain,
            "another route",
            id="shadowed-in-its-router",
        ),
        pytest.param(
            {}, {}, _declare(route_class_override=_TimedRoute), _plain, "route class", id="route-class"
        ),
    ],
)
def test_only_routes_the_framework_would_serve_the_same_way_can_be_served_directly(
    app_kwargs: dict[str, Any], include: dict[str, Any], declare: Any, endpoint: Any, reason: str
) -> None:
    app = DirectRoutesAPI(**app_kwargs)
    router = APIRouter()
    declare(router)
    app.include_router(router, **include)
    with pytest.raises(ValueError, match=reason):
        app.serve_directly(endpoint)


def test_a_route_shadowed_by_another_router_or_added_later_takes_the_framework_s_way(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    app = DirectRoutesAPI()
    first, second = APIRouter(), APIRouter()
    _declare("/{name}", _echo_name)(first)
    _declare()(second)
    app.include_router(first)
    app.include_router(second)
    with pytest.raises(ValueError, match="another route"):
        app.serve_directly(_plain)

    monkeypatch.setattr(api.direct, "RECHECK_SECONDS", 0.0)
    app = DirectRoutesAPI()
    app.include_router(second)
    app.serve_directly(_plain)
    client = _started(app)
    assert app.direct_app(_scope("POST", "/plain")) is not None
    assert client.post("/plain").text == "plain"
    late = APIRouter()
    _declare("/{name}", _echo_name)(late)
    app.router.routes.insert(0, late.routes[0])  # as a route added in front while serving would be
    app.router._mark_routes_changed()
    assert app.direct_app(_scope("POST", "/plain")) is None
    assert client.post("/plain").json() == "plain"  # /{name} now answers it


def test_a_mounted_app_takes_the_framework_s_way() -> None:
    inner = _small_app()
    outer = FastAPI()
    outer.mount("/inner", inner)
    client = TestClient(outer)
    assert client.post("/inner/echo", content=b"hi").json()["got"] == "hi"
    assert inner.direct_app({**_scope("POST", "/inner/echo", "/inner"), "app": outer}) is None


def test_handlers_added_after_the_stack_was_built_are_used_by_neither_way(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    answers = []
    for direct in (True, False):
        app = _small_app()
        client = _one_way(app, direct, monkeypatch)
        app.add_exception_handler(
            RuntimeError, lambda request, exc: PlainTextResponse("late", status_code=404)
        )
        res = client.post("/echo", content=b"bug")
        answers.append((res.status_code, res.json()["error"]["code"]))
    assert answers == [(500, "internal_error")] * 2


def test_the_app_serves_intake_directly(app: DirectRoutesAPI) -> None:
    with TestClient(app):
        assert app.direct_app(_scope("POST", INTAKE)) is not None
    assert app.url_path_for(submissions.create_submission.__name__) == INTAKE
