"""Reviewer accounts: creation, password logins with lockout, sessions, API tokens and CSRF tokens."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import timedelta
from functools import lru_cache

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy.orm import Session

from moderation.audit import service as audit
from moderation.config import Settings
from moderation.db import new_id, utcnow
from moderation.errors import Conflict, InvalidInput, ModerationError, NotFound, Unauthorized
from moderation.reviewers.models import Reviewer, ReviewerSession, ReviewerToken, Role
from moderation.reviewers.repository import ReviewerRepository

SESSION_PREFIX = "rvs_"
TOKEN_PREFIX = "rvw_"  # noqa: S105 - a prefix, not a secret
MIN_PASSWORD_CHARS = 10
MAX_PASSWORD_CHARS = 1024


class AccountLocked(ModerationError):
    """Too many failed logins in a row; the account is locked for a while."""

    code = "account_locked"
    status_code = 429


@dataclass(frozen=True)
class IssuedSession:
    """A new login session: the cookie token (shown once), its CSRF token and the reviewer."""

    reviewer: Reviewer
    token: str
    csrf_token: str


@lru_cache(maxsize=1)
def _hasher() -> PasswordHasher:
    return PasswordHasher()


@lru_cache(maxsize=1)
def _dummy_hash() -> str:
    # Verifying against this when the email is unknown keeps both paths equally slow (no user enumeration).
    return _hasher().hash(secrets.token_urlsafe(16))


def _sha256(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def normalize_email(email: str) -> str:
    """Lower-cased, trimmed email; InvalidInput when it does not look like one."""
    value = email.strip().lower()
    local, at, domain = value.partition("@")
    if not at or not local or not domain or len(value) > 320 or any(c.isspace() for c in value):
        raise InvalidInput(f"{email!r} is not an email address", code="invalid_email")
    return value


def _check_password(password: str) -> None:
    if not MIN_PASSWORD_CHARS <= len(password) <= MAX_PASSWORD_CHARS:
        raise InvalidInput(
            f"a password needs {MIN_PASSWORD_CHARS} to {MAX_PASSWORD_CHARS} characters", code="weak_password"
        )


def hash_password(password: str) -> str:
    """An argon2id hash of a password."""
    return _hasher().hash(password)


def create_reviewer(
    session: Session,
    email: str,
    role: Role | str,
    password: str,
    *,
    display_name: str = "",
    actor: str = "cli",
) -> Reviewer:
    """Create a reviewer account with an argon2 password hash."""
    email = normalize_email(email)
    try:
        role = Role(role)
    except ValueError as exc:
        raise InvalidInput(f"role must be one of {[r.value for r in Role]}", code="invalid_role") from exc
    _check_password(password)
    repo = ReviewerRepository(session)
    if repo.by_email(email) is not None:
        raise Conflict(f"reviewer {email} already exists", code="reviewer_exists")
    reviewer = Reviewer(
        id=new_id(),
        email=email,
        display_name=display_name.strip()[:200],
        role=role,
        password_hash=hash_password(password),
        active=True,
        failed_logins=0,
    )
    repo.add(reviewer)
    audit.record(
        session,
        actor,
        "reviewer.create",
        audit.subject("reviewer", email),
        None,
        {"email": email, "role": role, "display_name": reviewer.display_name},
    )
    return reviewer


def get_reviewer(session: Session, email: str) -> Reviewer:
    """A reviewer by email, or NotFound."""
    reviewer = ReviewerRepository(session).by_email(normalize_email(email), for_update=True)
    if reviewer is None:
        raise NotFound(f"no reviewer {email}", code="reviewer_not_found")
    return reviewer


def set_password(session: Session, reviewer: Reviewer, password: str, *, actor: str) -> None:
    """Replace a reviewer's password, unlock the account, end their sessions and revoke their API tokens.

    A reset is what follows a leaked password: whatever was opened with the old one must stop working too.
    """
    _check_password(password)
    reviewer.password_hash = hash_password(password)
    reviewer.failed_logins = 0
    reviewer.locked_until = None
    ReviewerRepository(session).delete_sessions_of(reviewer.id)
    ReviewerRepository(session).revoke_tokens_of(reviewer.id, utcnow())
    audit.record(session, actor, "reviewer.password", audit.subject("reviewer", reviewer.email))


def update_reviewer(
    session: Session,
    reviewer: Reviewer,
    *,
    actor: str,
    role: Role | str | None = None,
    active: bool | None = None,
    unlock: bool = False,
) -> Reviewer:
    """Change a reviewer's role or active flag, or unlock the account; audited with before and after."""
    before = {"role": reviewer.role, "active": reviewer.active, "locked_until": reviewer.locked_until}
    if role is not None:
        try:
            reviewer.role = Role(role)
        except ValueError as exc:
            raise InvalidInput(f"role must be one of {[r.value for r in Role]}", code="invalid_role") from exc
    if active is not None:
        reviewer.active = active
        if not active:
            ReviewerRepository(session).delete_sessions_of(reviewer.id)
            ReviewerRepository(session).revoke_tokens_of(reviewer.id, utcnow())
    if unlock:
        reviewer.failed_logins = 0
        reviewer.locked_until = None
    session.flush()
    if role is not None or active is not None:
        from moderation.review.service import hand_back_items_of  # review builds on reviewers

        hand_back_items_of(session, reviewer, actor=actor)
    after = {"role": reviewer.role, "active": reviewer.active, "locked_until": reviewer.locked_until}
    old, new = audit.changed(audit.jsonable(before), audit.jsonable(after))
    if old or new:
        audit.record(session, actor, "reviewer.update", audit.subject("reviewer", reviewer.email), old, new)
    return reviewer


