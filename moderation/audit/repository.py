"""SQL for the audit log: inserts and reads only."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import select, tuple_
from sqlalchemy.orm import Session

from moderation.audit.models import AuditEntry


class AuditRepository:
    """Appends to and reads the audit log."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def add(self, entry: AuditEntry) -> AuditEntry:
        """Append an entry."""
        self.session.add(entry)
        self.session.flush()
        return entry

    def search(
        self,
        *,
        actor: str | None = None,
        action: str | None = None,
        subject_type: str | None = None,
        subject_id: str | None = None,
        submission_id: uuid.UUID | None = None,
        before: datetime | None = None,
        older_than: uuid.UUID | None = None,
        limit: int = 100,
    ) -> list[AuditEntry]:
        """Entries matching every given filter, newest first; ``older_than`` starts after that entry."""
        stmt = select(AuditEntry).order_by(AuditEntry.at.desc(), AuditEntry.id.desc()).limit(limit)
        if actor:
            stmt = stmt.where(AuditEntry.actor == actor)
        if action:
            stmt = stmt.where(AuditEntry.action.startswith(action, autoescape=True))
        if subject_type:
            stmt = stmt.where(AuditEntry.subject_type == subject_type)
        if subject_id:
            stmt = stmt.where(AuditEntry.subject_id == subject_id)
        if submission_id:
            stmt = stmt.where(AuditEntry.submission_id == submission_id)
        if before:
            stmt = stmt.where(AuditEntry.at < before)
        if older_than is not None:
            at = select(AuditEntry.at).where(AuditEntry.id == older_than).scalar_subquery()
            stmt = stmt.where(tuple_(AuditEntry.at, AuditEntry.id) < tuple_(at, older_than))
        return list(self.session.scalars(stmt))
