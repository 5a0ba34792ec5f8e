"""SQL for the audit log: inserts and reads (and, for an erased submission, its entries to redact)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import select, text, tuple_, update
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

    def for_submissions(self, submission_ids: Sequence[uuid.UUID]) -> list[AuditEntry]:
        """Every entry about these submissions, to redact the free text of erased ones."""
        if not submission_ids:
            return []
        return list(
            self.session.scalars(select(AuditEntry).where(AuditEntry.submission_id.in_(submission_ids)))
        )

    def redact_snapshots(self, changes: Sequence[tuple[uuid.UUID, Any, Any]]) -> None:
        """Replace entries' before/after snapshots (id, before, after): the one change the database allows.

        The log's trigger refuses every other UPDATE, and this one too unless the entry's submission is
        erased, only note/reason/appeal_reason change and only to "(erased)", inside the transaction-local
        ``moderation.audit_redaction`` setting made here.
        """
        if not changes:
            return
        self.session.flush()
        # A failed UPDATE aborts the transaction, whose rollback resets the setting: no ``finally`` needed.
        self.session.execute(text("SET LOCAL moderation.audit_redaction = 'on'"))
        for entry_id, before, after in changes:
            self.session.execute(
                update(AuditEntry)
                .where(AuditEntry.id == entry_id)
                .values(before=before, after=after)
                .execution_options(synchronize_session=False)
            )
        self.session.execute(text("SET LOCAL moderation.audit_redaction = 'off'"))

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
