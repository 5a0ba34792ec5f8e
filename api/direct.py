"""Hot routes served straight from the application's ASGI entry, past the framework's per-request layers."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.routing import APIRoute
from starlette.middleware.errors import ServerErrorMiddleware
from starlette.middleware.exceptions import ExceptionMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match, NoMatchFound
from starlette.types import ASGIApp, Receive, Scope, Send

from api.body_limit import BodyLimitMiddleware
from api.scope import route_path

logger = logging.getLogger(__name__)

DirectEndpoint = Callable[[Request], Awaitable[Response]]

#: How long a finding that FastAPI's native telemetry is off holds before it is checked again.
TELEMETRY_CHECK_SECONDS = 1.0

# Layers of FastAPI's own stack that do nothing for a direct route: its errors get the same two exception
# layers of their own; the telemetry layer acts only while telemetry is on (then nothing is served
# directly); the app's body limit layer wraps nothing while no limit is set (else another layer follows it);
# the exit stack closes form uploads, which direct routes do not parse through the framework.
_FRAMEWORK_LAYERS = frozenset(
    {
        "starlette.middleware.errors.ServerErrorMiddleware",
        "fastapi.telemetry._asgi.ExceptionTelemetryMiddleware",
        "fastapi._body_limit.AppBodyLimitMiddleware",
        "starlette.middleware.exceptions.ExceptionMiddleware",
        "fastapi.middleware.asyncexitstack.AsyncExitStackMiddleware",
    }
)


class DirectRoutesAPI(FastAPI):
    """A FastAPI app that serves a few hot routes without its middleware stack and router.

    On its way to an endpoint a request passes a dozen framework layers (error and exception middleware,
    telemetry, body limits, an exit stack, a router that tries route after route, the endpoint wrapper).
    For intake they cost ~0.12-0.15 ms of CPU per request, over a quarter of the event loop's work. A direct
    route is an ``async def (request) -> Response`` endpoint without dependencies, declared on a router as
    usual (OpenAPI, ``url_path_for``); served directly, its errors pass the same two exception layers the
    framework's stack has, with the app's handlers. It is served directly only while the built middleware
    stack holds nothing but FastAPI's own layers and body limits that exempt it, and FastAPI's native
    telemetry is off: anything else (middleware, an instrumentation that wraps the stack, a body size
    limit) sends its requests the framework's way.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._direct: dict[tuple[str, str], DirectEndpoint] = {}
        # The middleware stack last checked and, per route, its app (None: the stack acts on the route). Built
        # with the stack, so that both see the same exception handlers.
        self._checked_stack: ASGIApp | None = None
        self._apps: dict[tuple[str, str], ASGIApp | None] = {}
        self._telemetry_seen = False
        self._telemetry_next_check = 0.0

    def serve_directly(self, router: APIRouter, endpoint: DirectEndpoint) -> None:
        """Serve ``endpoint``'s route of ``router`` (included in this app) straight from the entry."""
        route = next((r for r in router.routes if isinstance(r, APIRoute) and r.endpoint is endpoint), None)
        if route is None:
            raise ValueError(f"{endpoint.__qualname__} is not an endpoint of this router")
        methods = route.methods or set()
        if len(methods) != 1 or route.dependant.dependencies or getattr(route, "max_body_size", None):
            raise ValueError(f"{route.path} must have one method, no dependencies and no body size limit")
        (method,) = methods
        scope = {"type": "http", "method": method, "path": route.path, "root_path": ""}
        first = next((r for r in router.routes if r.matches(scope)[0] is Match.FULL), None)
        try:
            included_here = self.url_path_for(route.name) == route.path
        except NoMatchFound:
            included_here = False
        if first is not route or not included_here:
            # The framework would send the request elsewhere: serving it directly would change the API.
            raise ValueError(f"{method} {route.path} does not reach {endpoint.__qualname__} in this app")
        self._direct[(method, route.path)] = endpoint

    def _with_exception_layers(self, endpoint: DirectEndpoint) -> ASGIApp:
        """``endpoint`` as an ASGI app inside the two exception layers FastAPI builds, with the same handlers."""

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            response = await endpoint(Request(scope, receive, send))
            await response(scope, receive, send)

        error_handler = None
        handlers: dict[Any, Any] = {}
        for key, handler in self.exception_handlers.items():
            if key in (500, Exception):
                error_handler = handler
            else:
                handlers[key] = handler
        inner = ExceptionMiddleware(app, handlers=handlers, debug=self.debug)
        return ServerErrorMiddleware(inner, handler=error_handler, debug=self.debug)

    def direct_app(self, scope: Scope) -> ASGIApp | None:
        """The app that serves this request directly, or None when it takes the framework's way."""
        if scope["type"] != "http":
            return None
        key = (scope["method"], route_path(scope, self.root_path))
        endpoint = self._direct.get(key)
        if endpoint is None:
            return None
        stack = self.middleware_stack
        if stack is None:  # built on the first call through the framework (the lifespan's, in a server)
            return None
        if stack is not self._checked_stack:
            self._checked_stack, self._apps = stack, {}
        if key in self._apps:
            app = self._apps[key]
        else:
            app = self._apps[key] = None
            if _leaves_alone(stack, self.router, key[1]):
                app = self._apps[key] = self._with_exception_layers(endpoint)
            else:
                logger.info("%s %s takes the framework's way: the middleware stack acts on it", *key)
        if app is None or self._telemetry_on():
            return None
        return app

    def _telemetry_on(self) -> bool:
        """Whether FastAPI's native telemetry observes requests (traces, metrics or logs), at most 1 s old."""
        # Asking costs ~20 us (OpenTelemetry reads the environment for each provider). A provider set up
        # once the app is serving is seen within a second; one set up is never taken away again.
        if self._telemetry_seen or time.monotonic() < self._telemetry_next_check:
            return self._telemetry_seen
        telemetry = getattr(self, "_native_telemetry", None)
        self._telemetry_seen = telemetry is not None and bool(telemetry.enabled())
        self._telemetry_next_check = time.monotonic() + TELEMETRY_CHECK_SECONDS
        return self._telemetry_seen

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        app = self.direct_app(scope)
        if app is None:
            await super().__call__(scope, receive, send)
            return
        if self.root_path:
            scope["root_path"] = self.root_path
        scope["app"] = self
        await app(scope, receive, send)


def _leaves_alone(stack: ASGIApp, router: ASGIApp, path: str) -> bool:
    """Whether every layer of ``stack`` above ``router`` is one that does nothing for ``path``."""
    layer: ASGIApp | None = stack
    while layer is not router:
        cls = type(layer)
        name = f"{cls.__module__}.{cls.__qualname__}"
        if isinstance(layer, BodyLimitMiddleware):
            if not layer.exempts(path):
                return False
        elif name not in _FRAMEWORK_LAYERS:
            return False
        layer = getattr(layer, "app", None)
        if layer is None:
            return False
    return True
