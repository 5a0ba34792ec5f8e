"""Items of the human-review queue."""

from __future__ import annotations

import enum
import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import Boolean, DateTime, Enum, ForeignKey, Index, Integer, String, Text, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from moderation.db import Base, TimestampMixin, new_id


class ReviewState(enum.StrEnum):
    """Where a review item stands."""

    pending = "pending"
    claimed = "claimed"
    escalated = "escalated"
    decided = "decided"


#: States of an item a person is still to decide.
REVIEW_OPEN_STATES = (ReviewState.pending, ReviewState.claimed, ReviewState.escalated)


class ReviewDecision(enum.StrEnum):
    """What a reviewer decided."""

    approve = "approve"
    reject = "reject"
    escalate = "escalate"


class ReviewKind(enum.StrEnum):
    """Why an item is in the queue: a first review, a tenant's appeal, or a QA second review."""

    review = "review"
    appeal = "appeal"
    qa = "qa"


class ReviewItem(TimestampMixin, Base):
    """A submission waiting for, or decided by, a human reviewer."""

    __tablename__ = "review_items"
    __table_args__ = (
        Index(
            "ix_review_items_open",
            "priority",
            "created_at",
            postgresql_where=text("state IN ('pending', 'claimed', 'escalated')"),
        ),
        Index("ix_review_items_decided", "decided_at", postgresql_where=text("state = 'decided'")),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    submission_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("submissions.id", ondelete="CASCADE"), index=True
    )
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    state: Mapped[ReviewState] = mapped_column(
        Enum(ReviewState, name="review_state", native_enum=False, length=20), default=ReviewState.pending
    )
    priority: Mapped[int] = mapped_column(Integer, default=100)
    reason: Mapped[str] = mapped_column(Text, default="")
    claimed_by: Mapped[str | None] = mapped_column(String(320), nullable=True)
    # When the current holder claimed the item: renewals stop after REVIEW_MAX_HOLD_SECONDS.
    claimed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    lease_token: Mapped[uuid.UUID | None] = mapped_column(nullable=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    decision: Mapped[ReviewDecision | None] = mapped_column(
        Enum(ReviewDecision, name="review_decision", native_enum=False, length=20), nullable=True
    )
    categories: Mapped[list[str]] = mapped_column(JSONB, default=list)
    note: Mapped[str | None] = mapped_column(Text, nullable=True)
    decided_by: Mapped[str | None] = mapped_column(String(320), nullable=True)
    decided_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    details: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict)
    kind: Mapped[ReviewKind] = mapped_column(
        Enum(ReviewKind, name="review_kind", native_enum=False, length=20),
        default=ReviewKind.review,
        server_default=ReviewKind.review.value,
    )
    # An escalated item stays in the leads' queue while claimed, and returns there when its lease expires.
    escalated: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    origin_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("review_items.id", ondelete="SET NULL"), nullable=True, index=True
    )
    assigned_to: Mapped[str | None] = mapped_column(String(320), nullable=True, index=True)
    excluded_reviewers: Mapped[list[str]] = mapped_column(
        JSONB, default=list, server_default=text("'[]'::jsonb")
    )
