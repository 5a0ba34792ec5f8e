"""Recording actions in the append-only audit log and reading it back."""

from __future__ import annotations

import enum
import uuid
from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from moderation.audit.models import AuditEntry
from moderation.audit.repository import AuditRepository
from moderation.db import new_id, utcnow
from moderation.errors import InvalidInput


def jsonable(value: Any) -> Any:
    """A copy of ``value`` that JSON can hold: enums, UUIDs and datetimes become strings."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        items = [jsonable(v) for v in value]
        return sorted(items, key=str) if isinstance(value, set | frozenset) else items
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    return value


def subject(kind: str, ident: object) -> str:
    """The ``type:id`` name of an audited subject."""
    return f"{kind}:{ident}"


def record(
    session: Session,
    actor: str,
    action: str,
    subject: str,
    before: dict[str, Any] | None = None,
    after: dict[str, Any] | None = None,
    *,
    submission_id: uuid.UUID | None = None,
    tenant_id: uuid.UUID | None = None,
) -> AuditEntry:
    """Append who did what to ``subject`` (``type:id``), with its state before and after, in this transaction."""
    subject_type, sep, subject_id = subject.partition(":")
    if not sep or not subject_type or not subject_id:
        raise InvalidInput("audit subject must look like 'type:id'", code="invalid_audit_subject")
    return AuditRepository(session).add(
        AuditEntry(
            id=new_id(),
            at=utcnow(),
            actor=actor,
            action=action,
            subject_type=subject_type,
            subject_id=subject_id,
            submission_id=submission_id,
            tenant_id=tenant_id,
            before=jsonable(before) if before is not None else None,
            after=jsonable(after) if after is not None else None,
        )
    )


def changed(before: dict[str, Any], after: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Only the keys whose values differ, from both sides."""
    keys = [k for k in {**before, **after} if before.get(k) != after.get(k)]
    return {k: before.get(k) for k in keys}, {k: after.get(k) for k in keys}
