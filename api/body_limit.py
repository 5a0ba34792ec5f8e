"""A cap on request bodies, enforced while they are read, before any route authenticates or parses them."""

from __future__ import annotations

from collections.abc import Collection

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import error_response


class BodyLimitMiddleware:
    """Refuse (413 ``payload_too_large``) bodies over ``limit`` bytes, except on ``exempt`` paths.

    A declared Content-Length over the limit is refused before anything is read; a body sent without one
    (chunked) is cut off as soon as it passes the limit. Exempt paths enforce a limit of their own (intake's
    follows the image size limit).
    """

    def __init__(self, app: ASGIApp, *, limit: int, exempt: Collection[str] = ()) -> None:
        self.app = app
        self.limit = limit
        self.exempt = frozenset(exempt)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.exempt:
            await self.app(scope, receive, send)
            return
        message = f"request body is larger than the {self.limit}-byte limit"
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > self.limit:
                await error_response(413, "payload_too_large", message)(scope, receive, send)
                return
        received = 0

        async def limited() -> Message:
            nonlocal received
            got = await receive()
            if got["type"] == "http.request":
                received += len(got.get("body", b""))
                if received > self.limit:
                    # An HTTPException passes through FastAPI's body parsing to the JSON error handlers.
                    raise HTTPException(413, message)
            return got

        await self.app(scope, limited, send)
