"""Reviewer accounts: argon2 passwords, sessions, lockout, API tokens and CSRF tokens."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from moderation.audit.models import AuditEntry
from moderation.config import Settings
from moderation.db import utcnow
from moderation.errors import Conflict, InvalidInput, Unauthorized
from moderation.reviewers import service
from moderation.reviewers.models import ReviewerSession, Role
from moderation.reviewers.service import AccountLocked

PASSWORD = "correct horse battery"


def _actions(session: Session, email: str) -> list[str]:
    rows = session.scalars(
        select(AuditEntry.action).where(AuditEntry.subject_id == email).order_by(AuditEntry.at, AuditEntry.id)
    )
    return list(rows)


def test_passwords_are_stored_as_argon2_hashes_and_sessions_authenticate(
    session: Session, settings: Settings
) -> None:
    reviewer = service.create_reviewer(session, " Ann@Example.com ", "lead", PASSWORD, display_name="Ann")
    assert reviewer.email == "ann@example.com" and reviewer.role == Role.lead
    assert reviewer.password_hash.startswith("$argon2id$") and PASSWORD not in reviewer.password_hash
    issued = service.login(session, "ANN@example.com", PASSWORD, settings, user_agent="pytest")
    assert issued.token.startswith("rvs_")
    stored = session.scalars(select(ReviewerSession)).one()
    assert stored.token_hash != issued.token and len(stored.token_hash) == 64
    assert service.reviewer_for_session(session, issued.token).id == reviewer.id
    assert service.csrf_valid(issued.token, issued.csrf_token)
    assert not service.csrf_valid(issued.token, "0" * 64)
    assert not service.csrf_valid(issued.token, None)
    service.logout(session, issued.token)
    with pytest.raises(Unauthorized):
        service.reviewer_for_session(session, issued.token)
    assert _actions(session, "ann@example.com") == ["reviewer.create", "login", "logout"]


def test_expired_sessions_are_refused(session: Session, settings: Settings) -> None:
    service.create_reviewer(session, "bo@example.com", Role.reviewer, PASSWORD)
    issued = service.login(session, "bo@example.com", PASSWORD, settings)
    stored = session.scalars(select(ReviewerSession)).one()
    stored.expires_at = utcnow() - timedelta(seconds=1)
    session.flush()
    with pytest.raises(Unauthorized):
        service.reviewer_for_session(session, issued.token)


def test_repeated_failures_lock_the_account(sessions: sessionmaker[Session], settings: Settings) -> None:
    with sessions() as session, session.begin():
        service.create_reviewer(session, "cy@example.com", "reviewer", PASSWORD)
    for attempt in range(settings.review_max_failed_logins):
        with sessions() as session:
            expected = AccountLocked if attempt == settings.review_max_failed_logins - 1 else Unauthorized
            with pytest.raises(expected):
                service.login(session, "cy@example.com", "wrong password!", settings)
            session.commit()
    with sessions() as session:
        # Even the right password is refused while the account is locked.
        with pytest.raises(AccountLocked):
            service.login(session, "cy@example.com", PASSWORD, settings)
        session.commit()
    with sessions() as session, session.begin():
        reviewer = service.get_reviewer(session, "cy@example.com")
        assert reviewer.locked_until is not None
        reviewer.locked_until = utcnow() - timedelta(seconds=1)
    with sessions() as session, session.begin():
        assert service.login(session, "cy@example.com", PASSWORD, settings).reviewer.failed_logins == 0
        actions = _actions(session, "cy@example.com")
    assert actions.count("login.failed") == settings.review_max_failed_logins - 1
    assert "login.locked" in actions and "login.refused_locked" in actions and actions[-1] == "login"


def test_unknown_emails_and_inactive_reviewers_cannot_log_in(session: Session, settings: Settings) -> None:
    with pytest.raises(Unauthorized):
        service.login(session, "nobody@example.com", PASSWORD, settings)
    reviewer = service.create_reviewer(session, "di@example.com", "reviewer", PASSWORD)
    token = service.issue_token(session, reviewer, label="script", actor="cli")
    assert token.startswith("rvw_")
    assert service.reviewer_for_token(session, token).id == reviewer.id
    service.update_reviewer(session, reviewer, actor="cli", active=False)
    with pytest.raises(Unauthorized):
        service.login(session, "di@example.com", PASSWORD, settings)
    with pytest.raises(Unauthorized):
        service.reviewer_for_token(session, token)


def test_accounts_are_validated(session: Session) -> None:
    service.create_reviewer(session, "ed@example.com", "admin", PASSWORD)
    with pytest.raises(Conflict):
        service.create_reviewer(session, "ED@example.com", "admin", PASSWORD)
    with pytest.raises(InvalidInput):
        service.create_reviewer(session, "fi@example.com", "admin", "short")
    with pytest.raises(InvalidInput):
        service.create_reviewer(session, "fi@example.com", "owner", PASSWORD)
    with pytest.raises(InvalidInput):
        service.create_reviewer(session, "not an email", "admin", PASSWORD)


def test_a_password_reset_ends_sessions_and_revokes_api_tokens(session: Session, settings: Settings) -> None:
    reviewer = service.create_reviewer(session, "kim@example.com", "reviewer", "kim's first password")
    opened = service.login(session, "kim@example.com", "kim's first password", settings)
    token = service.issue_token(session, reviewer, label="script", actor="cli")
    service.set_password(session, reviewer, "kim's second password", actor="cli")
    with pytest.raises(Unauthorized):
        service.reviewer_for_session(session, opened.token)
    with pytest.raises(Unauthorized):
        service.reviewer_for_token(session, token)
