"""SQL for the human-review queue."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from moderation.review.models import ReviewItem, ReviewState


class ReviewRepository:
    """Reads and writes review items."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def add(self, item: ReviewItem) -> ReviewItem:
        """Insert a review item."""
        self.session.add(item)
        self.session.flush()
        return item

    def get(self, item_id: uuid.UUID, *, for_update: bool = False) -> ReviewItem | None:
        """A review item by id, optionally row-locked."""
        stmt = select(ReviewItem).where(ReviewItem.id == item_id)
        if for_update:
            stmt = stmt.with_for_update()
        return self.session.scalar(stmt)

    def latest_for_submissions(self, submission_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, ReviewItem]:
        """The newest review item of each submission that has one."""
        if not submission_ids:
            return {}
        stmt = (
            select(ReviewItem)
            .where(ReviewItem.submission_id.in_(submission_ids))
            .order_by(ReviewItem.submission_id, ReviewItem.created_at.desc())
            .distinct(ReviewItem.submission_id)
        )
        return {item.submission_id: item for item in self.session.scalars(stmt)}

    def next_claimable(self, now: datetime, states: Sequence[ReviewState]) -> ReviewItem | None:
        """Lock the highest-priority, oldest item that is free or whose lease expired; SKIP LOCKED."""
        stmt = (
            select(ReviewItem)
            .where(
                or_(
                    ReviewItem.state.in_(states),
                    (ReviewItem.state == ReviewState.claimed) & (ReviewItem.lease_expires_at < now),
                )
            )
            .order_by(ReviewItem.priority, ReviewItem.created_at)
            .limit(1)
            .with_for_update(skip_locked=True)
        )
        return self.session.scalar(stmt)

    def list(self, *, state: ReviewState | None, tenant_id: uuid.UUID | None, limit: int) -> list[ReviewItem]:
        """Review items, highest priority and oldest first."""
        stmt = select(ReviewItem).order_by(ReviewItem.priority, ReviewItem.created_at).limit(limit)
        if state is not None:
            stmt = stmt.where(ReviewItem.state == state)
        if tenant_id is not None:
            stmt = stmt.where(ReviewItem.tenant_id == tenant_id)
        return list(self.session.scalars(stmt))

    def release_expired(self, now: datetime) -> int:
        """Return items whose reviewer lease expired to the queue; the number released."""
        result = self.session.execute(
            update(ReviewItem)
            .where(ReviewItem.state == ReviewState.claimed, ReviewItem.lease_expires_at < now)
            .values(state=ReviewState.pending, claimed_by=None, lease_token=None, lease_expires_at=None)
        )
        return int(result.rowcount)  # type: ignore[attr-defined]
