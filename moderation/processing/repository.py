"""SQL for the verdict cache."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from moderation.processing.models import VerdictCacheEntry
from moderation.submissions.models import Verdict


class VerdictCacheRepository:
    """Finds reusable verdicts and records cache bookkeeping."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def find(self, cache_key: str, *, newer_than: datetime) -> Verdict | None:
        """The newest engine-made verdict stored under ``cache_key`` since ``newer_than``."""
        stmt = (
            select(Verdict)
            .join(VerdictCacheEntry, VerdictCacheEntry.verdict_id == Verdict.id)
            .where(VerdictCacheEntry.cache_key == cache_key, VerdictCacheEntry.created_at >= newer_than)
            .order_by(VerdictCacheEntry.created_at.desc())
            .limit(1)
        )
        return self.session.scalar(stmt)

    def add_many(self, entries: Sequence[VerdictCacheEntry]) -> None:
        """Record several verdicts' cache keys or sources (one statement)."""
        if entries:
            self.session.add_all(entries)
            self.session.flush()

    def forget_submissions(self, submission_ids: Sequence[uuid.UUID]) -> None:
        """Stop offering these submissions' verdicts for reuse (their content was erased)."""
        if submission_ids:
            self.session.execute(
                update(VerdictCacheEntry)
                .where(
                    VerdictCacheEntry.verdict_id.in_(
                        select(Verdict.id).where(Verdict.submission_id.in_(submission_ids))
                    )
                )
                .values(cache_key=None)
                .execution_options(synchronize_session=False)
            )

    def source_of(self, verdict_id: uuid.UUID) -> uuid.UUID | None:
        """The verdict a cached verdict was copied from, if it is a copy."""
        return self.session.scalar(
            select(VerdictCacheEntry.cached_from_verdict_id).where(VerdictCacheEntry.verdict_id == verdict_id)
        )
