"""SQL for reviewers, their sessions and API tokens."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from moderation.reviewers.models import Reviewer, ReviewerSession, ReviewerToken


class ReviewerRepository:
    """Reads and writes reviewer accounts, sessions and tokens."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def add(self, row: Reviewer | ReviewerSession | ReviewerToken) -> None:
        """Insert a reviewer, a session or a token."""
        self.session.add(row)
        self.session.flush()

    def get(self, reviewer_id: uuid.UUID) -> Reviewer | None:
        """A reviewer by id."""
        return self.session.get(Reviewer, reviewer_id)

    def by_email(self, email: str, *, for_update: bool = False) -> Reviewer | None:
        """A reviewer by (normalised) email, optionally row-locked."""
        stmt = select(Reviewer).where(Reviewer.email == email)
        if for_update:
            stmt = stmt.with_for_update()
        return self.session.scalar(stmt)

    def list(self) -> list[Reviewer]:
        """Every reviewer by email."""
        return list(self.session.scalars(select(Reviewer).order_by(Reviewer.email)))

    def reviewer_for_session(self, token_hash: str, now: datetime) -> Reviewer | None:
        """The active reviewer of an unexpired session with this token hash."""
        stmt = (
            select(Reviewer)
            .join(ReviewerSession, ReviewerSession.reviewer_id == Reviewer.id)
            .where(
                ReviewerSession.token_hash == token_hash,
                ReviewerSession.expires_at > now,
                Reviewer.active.is_(True),
            )
        )
        return self.session.scalar(stmt)

    def reviewer_for_token(self, token_hash: str) -> Reviewer | None:
        """The active reviewer owning an unrevoked API token with this hash."""
        stmt = (
            select(Reviewer)
            .join(ReviewerToken, ReviewerToken.reviewer_id == Reviewer.id)
            .where(
                ReviewerToken.token_hash == token_hash,
                ReviewerToken.revoked_at.is_(None),
                Reviewer.active.is_(True),
            )
        )
        return self.session.scalar(stmt)

    def delete_session(self, token_hash: str) -> int:
        """Remove a session; the number removed."""
        result = self.session.execute(delete(ReviewerSession).where(ReviewerSession.token_hash == token_hash))
        return int(result.rowcount)  # type: ignore[attr-defined]

    def delete_sessions_of(self, reviewer_id: uuid.UUID) -> int:
        """End every session of a reviewer; the number ended."""
        result = self.session.execute(
            delete(ReviewerSession).where(ReviewerSession.reviewer_id == reviewer_id)
        )
        return int(result.rowcount)  # type: ignore[attr-defined]

    def delete_expired_sessions(self, now: datetime) -> int:
        """Remove expired sessions; the number removed."""
        result = self.session.execute(delete(ReviewerSession).where(ReviewerSession.expires_at <= now))
        return int(result.rowcount)  # type: ignore[attr-defined]

    def revoke_tokens_of(self, reviewer_id: uuid.UUID, now: datetime) -> int:
        """Revoke every API token of a reviewer; the number revoked."""
        result = self.session.execute(
            update(ReviewerToken)
            .where(ReviewerToken.reviewer_id == reviewer_id, ReviewerToken.revoked_at.is_(None))
            .values(revoked_at=now)
        )
        return int(result.rowcount)  # type: ignore[attr-defined]
