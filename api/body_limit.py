"""Caps on request bodies, enforced while they are read, before any route authenticates or parses them."""

from __future__ import annotations

import asyncio
from collections.abc import Collection

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import error_response
from api.scope import route_path

# Methods whose requests carry no body: nothing to cap or time (and a long streamed answer may wait on
# receive() for the client's disconnect well past any deadline).
_BODILESS = frozenset({"GET", "HEAD", "OPTIONS"})


class BodyLimitMiddleware:
    """Refuse bodies over ``limit`` bytes (413) or still arriving after ``timeout`` seconds (408).

    A declared Content-Length over the limit is refused before anything is read; a body sent without one
    (chunked) is cut off as soon as it passes the limit; a client that trickles its body in holds a
    connection and its buffer for at most ``timeout`` seconds. Paths in ``exempt`` (intake) enforce both
    limits themselves as they read, at the cost of one deadline per request instead of one per chunk.
    """

    def __init__(self, app: ASGIApp, *, limit: int, timeout: float, exempt: Collection[str] = ()) -> None:
        self.app = app
        self.limit = limit
        self.timeout = timeout
        self.exempt = frozenset(exempt)

    def exempts(self, path: str) -> bool:
        """Whether requests to ``path`` (within the app, without its root path) are left to their route."""
        return path in self.exempt

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in _BODILESS or self.exempts(route_path(scope)):
            await self.app(scope, receive, send)
            return
        limit = self.limit
        too_large = f"request body is larger than the {limit}-byte limit"
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                await error_response(413, "payload_too_large", too_large)(scope, receive, send)
                return
        deadline = asyncio.get_running_loop().time() + self.timeout
        received = 0
        complete = False

        async def limited() -> Message:
            nonlocal received, complete
            if complete:  # the body is in: what comes now (a disconnect) may take as long as it takes
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    got = await receive()
            except TimeoutError:
                # An HTTPException passes through FastAPI's body parsing to the JSON error handlers.
                raise HTTPException(
                    408, f"the request body did not arrive within {self.timeout:g} s"
                ) from None
            if got["type"] == "http.request":
                received += len(got.get("body", b""))
                complete = not got.get("more_body", False)
                if received > limit:
                    raise HTTPException(413, too_large)
            return got

        await self.app(scope, limited, send)
