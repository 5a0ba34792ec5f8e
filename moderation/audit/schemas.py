"""The JSON shape of audit log entries."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from pydantic import BaseModel

from moderation.audit.models import AuditEntry


class AuditEntryOut(BaseModel):
    """One audit log entry."""

    id: uuid.UUID
    at: datetime
    actor: str
    action: str
    subject: str
    submission_id: uuid.UUID | None
    tenant_id: uuid.UUID | None
    before: dict[str, Any] | None
    after: dict[str, Any] | None

    @classmethod
    def from_model(cls, entry: AuditEntry) -> AuditEntryOut:
        """Build from the ORM row."""
        return cls(
            id=entry.id,
            at=entry.at,
            actor=entry.actor,
            action=entry.action,
            subject=f"{entry.subject_type}:{entry.subject_id}",
            submission_id=entry.submission_id,
            tenant_id=entry.tenant_id,
            before=entry.before,
            after=entry.after,
        )
