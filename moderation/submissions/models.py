"""Submissions, their verdicts and the record of each processing attempt."""

from __future__ import annotations

import enum
import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column, relationship

from moderation.db import Base, TimestampMixin, new_id


class SubmissionStatus(enum.StrEnum):
    """Lifecycle of a submission; decided, reviewed and failed are final."""

    queued = "queued"
    processing = "processing"
    decided = "decided"
    in_review = "in_review"
    reviewed = "reviewed"
    failed = "failed"


class Decision(enum.StrEnum):
    """What the service concluded about a submission."""

    allow = "allow"
    block = "block"
    review = "review"


def _enum(cls: type[enum.Enum], name: str) -> Enum:
    return Enum(cls, name=name, native_enum=False, length=20, validate_strings=True)


class Submission(TimestampMixin, Base):
    """An image and its caption posted by a tenant for moderation."""

    __tablename__ = "submissions"
    __table_args__ = (
        # Unique among the rows that have one: rows without a key (most) add no entry to these indexes.
        Index(
            "uq_submissions_tenant_id_external_id",
            "tenant_id",
            "external_id",
            unique=True,
            postgresql_where=text("external_id IS NOT NULL"),
        ),
        Index(
            "uq_submissions_tenant_id_idempotency_key",
            "tenant_id",
            "idempotency_key",
            unique=True,
            postgresql_where=text("idempotency_key IS NOT NULL"),
        ),
        # A tenant's listing, newest first (ids are time-ordered).
        Index("ix_submissions_tenant_id_id", "tenant_id", "id"),
        Index(
            "ix_submissions_active",
            "status",
            "created_at",
            postgresql_where=text("status IN ('queued', 'processing')"),
        ),
        # Whether an image is still needed by a submission that was not erased.
        Index("ix_submissions_image_sha256", "image_sha256"),
        # Retention: a tenant's oldest submissions not erased yet.
        Index(
            "ix_submissions_tenant_unerased_created",
            "tenant_id",
            "created_at",
            postgresql_where=text("erased_at IS NULL"),
        ),
        # Erased submissions whose image has not been released yet.
        Index(
            "ix_submissions_image_unreleased",
            "erased_at",
            postgresql_where=text("erased_at IS NOT NULL AND image_released_at IS NULL"),
        ),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    external_id: Mapped[str | None] = mapped_column(String(256), nullable=True)
    idempotency_key: Mapped[str | None] = mapped_column(String(256), nullable=True)
    caption: Mapped[str] = mapped_column(Text)
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", JSONB, default=dict)
    image_sha256: Mapped[str] = mapped_column(String(64))
    image_format: Mapped[str] = mapped_column(String(16))
    image_width: Mapped[int] = mapped_column(Integer)
    image_height: Mapped[int] = mapped_column(Integer)
    image_bytes: Mapped[int] = mapped_column(BigInteger)
    image_source_url: Mapped[str | None] = mapped_column(Text, nullable=True)
    status: Mapped[SubmissionStatus] = mapped_column(
        _enum(SubmissionStatus, "submission_status"), default=SubmissionStatus.queued
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_token: Mapped[uuid.UUID | None] = mapped_column(nullable=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    enqueued_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    final_decision: Mapped[Decision | None] = mapped_column(_enum(Decision, "decision"), nullable=True)
    #: When its content (caption, metadata, image, the verdict's texts) was erased; decisions and scores stay.
    erased_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    #: When, after the erasure, its claim on the image was released (the image deleted unless still in use).
    image_released_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)

    verdict: Mapped[Verdict | None] = relationship(back_populates="submission", lazy="raise", uselist=False)


class Verdict(Base):
    """The engine's explanatory verdict; at most one per submission."""

    __tablename__ = "verdicts"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    submission_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("submissions.id", ondelete="CASCADE"), unique=True
    )
    decision: Mapped[Decision] = mapped_column(_enum(Decision, "decision"))
    conflict_score: Mapped[float] = mapped_column(Float)
    confidence: Mapped[float] = mapped_column(Float)
    categories: Mapped[list[dict[str, Any]]] = mapped_column(JSONB)
    description: Mapped[str] = mapped_column(Text)
    visible_text: Mapped[str] = mapped_column(Text)
    explanation: Mapped[str] = mapped_column(Text)
    reasons: Mapped[list[str]] = mapped_column(JSONB, default=list)
    model_name: Mapped[str] = mapped_column(String(256))
    model_revision: Mapped[str] = mapped_column(String(128))
    prompt_version: Mapped[str] = mapped_column(String(64))
    inference_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    decided_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    submission: Mapped[Submission] = relationship(back_populates="verdict", lazy="raise")


class ProcessingAttempt(Base):
    """One attempt of a worker at judging a submission, kept for audit and debugging."""

    __tablename__ = "processing_attempts"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    submission_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("submissions.id", ondelete="CASCADE"), index=True
    )
    attempt: Mapped[int] = mapped_column(Integer)
    lease_token: Mapped[uuid.UUID] = mapped_column()
    worker: Mapped[str] = mapped_column(String(200))
    batch_size: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    outcome: Mapped[str | None] = mapped_column(String(32), nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
