"""Tenants (the platforms that submit content) and their API keys."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import CheckConstraint, DateTime, Float, ForeignKey, Integer, String, Text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column, relationship

from moderation.db import Base, TimestampMixin, new_id


class Tenant(TimestampMixin, Base):
    """A platform that submits content, with its routing thresholds and policy."""

    __tablename__ = "tenants"
    __table_args__ = (CheckConstraint("retention_days BETWEEN 0 AND 36500", name="retention_days_in_range"),)

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    block_threshold: Mapped[float] = mapped_column(Float)
    allow_threshold: Mapped[float] = mapped_column(Float)
    min_confidence: Mapped[float] = mapped_column(Float)
    category_block_threshold: Mapped[float] = mapped_column(Float, default=0.95)
    category_review_threshold: Mapped[float] = mapped_column(Float, default=0.6)
    rate_limit_per_minute: Mapped[int | None] = mapped_column(Integer, nullable=True)
    policy: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict)
    policy_version: Mapped[int] = mapped_column(Integer, default=1)
    # Days after which a final submission is erased; None: the service's default, 0: keep everything.
    retention_days: Mapped[int | None] = mapped_column(Integer, nullable=True)

    api_keys: Mapped[list[ApiKey]] = relationship(back_populates="tenant", lazy="raise")


class ApiKey(Base):
    """An API key of a tenant; only its SHA-256 hash is stored."""

    __tablename__ = "api_keys"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    prefix: Mapped[str] = mapped_column(String(16))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    label: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)

    tenant: Mapped[Tenant] = relationship(back_populates="api_keys", lazy="raise")
