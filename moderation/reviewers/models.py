"""Reviewer accounts, their login sessions and API tokens."""

from __future__ import annotations

import enum
import uuid
from datetime import datetime

from sqlalchemy import Boolean, DateTime, Enum, ForeignKey, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column, relationship

from moderation.db import Base, TimestampMixin, new_id


class Role(enum.StrEnum):
    """What a reviewer may do; each role includes the powers of the ones before it."""

    reviewer = "reviewer"
    lead = "lead"
    admin = "admin"

    @property
    def rank(self) -> int:
        """Position in the hierarchy reviewer < lead < admin."""
        return list(Role).index(self)


class Reviewer(TimestampMixin, Base):
    """A person who reviews submissions; only an argon2 hash of the password is stored."""

    __tablename__ = "reviewers"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    email: Mapped[str] = mapped_column(String(320), unique=True)
    display_name: Mapped[str] = mapped_column(String(200), default="")
    role: Mapped[Role] = mapped_column(
        Enum(Role, name="reviewer_role", native_enum=False, length=20, validate_strings=True)
    )
    password_hash: Mapped[str] = mapped_column(Text)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    failed_logins: Mapped[int] = mapped_column(Integer, default=0)
    locked_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    last_login_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)

    sessions: Mapped[list[ReviewerSession]] = relationship(back_populates="reviewer", lazy="raise")
    tokens: Mapped[list[ReviewerToken]] = relationship(back_populates="reviewer", lazy="raise")


class ReviewerSession(Base):
    """A browser login; the cookie carries the token, the table only its SHA-256."""

    __tablename__ = "reviewer_sessions"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    reviewer_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("reviewers.id", ondelete="CASCADE"), index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    user_agent: Mapped[str | None] = mapped_column(String(400), nullable=True)

    reviewer: Mapped[Reviewer] = relationship(back_populates="sessions", lazy="raise")


class ReviewerToken(Base):
    """A reviewer's API token (``rvw_…``) for programmatic review; only its SHA-256 is stored."""

    __tablename__ = "reviewer_tokens"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    reviewer_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("reviewers.id", ondelete="CASCADE"), index=True)
    prefix: Mapped[str] = mapped_column(String(16))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    label: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)

    reviewer: Mapped[Reviewer] = relationship(back_populates="tokens", lazy="raise")
