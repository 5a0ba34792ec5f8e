"""Hot routes served straight from the application's ASGI entry, past the framework's per-request layers."""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRoute, RouteContext, iter_route_contexts
from starlette.middleware.errors import ServerErrorMiddleware
from starlette.middleware.exceptions import ExceptionMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match
from starlette.types import ASGIApp, Receive, Scope, Send

from api.body_limit import BodyLimitMiddleware
from api.scope import route_path

logger = logging.getLogger(__name__)

DirectEndpoint = Callable[[Request], Awaitable[Response]]

#: How long the findings that telemetry is off and that the routes are unchanged hold before a new look.
RECHECK_SECONDS = 1.0

# FastAPI's own stack, outermost first, as it builds it around the app's middleware (``None`` marks where
# that goes). Each does nothing for a direct route: its errors pass the same two exception layers of its
# own; the telemetry layer acts only while telemetry is on (then nothing is served directly); the body limit
# layer wraps nothing while no limit is set (else another layer follows it); the exit stack closes form
# uploads, which direct routes do not parse through the framework.
_FRAMEWORK_STACK = (
    "starlette.middleware.errors.ServerErrorMiddleware",
    "fastapi.telemetry._asgi.ExceptionTelemetryMiddleware",
    "fastapi._body_limit.AppBodyLimitMiddleware",
    None,
    "starlette.middleware.exceptions.ExceptionMiddleware",
    "fastapi.middleware.asyncexitstack.AsyncExitStackMiddleware",
)
# What a direct endpoint's signature may ask of the framework: the request, nothing else.
_DEPENDANT_LISTS = (
    "dependencies",
    "path_params",
    "query_params",
    "header_params",
    "cookie_params",
    "body_params",
)
_DEPENDANT_NAMES = ("background_tasks_param_name", "response_param_name", "security_scopes_param_name")


class DirectRoutesAPI(FastAPI):
    """A FastAPI app that serves a few hot routes without its middleware stack and router.

    On its way to an endpoint a request passes a dozen framework layers (error and exception middleware,
    telemetry, body limits, an exit stack, a router that tries route after route, the endpoint wrapper).
    For intake they cost ~0.12-0.15 ms of CPU per request, over a quarter of the event loop's work. A direct
    route is an ``async def (request) -> Response`` endpoint declared on a router as usual (OpenAPI,
    ``url_path_for``); served directly, its errors pass the same two exception layers the framework's stack
    has, with the handlers it was built with. It is served directly only while the framework would serve it
    the same way: the route is the first to match its method and path, has no dependencies, parameters or
    body limit (its own, its router's or the app's) and no route class of its own; the built middleware
    stack holds nothing but FastAPI's own layers and body limits that exempt it; the app is not mounted in
    another; and FastAPI's native telemetry is off. Anything else sends its requests the framework's way.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # Read here, so that a FastAPI release that renames it fails at start, not by skipping telemetry.
        self._telemetry_switch = self._native_telemetry
        self._endpoints: list[DirectEndpoint] = []
        self._handlers_of_stack: dict[Any, Any] = {}
        # The stack and routes version last looked at, and per (method, path) the app that serves it.
        self._checked: tuple[ASGIApp, int] | None = None
        self._apps: dict[tuple[str, str], ASGIApp] = {}
        self._telemetry_seen = False
        self._next_check = 0.0

    def serve_directly(self, endpoint: DirectEndpoint) -> None:
        """Serve ``endpoint``'s route, already included in this app, straight from the entry."""
        _direct_route(list(iter_route_contexts(self.router.routes)), endpoint)  # refuses what cannot be
        self._endpoints.append(endpoint)
        self._checked = None

    def build_middleware_stack(self) -> ASGIApp:
        """The framework's stack; direct routes are built with the exception handlers it is built with."""
        self._handlers_of_stack = dict(self.exception_handlers)
        return super().build_middleware_stack()

    def direct_app(self, scope: Scope) -> ASGIApp | None:
        """The app that serves this request directly, or None when it takes the framework's way."""
        if scope["type"] != "http" or "app" in scope or "fastapi.telemetry" in scope:
            return None  # a mounted app: its parent's layers and telemetry may act on the request
        stack = self.middleware_stack
        if stack is None:  # built on the first call through the framework (the lifespan's, in a server)
            return None
        if self._checked is None or self._checked[0] is not stack or time.monotonic() >= self._next_check:
            self._recheck(stack)
        if self._telemetry_seen:
            return None
        return self._apps.get((scope["method"], route_path(scope, self.root_path)))

    def _recheck(self, stack: ASGIApp) -> None:
        # Asking for the telemetry switch costs ~20 us (OpenTelemetry reads the environment for each
        # provider), the routes' version a few: at most once a second. Telemetry set up while serving is
        # seen within that second; once on, it is never taken away again.
        self._next_check = time.monotonic() + RECHECK_SECONDS
        self._telemetry_seen = self._telemetry_seen or bool(self._telemetry_switch.enabled())
        version = self.router._get_routes_version()
        if self._checked is not None and self._checked == (stack, version):
            return
        self._checked, self._apps = (stack, version), {}
        contexts = list(iter_route_contexts(self.router.routes))
        for endpoint in self._endpoints:
            try:
                key, route = _direct_route(contexts, endpoint)
            except ValueError as exc:
                logger.warning("%s takes the framework's way: %s", endpoint.__qualname__, exc)
                continue
            if _leaves_alone(stack, self.router, key[1]):
                self._apps[key] = self._with_exception_layers(endpoint, route)
            else:
                logger.info("%s %s takes the framework's way: the middleware stack acts on it", *key)

    def _with_exception_layers(self, endpoint: DirectEndpoint, route: APIRoute) -> ASGIApp:
        """``endpoint`` as an ASGI app inside the two exception layers FastAPI builds, with the same handlers."""

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            scope["route"], scope["endpoint"], scope["path_params"] = route, endpoint, {}
            response = await endpoint(Request(scope, receive, send))
            await response(scope, receive, send)

        error_handler = None
        handlers: dict[Any, Any] = {}
        for key, handler in self._handlers_of_stack.items():
            if key in (500, Exception):
                error_handler = handler
            else:
                handlers[key] = handler
        inner = ExceptionMiddleware(app, handlers=handlers, debug=self.debug)
        return ServerErrorMiddleware(inner, handler=error_handler, debug=self.debug)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        app = self.direct_app(scope)
        if app is None:
            await super().__call__(scope, receive, send)
            return
        if self.root_path:
            scope["root_path"] = self.root_path
        scope["app"] = self
        await app(scope, receive, send)