def login(
    session: Session, email: str, password: str, settings: Settings, *, user_agent: str | None = None
) -> IssuedSession:
    """Check a password and open a session; failures count towards a lockout (the caller must commit them)."""
    now = utcnow()
    try:
        email = normalize_email(email)
    except InvalidInput:
        email = email.strip().lower()[:320]
    repo = ReviewerRepository(session)
    reviewer = repo.by_email(email, for_update=True) if email else None
    if reviewer is None or not reviewer.active:
        _verify(_dummy_hash(), password)
        audit.record(session, "anonymous", "login.failed", audit.subject("reviewer", email or "?"))
        raise Unauthorized("wrong email or password", code="invalid_credentials")
    if reviewer.locked_until is not None and reviewer.locked_until > now:
        audit.record(
            session, reviewer.email, "login.refused_locked", audit.subject("reviewer", reviewer.email)
        )
        minutes = max(1, int((reviewer.locked_until - now).total_seconds() // 60) + 1)
        raise AccountLocked(
            f"too many failed sign-ins; try again in {minutes} minute{'s' if minutes > 1 else ''}"
        )
    if not _verify(reviewer.password_hash, password):
        reviewer.failed_logins += 1
        if reviewer.failed_logins >= settings.review_max_failed_logins:
            reviewer.failed_logins = 0
            reviewer.locked_until = now + timedelta(seconds=settings.review_lockout_seconds)
            audit.record(
                session,
                reviewer.email,
                "login.locked",
                audit.subject("reviewer", reviewer.email),
                None,
                {"locked_until": reviewer.locked_until},
            )
            session.flush()
            raise AccountLocked("too many failed sign-ins; the account is locked for a while")
        audit.record(
            session,
            reviewer.email,
            "login.failed",
            audit.subject("reviewer", reviewer.email),
            None,
            {"failed_logins": reviewer.failed_logins},
        )
        session.flush()
        raise Unauthorized("wrong email or password", code="invalid_credentials")
    if _hasher().check_needs_rehash(reviewer.password_hash):
        reviewer.password_hash = hash_password(password)
    reviewer.failed_logins = 0
    reviewer.locked_until = None
    reviewer.last_login_at = now
    token = SESSION_PREFIX + secrets.token_urlsafe(32)
    repo.delete_expired_sessions(now)
    repo.add(
        ReviewerSession(
            id=new_id(),
            reviewer_id=reviewer.id,
            token_hash=_sha256(token),
            created_at=now,
            expires_at=now + timedelta(hours=settings.review_session_hours),
            user_agent=(user_agent or "")[:400] or None,
        )
    )
    audit.record(session, reviewer.email, "login", audit.subject("reviewer", reviewer.email))
    return IssuedSession(reviewer=reviewer, token=token, csrf_token=csrf_token_for(token))


def _verify(password_hash: str, password: str) -> bool:
    try:
        return _hasher().verify(password_hash, password)
    except (VerificationError, InvalidHashError):
        return False


def logout(session: Session, token: str) -> None:
    """End the session with this cookie token (nothing happens when it is unknown)."""
    repo = ReviewerRepository(session)
    reviewer = repo.reviewer_for_session(_sha256(token), utcnow())
    if repo.delete_session(_sha256(token)) and reviewer is not None:
        audit.record(session, reviewer.email, "logout", audit.subject("reviewer", reviewer.email))


def reviewer_for_session(session: Session, token: str | None) -> Reviewer:
    """The reviewer of a live session cookie, or Unauthorized."""
    if not token or not token.startswith(SESSION_PREFIX):
        raise Unauthorized("sign in to review", code="not_signed_in")
    reviewer = ReviewerRepository(session).reviewer_for_session(_sha256(token), utcnow())
    if reviewer is None:
        raise Unauthorized("your session ended; sign in again", code="not_signed_in")
    return reviewer


def issue_token(session: Session, reviewer: Reviewer, *, label: str | None = None, actor: str) -> str:
    """Issue an API token (``rvw_…``) for a reviewer; only its hash is stored."""
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    ReviewerRepository(session).add(
        ReviewerToken(
            id=new_id(),
            reviewer_id=reviewer.id,
            prefix=token[:12],
            token_hash=_sha256(token),
            label=label,
            created_at=utcnow(),
        )
    )
    audit.record(
        session,
        actor,
        "reviewer.token_issued",
        audit.subject("reviewer", reviewer.email),
        None,
        {"prefix": token[:12], "label": label},
    )
    return token


def reviewer_for_token(session: Session, token: str) -> Reviewer:
    """The reviewer of an API token, or Unauthorized."""
    if not token.startswith(TOKEN_PREFIX):
        raise Unauthorized("a reviewer API token starts with rvw_", code="invalid_token")
    reviewer = ReviewerRepository(session).reviewer_for_token(_sha256(token))
    if reviewer is None:
        raise Unauthorized("invalid reviewer API token", code="invalid_token")
    return reviewer


def csrf_token_for(session_token: str) -> str:
    """The CSRF token bound to a session: only someone who can read the session cookie can compute it."""
    return hmac.new(session_token.encode(), b"moderation-review-csrf", hashlib.sha256).hexdigest()


def csrf_valid(session_token: str, given: str | None) -> bool:
    """Whether ``given`` is the CSRF token of this session."""
    return bool(given) and hmac.compare_digest(csrf_token_for(session_token), str(given))


def require_role(reviewer: Reviewer, role: Role) -> None:
    """Raise Forbidden unless the reviewer has at least ``role``."""
    from moderation.reviewers.schemas import ReviewerRef

    ReviewerRef.of(reviewer).require(role, "do this")
