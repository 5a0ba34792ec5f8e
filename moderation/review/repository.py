"""SQL for the human-review queue."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    Numeric,
    String,
    Uuid,
    and_,
    case,
    cast,
    func,
    literal,
    or_,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy.orm import Session, aliased, selectinload
from sqlalchemy.sql.elements import ColumnElement

from moderation.review.models import REVIEW_OPEN_STATES, ReviewDecision, ReviewItem, ReviewKind, ReviewState
from moderation.reviewers.models import Reviewer
from moderation.submissions.models import Submission, Verdict
from moderation.tenants.models import Tenant

OPEN_STATES = REVIEW_OPEN_STATES


@dataclass(frozen=True)
class LabeledVerdict:
    """A human decision next to the model's scores and the tenant's thresholds at report time."""

    tenant_name: str
    decision: ReviewDecision
    categories: list[str]
    conflict_score: float
    category_scores: dict[str, float]
    allow_threshold: float
    block_threshold: float
    category_review_threshold: float


@dataclass(frozen=True)
class QaPair:
    """A QA second review and the decision it checked."""

    first_reviewer: str
    first_decision: ReviewDecision
    first_categories: list[str]
    second_reviewer: str
    second_decision: ReviewDecision
    second_categories: list[str]


@dataclass(frozen=True)
class ListPosition:
    """Where an item stands in a review listing (its keyset): the next page starts after it."""

    decided: int
    rank: int
    moment: str  # an exact decimal: seconds since the epoch, negated for decided items
    id: uuid.UUID


class ReviewRepository:
    """Reads and writes review items."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def add(self, item: ReviewItem) -> ReviewItem:
        """Insert a review item."""
        self.session.add(item)
        self.session.flush()
        return item

    def add_many(self, items: Sequence[ReviewItem]) -> None:
        """Insert several review items (one statement)."""
        if items:
            self.session.add_all(items)
            self.session.flush()

    def get(self, item_id: uuid.UUID, *, for_update: bool = False) -> ReviewItem | None:
        """A review item by id, optionally row-locked."""
        stmt = select(ReviewItem).where(ReviewItem.id == item_id)
        if for_update:
            stmt = stmt.with_for_update()
        return self.session.scalar(stmt)

    def latest_for_submissions(self, submission_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, ReviewItem]:
        """The newest review item of each submission that has one; QA second reviews are internal."""
        if not submission_ids:
            return {}
        stmt = (
            select(ReviewItem)
            .where(ReviewItem.submission_id.in_(submission_ids), ReviewItem.kind != ReviewKind.qa)
            .order_by(ReviewItem.submission_id, ReviewItem.created_at.desc())
            .distinct(ReviewItem.submission_id)
        )
        return {item.submission_id: item for item in self.session.scalars(stmt)}

    def for_submission(self, submission_id: uuid.UUID) -> list[ReviewItem]:
        """Every review item of a submission, oldest first."""
        stmt = (
            select(ReviewItem)
            .where(ReviewItem.submission_id == submission_id)
            .order_by(ReviewItem.created_at, ReviewItem.id)
        )
        return list(self.session.scalars(stmt))

    def unerased_submissions_locked(self, submission_ids: Sequence[uuid.UUID]) -> set[uuid.UUID]:
        """Which of these submissions are not erased, share-locked so no erasure runs until commit.

        One an erasure holds is skipped, not waited for: the erasure locks the submission first and its
        review items next, the QA sample the other way round, and waiting would deadlock.
        """
        if not submission_ids:
            return set()
        stmt = (
            select(Submission.id)
            .where(Submission.id.in_(submission_ids), Submission.erased_at.is_(None))
            .with_for_update(read=True, skip_locked=True)
        )
        return set(self.session.scalars(stmt))

    def delete_open_qa_items(self, submission_ids: Sequence[uuid.UUID]) -> list[ReviewItem]:
        """Delete the open QA second reviews of these submissions; the deleted items."""
        items = list(
            self.session.scalars(
                select(ReviewItem)
                .where(
                    ReviewItem.submission_id.in_(submission_ids),
                    ReviewItem.kind == ReviewKind.qa,
                    ReviewItem.state.in_(OPEN_STATES),
                )
                .with_for_update()
            )
        )
        for item in items:
            self.session.delete(item)
        self.session.flush()
        return items

    def redact_items_of(self, submission_ids: Sequence[uuid.UUID], text: str) -> None:
        """Replace the free text of these submissions' review items (reasons, notes, appeal reasons)."""
        if not submission_ids:
            return
        self.session.execute(
            update(ReviewItem)
            .where(ReviewItem.submission_id.in_(submission_ids))
            .values(
                reason=text,
                note=case((ReviewItem.note.is_(None), None), else_=text),
                details=ReviewItem.details.op("-")("appeal_reason"),
            )
        )

    def open_items_of(self, email: str) -> list[ReviewItem]:
        """Open items a reviewer holds or was assigned, locked for update."""
        stmt = (
            select(ReviewItem)
            .where(
                ReviewItem.state.in_(OPEN_STATES),
                or_(ReviewItem.claimed_by == email, ReviewItem.assigned_to == email),
            )
            .order_by(ReviewItem.created_at)
            .with_for_update()
        )
        return list(self.session.scalars(stmt))

    def under_open_qa(self, submission_ids: Sequence[uuid.UUID]) -> set[uuid.UUID]:
        """Those of these submissions with a QA second review still waiting for its decision."""
        if not submission_ids:
            return set()
        stmt = select(ReviewItem.submission_id).where(
            ReviewItem.submission_id.in_(submission_ids),
            ReviewItem.kind == ReviewKind.qa,
            ReviewItem.state != ReviewState.decided,
        )
        return set(self.session.scalars(stmt))

    def open_for_submission(self, submission_id: uuid.UUID) -> ReviewItem | None:
        """The submission's item still waiting for a decision, if any (QA items aside)."""
        stmt = select(ReviewItem).where(
            ReviewItem.submission_id == submission_id,
            ReviewItem.state.in_(OPEN_STATES),
            ReviewItem.kind != ReviewKind.qa,
        )
        return self.session.scalars(stmt).first()

    def held_by(self, reviewer: str, now: datetime, *, escalated: bool) -> ReviewItem | None:
        """The most urgent item this reviewer holds under a live lease, row-locked."""
        stmt = (
            select(ReviewItem)
            .where(
                ReviewItem.state == ReviewState.claimed,
                ReviewItem.claimed_by == reviewer,
                ReviewItem.lease_expires_at >= now,
                ReviewItem.escalated.is_(escalated),
            )
            .order_by(ReviewItem.priority, ReviewItem.created_at)
            .limit(1)
            .with_for_update()
        )
        return self.session.scalar(stmt)

    def next_claimable(
        self, now: datetime, *, escalated: bool = False, reviewer: str | None = None, assigned: bool = False
    ) -> ReviewItem | None:
        """Lock the most urgent item that is free or whose lease expired; SKIP LOCKED.

        Only items of the given queue (escalated or not) are considered, never ones the reviewer is
        excluded from; with ``assigned`` only items a lead assigned to this reviewer, otherwise only
        unassigned ones.
        """
        waiting = ReviewState.escalated if escalated else ReviewState.pending
        conditions: list[ColumnElement[bool]] = [
            or_(
                ReviewItem.state == waiting,
                (ReviewItem.state == ReviewState.claimed) & (ReviewItem.lease_expires_at < now),
            ),
            ReviewItem.escalated.is_(escalated),
        ]
        if reviewer is not None:
            conditions.append(~ReviewItem.excluded_reviewers.contains([reviewer]))
        if assigned:
            conditions.append(ReviewItem.assigned_to == reviewer)
        else:
            # An assignment to someone no longer active would keep the item from everyone.
            active = select(Reviewer.email).where(Reviewer.active.is_(True))
            conditions.append(or_(ReviewItem.assigned_to.is_(None), ReviewItem.assigned_to.not_in(active)))
        stmt = (
            select(ReviewItem)
            .where(*conditions)
            .order_by(ReviewItem.priority, ReviewItem.created_at)
            .limit(1)
            .with_for_update(skip_locked=True)
        )
        return self.session.scalar(stmt)

    def list_page(
        self,
        *,
        state: ReviewState | None = None,
        tenant_id: uuid.UUID | None = None,
        kind: ReviewKind | None = None,
        claimed_by: str | None = None,
        decided_by: str | None = None,
        open_only: bool = False,
        limit: int = 100,
        after: ListPosition | None = None,
    ) -> list[tuple[ReviewItem, ListPosition]]:
        """Review items, each with its position in the listing so a next page can start after the last.

        One order for every filter (a keyset): open items first, by priority and age; then decided ones,
        newest decision first; ties broken by id.
        """
        decided = ReviewItem.state == ReviewState.decided
        is_decided = case((decided, 1), else_=0)
        rank = case((decided, 0), else_=ReviewItem.priority)
        moment = case(
            (decided, -func.extract("epoch", ReviewItem.decided_at)),
            else_=func.extract("epoch", ReviewItem.created_at),
        )
        stmt = (
            select(ReviewItem, is_decided, rank, moment)
            .order_by(is_decided, rank, moment, ReviewItem.id)
            .limit(limit)
        )
        if after is not None:
            stmt = stmt.where(
                tuple_(is_decided, rank, moment, ReviewItem.id)
                > tuple_(
                    literal(after.decided),
                    literal(after.rank),
                    cast(literal(after.moment), Numeric),
                    literal(after.id, type_=Uuid()),
                )
            )
        if state is not None:
            stmt = stmt.where(ReviewItem.state == state)
        if open_only:
            stmt = stmt.where(ReviewItem.state.in_(OPEN_STATES))
        if tenant_id is not None:
            stmt = stmt.where(ReviewItem.tenant_id == tenant_id)
        if kind is not None:
            stmt = stmt.where(ReviewItem.kind == kind)
        if claimed_by is not None:
            stmt = stmt.where(ReviewItem.claimed_by == claimed_by)
        if decided_by is not None:
            stmt = stmt.where(ReviewItem.decided_by == decided_by)
        return [
            (item, ListPosition(int(flag), int(item_rank), str(item_moment), item.id))
            for item, flag, item_rank, item_moment in self.session.execute(stmt)
        ]

    def release_expired(self, now: datetime) -> list[tuple[uuid.UUID, uuid.UUID, uuid.UUID, str | None]]:
        """Return items whose reviewer lease expired to their queue (escalated ones to the leads').

        Gives (item id, submission id, tenant id, previous holder) of each released item.
        """
        expired = self.session.execute(
            select(ReviewItem.id, ReviewItem.submission_id, ReviewItem.tenant_id, ReviewItem.claimed_by)
            .where(ReviewItem.state == ReviewState.claimed, ReviewItem.lease_expires_at < now)
            .with_for_update(skip_locked=True)
        ).all()
        if expired:
            self.session.execute(
                update(ReviewItem)
                .where(ReviewItem.id.in_([row[0] for row in expired]))
                .values(
                    state=case(
                        (ReviewItem.escalated.is_(True), ReviewState.escalated.value),
                        else_=ReviewState.pending.value,
                    ),
                    claimed_by=None,
                    claimed_at=None,
                    lease_token=None,
                    lease_expires_at=None,
                )
                .execution_options(synchronize_session=False)
            )
        return [(row[0], row[1], row[2], row[3]) for row in expired]

    def submissions(self, ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, Submission]:
        """Submissions by id with their verdicts."""
        if not ids:
            return {}
        stmt = select(Submission).options(selectinload(Submission.verdict)).where(Submission.id.in_(ids))
        return {s.id: s for s in self.session.scalars(stmt)}

    def tenant_names(self, ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, str]:
        """Tenant names by id."""
        if not ids:
            return {}
        rows = self.session.execute(select(Tenant.id, Tenant.name).where(Tenant.id.in_(set(ids))))
        return {row.id: row.name for row in rows}

    def find_submissions(self, query: str, limit: int = 20) -> list[Submission]:
        """Submissions whose id is ``query`` or whose external id is or starts with it, newest first."""
        query = query.strip()
        conditions: list[ColumnElement[bool]] = [
            Submission.external_id == query,
            Submission.external_id.startswith(query, autoescape=True),
        ]
        try:
            conditions.append(Submission.id == uuid.UUID(query))
        except ValueError:
            if len(query) >= 8 and all(c in "0123456789abcdef-" for c in query.lower()):
                conditions.append(cast(Submission.id, String).startswith(query.lower(), autoescape=True))
        stmt = (
            select(Submission)
            .options(selectinload(Submission.verdict))
            .where(or_(*conditions))
            .order_by(Submission.created_at.desc())
            .limit(limit)
        )
        return list(self.session.scalars(stmt))

    def count_open_by(self) -> dict[tuple[str, str, bool], int]:
        """Open items counted by (state, kind, escalated)."""
        stmt = (
            select(ReviewItem.state, ReviewItem.kind, ReviewItem.escalated, func.count())
            .where(ReviewItem.state.in_(OPEN_STATES))
            .group_by(ReviewItem.state, ReviewItem.kind, ReviewItem.escalated)
        )
        return {(str(s), str(k), bool(e)): int(n) for s, k, e, n in self.session.execute(stmt)}

    def oldest_open(self) -> datetime | None:
        """When the oldest open item entered the queue."""
        return self.session.scalar(
            select(func.min(ReviewItem.created_at)).where(ReviewItem.state.in_(OPEN_STATES))
        )

    def count_decided_since(self, since: datetime) -> dict[str, int]:
        """Items decided since a moment, by decision (escalations count under their final decision)."""
        stmt = (
            select(ReviewItem.decision, func.count())
            .where(ReviewItem.state == ReviewState.decided, ReviewItem.decided_at >= since)
            .group_by(ReviewItem.decision)
        )
        return {str(d): int(n) for d, n in self.session.execute(stmt)}

    def count_open_by_top_category(self) -> dict[str, int]:
        """Open items counted by the category the model scored highest."""
        rows = self.session.execute(
            text(
                """
                SELECT top.name, count(*) FROM review_items ri
                JOIN verdicts v ON v.submission_id = ri.submission_id
                CROSS JOIN LATERAL (
                    SELECT c->>'name' AS name FROM jsonb_array_elements(v.categories) AS c
                    ORDER BY (c->>'score')::float DESC LIMIT 1
                ) AS top
                WHERE ri.state IN ('pending', 'claimed', 'escalated')
                GROUP BY top.name ORDER BY count(*) DESC
                """
            )
        )
        return {str(name): int(n) for name, n in rows}

    def labeled_verdicts(self, since: datetime, limit: int) -> list[LabeledVerdict]:
        """Final human decisions (approve or reject) since a moment, with the model's scores."""
        stmt = (
            select(
                Tenant.name,
                ReviewItem.decision,
                ReviewItem.categories,
                Verdict.conflict_score,
                Verdict.categories,
                Tenant.allow_threshold,
                Tenant.block_threshold,
                Tenant.category_review_threshold,
            )
            .join(Verdict, Verdict.submission_id == ReviewItem.submission_id)
            .join(Tenant, Tenant.id == ReviewItem.tenant_id)
            .where(
                ReviewItem.state == ReviewState.decided,
                ReviewItem.kind.in_([ReviewKind.review, ReviewKind.appeal]),
                ReviewItem.decision.in_([ReviewDecision.approve, ReviewDecision.reject]),
                ReviewItem.decided_at >= since,
            )
            .order_by(ReviewItem.decided_at.desc())
            .limit(limit)
        )
        return [
            LabeledVerdict(
                tenant_name=row[0],
                decision=ReviewDecision(str(row[1])),
                categories=list(row[2] or []),
                conflict_score=float(row[3]),
                category_scores={str(c["name"]): float(c["score"]) for c in (row[4] or [])},
                allow_threshold=float(row[5]),
                block_threshold=float(row[6]),
                category_review_threshold=float(row[7]),
            )
            for row in self.session.execute(stmt)
        ]

    def qa_pairs(self, since: datetime, limit: int) -> list[QaPair]:
        """Decided QA second reviews since a moment, each with the decision it checked."""
        origin = aliased(ReviewItem)
        stmt = (
            select(
                origin.decided_by,
                origin.decision,
                origin.categories,
                ReviewItem.decided_by,
                ReviewItem.decision,
                ReviewItem.categories,
            )
            .join(origin, origin.id == ReviewItem.origin_id)
            .where(
                ReviewItem.kind == ReviewKind.qa,
                ReviewItem.state == ReviewState.decided,
                ReviewItem.decided_at >= since,
                ReviewItem.decision.in_([ReviewDecision.approve, ReviewDecision.reject]),
                origin.decision.in_([ReviewDecision.approve, ReviewDecision.reject]),
            )
            .order_by(ReviewItem.decided_at.desc())
            .limit(limit)
        )
        return [
            QaPair(
                first_reviewer=str(row[0] or ""),
                first_decision=ReviewDecision(str(row[1])),
                first_categories=list(row[2] or []),
                second_reviewer=str(row[3] or ""),
                second_decision=ReviewDecision(str(row[4])),
                second_categories=list(row[5] or []),
            )
            for row in self.session.execute(stmt)
        ]

    def sample_for_qa(self, count: int, *, since: datetime, tenant_id: uuid.UUID | None) -> list[ReviewItem]:
        """A random sample of final human decisions that have no QA second review yet, row-locked."""
        qa = aliased(ReviewItem)
        conditions: list[Any] = [
            ReviewItem.state == ReviewState.decided,
            ReviewItem.kind.in_([ReviewKind.review, ReviewKind.appeal]),
            ReviewItem.decision.in_([ReviewDecision.approve, ReviewDecision.reject]),
            ReviewItem.decided_at >= since,
            ~select(qa.id).where(qa.origin_id == ReviewItem.id, qa.kind == ReviewKind.qa).exists(),
            # An erased submission has nothing left to check.
            select(Submission.id)
            .where(Submission.id == ReviewItem.submission_id, Submission.erased_at.is_(None))
            .exists(),
        ]
        if tenant_id is not None:
            conditions.append(ReviewItem.tenant_id == tenant_id)
        stmt = (
            select(ReviewItem)
            .where(and_(*conditions))
            .order_by(func.random())
            .limit(count)
            .with_for_update(skip_locked=True)
        )
        return list(self.session.scalars(stmt))
