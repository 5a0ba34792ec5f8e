"""Reading an ASGI scope."""

from __future__ import annotations

from starlette.types import Scope


def route_path(scope: Scope, app_root_path: str = "") -> str:
    """The request's path within the app, as the router matches it: without the root path it is served under."""
    path: str = scope["path"]
    root_path: str = app_root_path or scope.get("root_path", "")
    if root_path and path.startswith(root_path) and path[len(root_path) : len(root_path) + 1] in ("", "/"):
        return path[len(root_path) :]
    return path