def _direct_route(
    contexts: Sequence[RouteContext], endpoint: DirectEndpoint
) -> tuple[tuple[str, str], APIRoute]:
    """``endpoint``'s (method, path) and route, or ValueError when the framework would serve it otherwise."""
    name = endpoint.__qualname__
    mine = [
        c
        for c in contexts
        if isinstance(c.original_route, APIRoute) and c.original_route.endpoint is endpoint
    ]
    if len(mine) != 1:
        raise ValueError(f"{name} is the endpoint of {len(mine)} routes of this app, not of one")
    context = mine[0]
    route = context.original_route
    assert isinstance(route, APIRoute)
    methods = context.methods or set()
    if len(methods) != 1 or type(route).get_route_handler is not APIRoute.get_route_handler:
        raise ValueError(f"{name}'s route must have one method and FastAPI's own route class")
    if not inspect.iscoroutinefunction(endpoint) or route.max_body_size or context.max_body_size:
        raise ValueError(f"{name} must be a coroutine function, without a body size limit")
    dependant = context.dependant
    asks = any(getattr(dependant, field) for field in _DEPENDANT_LISTS + _DEPENDANT_NAMES)
    if dependant.request_param_name is None or asks:
        raise ValueError(f"{name} must take the request and nothing else (no dependencies or parameters)")
    (method,) = methods
    path = str(context.path)
    scope = {"type": "http", "method": method, "path": path, "root_path": "", "headers": []}
    first = next((c for c in contexts if c.matches(scope)[0] is Match.FULL), None)
    if first is not context:
        raise ValueError(f"{method} {path} reaches another route first")
    return (method, path), route


def _leaves_alone(stack: ASGIApp, router: ASGIApp, path: str) -> bool:
    """Whether ``stack`` above ``router`` is FastAPI's own, with only body limits exempting ``path`` added."""
    layers: list[Any] = []
    layer: Any = stack
    while layer is not router:
        if layer is None or len(layers) > 64:
            return False
        layers.append(layer)
        layer = getattr(layer, "app", None)
    names = [f"{type(layer).__module__}.{type(layer).__qualname__}" for layer in layers]
    split = _FRAMEWORK_STACK.index(None)
    head, tail = list(_FRAMEWORK_STACK[:split]), list(_FRAMEWORK_STACK[split + 1 :])
    if (
        len(names) < len(head) + len(tail)
        or names[: len(head)] != head
        or names[len(names) - len(tail) :] != tail
    ):
        return False
    added = layers[len(head) : len(layers) - len(tail)]
    return all(type(layer) is BodyLimitMiddleware and layer.exempts(path) for layer in added)
