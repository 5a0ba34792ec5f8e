"""How reviewers authenticate: a session cookie (with CSRF tokens) or a ``Bearer rvw_…`` API token."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request, Response
from sqlalchemy.orm import Session

from api.deps import get_session
from moderation.config import Settings
from moderation.errors import Unauthorized
from moderation.reviewers import service as reviewers
from moderation.reviewers.models import Reviewer
from moderation.reviewers.schemas import Forbidden, ReviewerRef

SESSION_COOKIE = "moderation_review_session"
LOGIN_CSRF_COOKIE = "moderation_review_login"
CSRF_HEADER = "x-csrf-token"
CSRF_FIELD = "csrf_token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1", "[::1]"})


@dataclass(frozen=True)
class Principal:
    """The signed-in reviewer of a request, and the CSRF token of their session (cookie logins only)."""

    reviewer: Reviewer
    csrf_token: str | None

    @property
    def ref(self) -> ReviewerRef:
        """Who is acting, with their role."""
        return ReviewerRef.of(self.reviewer)


def cookie_secure(request: Request, settings: Settings) -> bool:
    """Whether cookies get the Secure flag: always, except over plain http on a loopback dev host."""
    if settings.review_cookie_secure != "auto":
        return settings.review_cookie_secure == "always"
    return not (request.url.scheme == "http" and (request.url.hostname or "") in LOCAL_HOSTS)


def set_session_cookie(response: Response, request: Request, settings: Settings, token: str) -> None:
    """Set the session cookie: HttpOnly, SameSite=Lax, Secure unless on local http."""
    response.set_cookie(
        SESSION_COOKIE,
        token,
        max_age=int(settings.review_session_hours * 3600),
        httponly=True,
        samesite="lax",
        secure=cookie_secure(request, settings),
        path="/",
    )


def clear_session_cookie(response: Response, request: Request, settings: Settings) -> None:
    """Remove the session cookie."""
    response.delete_cookie(
        SESSION_COOKIE, path="/", httponly=True, samesite="lax", secure=cookie_secure(request, settings)
    )


def set_login_csrf(response: Response, request: Request, settings: Settings, token: str) -> None:
    """Set the double-submit CSRF cookie of the login form (there is no session yet to bind a token to)."""
    response.set_cookie(
        LOGIN_CSRF_COOKIE,
        token,
        max_age=3600,
        httponly=True,
        samesite="strict",
        secure=cookie_secure(request, settings),
        path="/review",
    )


def login_csrf_valid(request: Request, given: str | None) -> bool:
    """Whether the login form carries the token of its cookie."""
    expected = request.cookies.get(LOGIN_CSRF_COOKIE)
    return bool(expected and given) and secrets.compare_digest(str(expected), str(given))


def _same_origin(request: Request) -> bool:
    origin = request.headers.get("origin")
    if not origin or origin == "null":
        return origin is None
    hosts = {request.headers.get("host", ""), request.headers.get("x-forwarded-host", "")}
    return origin.split("://", 1)[-1].rstrip("/") in hosts - {""}


def authenticate(request: Request, session: Session, csrf_given: str | None) -> Principal:
    """The reviewer of a request; cookie logins must prove the request is not forged on unsafe methods."""
    authorization = request.headers.get("authorization")
    if authorization:
        scheme, _, bearer = authorization.partition(" ")
        if scheme.lower() != "bearer" or not bearer.strip():
            raise Unauthorized("Authorization must be 'Bearer rvw_…'", code="invalid_token")
        return Principal(reviewers.reviewer_for_token(session, bearer.strip()), None)
    cookie = request.cookies.get(SESSION_COOKIE)
    reviewer = reviewers.reviewer_for_session(session, cookie)
    assert cookie is not None
    if request.method not in SAFE_METHODS:
        if not _same_origin(request):
            raise Forbidden("cross-origin request refused", code="csrf_failed")
        if not reviewers.csrf_valid(cookie, csrf_given or request.headers.get(CSRF_HEADER)):
            raise Forbidden("missing or wrong CSRF token; reload the page", code="csrf_failed")
    return Principal(reviewer, reviewers.csrf_token_for(cookie))


def get_principal(request: Request, session: Annotated[Session, Depends(get_session)]) -> Principal:
    """The signed-in reviewer (session cookie plus ``X-CSRF-Token`` header, or an API token); else 401."""
    return authenticate(request, session, None)


async def get_form_principal(
    request: Request, session: Annotated[Session, Depends(get_session)]
) -> Principal:
    """Like get_principal, for HTML form posts whose CSRF token is a form field."""
    csrf = None
    if request.method not in SAFE_METHODS:
        form = await request.form()
        value = form.get(CSRF_FIELD)
        csrf = value if isinstance(value, str) else None
    return authenticate(request, session, csrf)


PrincipalDep = Annotated[Principal, Depends(get_principal)]
FormPrincipalDep = Annotated[Principal, Depends(get_form_principal)]
