"""Hot routes served straight from the application's ASGI entry, past the framework's per-request layers."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable, Collection
from typing import Any

from fastapi import FastAPI
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import NoMatchFound
from starlette.types import Receive, Scope, Send

from api.body_limit import BodyLimitMiddleware

logger = logging.getLogger(__name__)

DirectEndpoint = Callable[[Request], Awaitable[Response]]


class DirectRoutesAPI(FastAPI):
    """A FastAPI app that serves a few hot routes without its middleware stack and router.

    On its way to an endpoint a request passes a dozen framework layers (error and exception middleware,
    telemetry, body limits, an exit stack, a router that tries route after route, the endpoint wrapper).
    For intake they cost ~0.1 ms of CPU per request, a fifth of the event loop's work. A direct route is an
    ``async def (request) -> Response`` endpoint that is also declared on a router as usual (OpenAPI,
    ``url_path_for``); served directly it answers the same way, errors included: the app's exception
    handlers turn whatever it raises into the same JSON error. Nothing is skipped that would act on it:
    while FastAPI's native tracing is on, or any middleware other than a body limit exempting the path is
    installed, its requests take the framework's way.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._direct: dict[tuple[str, str], DirectEndpoint] = {}
        # Per (method, path): whether the installed middleware leaves it alone (decided on the first request:
        # middleware cannot be added once the app has started).
        self._direct_allowed: dict[tuple[str, str], bool] = {}

    def serve_directly(self, method: str, path: str, endpoint: DirectEndpoint) -> None:
        """Serve ``method`` ``path`` with ``endpoint``, already declared on a router, straight from the entry."""
        try:
            declared = self.url_path_for(endpoint.__name__) == path
        except NoMatchFound:
            declared = False
        if not declared:
            # OpenAPI and url_path_for would describe a route that is not the one served.
            raise ValueError(
                f"{endpoint.__name__} is not a route of this app at {path}: include its router first"
            )
        self._direct[(method.upper(), path)] = endpoint

    def direct_endpoint(self, scope: Scope) -> DirectEndpoint | None:
        """The endpoint that serves this request directly, or None when it takes the framework's way."""
        if scope["type"] != "http":
            return None
        key = (scope["method"], _route_path(scope, self.root_path))
        endpoint = self._direct.get(key)
        if endpoint is None:
            return None
        allowed = self._direct_allowed.get(key)
        if allowed is None:
            allowed = self._direct_allowed[key] = all(_leaves_alone(m, key[1]) for m in self.user_middleware)
            if not allowed:
                logger.info("%s %s takes the framework's way: middleware is installed that acts on it", *key)
        if not allowed or _tracing(self):
            return None
        return endpoint

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = self.direct_endpoint(scope)
        if endpoint is None:
            await super().__call__(scope, receive, send)
            return
        if self.root_path:
            scope["root_path"] = self.root_path
        scope["app"] = self
        request = Request(scope, receive, send)
        try:
            response = await endpoint(request)
        except Exception as exc:
            response = await self._handle(request, exc)
        await response(scope, receive, send)

    async def _handle(self, request: Request, exc: Exception) -> Response:
        """The response the app's exception handlers give for ``exc``, looked up as Starlette does."""
        handlers = self.exception_handlers
        handler = handlers.get(exc.status_code) if isinstance(exc, HTTPException) else None
        for cls in type(exc).__mro__:
            if handler is not None:
                break
            handler = handlers.get(cls)
        if handler is None:
            raise exc
        response = handler(request, exc)
        if inspect.isawaitable(response):
            response = await response
        assert isinstance(response, Response)
        return response


def _route_path(scope: Scope, app_root_path: str) -> str:
    """The request's path within the app, as the router matches it (without the root path)."""
    path: str = scope["path"]
    root_path: str = app_root_path or scope.get("root_path", "")
    if root_path and path.startswith(root_path) and path[len(root_path) : len(root_path) + 1] in ("", "/"):
        return path[len(root_path) :]
    return path


def _leaves_alone(middleware: Middleware, path: str) -> bool:
    """Whether ``middleware`` does nothing for ``path`` (a body limit the route enforces itself)."""
    exempt = middleware.kwargs.get("exempt", ())
    return middleware.cls is BodyLimitMiddleware and isinstance(exempt, Collection) and path in exempt


def _tracing(app: FastAPI) -> bool:
    """Whether FastAPI's native telemetry traces requests (a direct route would be missing from the traces)."""
    telemetry = getattr(app, "_native_telemetry", None)
    return telemetry is not None and bool(telemetry.enabled())
