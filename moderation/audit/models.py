"""Rows of the append-only audit log."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import DateTime, Index, String, func
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from moderation.db import Base, new_id, utcnow


class AuditEntry(Base):
    """Who did what to which subject, when, and the subject before and after; never updated or deleted."""

    __tablename__ = "audit_log"
    __table_args__ = (
        Index("ix_audit_log_subject", "subject_type", "subject_id", "at"),
        Index("ix_audit_log_submission_id", "submission_id", "at"),
        Index("ix_audit_log_actor", "actor", "at"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), default=utcnow, index=True
    )
    actor: Mapped[str] = mapped_column(String(400))
    action: Mapped[str] = mapped_column(String(64))
    subject_type: Mapped[str] = mapped_column(String(64))
    subject_id: Mapped[str] = mapped_column(String(200))
    # No foreign keys: the log must outlive (and never block the deletion of) what it describes.
    submission_id: Mapped[uuid.UUID | None] = mapped_column(nullable=True)
    tenant_id: Mapped[uuid.UUID | None] = mapped_column(nullable=True)
    before: Mapped[dict[str, Any] | None] = mapped_column(JSONB, nullable=True)
    after: Mapped[dict[str, Any] | None] = mapped_column(JSONB, nullable=True)
