"""SQL for submissions, verdicts and processing attempts."""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

import orjson
from sqlalchemy import String, Table, Text, Uuid, bindparam, column, func, or_, select, tuple_, update
from sqlalchemy import cast as sql_cast
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, insert
from sqlalchemy.orm import Session, make_transient_to_detached, selectinload
from sqlalchemy.orm.attributes import set_committed_value
from sqlalchemy.types import TypeEngine

from moderation.db import execute_on_driver, utcnow
from moderation.review.models import REVIEW_OPEN_STATES, ReviewItem, ReviewKind
from moderation.submissions.models import Decision, ProcessingAttempt, Submission, SubmissionStatus, Verdict

_SUBMISSIONS = cast(Table, Submission.__table__)
FINAL_STATUSES = (SubmissionStatus.decided, SubmissionStatus.reviewed, SubmissionStatus.failed)
# Columns a batch of new submissions differ in (one key of each row's JSON object) and those they share
# (one parameter each).
_PER_ROW = (
    "id",
    "tenant_id",
    "external_id",
    "idempotency_key",
    "caption",
    "metadata",
    "image_sha256",
    "image_format",
    "image_width",
    "image_height",
    "image_bytes",
    "image_source_url",
)
_SHARED = ("status", "attempts", "enqueued_at", "created_at", "updated_at")


def _type_of(name: str) -> TypeEngine[Any]:
    # Spelled out for foreign keys: their column type is only known once the referenced table is imported.
    return Uuid() if name in ("id", "tenant_id") else _SUBMISSIONS.c[name].type


# The new rows arrive as one JSON array of objects: one parameter to send for any number of rows, where an
# array per column costs the driver a conversion of every column of every row.
_ROWS = (
    func.jsonb_to_recordset(sql_cast(bindparam("new_rows", type_=Text()), JSONB))
    .table_valued(*(column(name, _type_of(name)) for name in _PER_ROW))
    .render_derived(name="new_rows", with_types=True)
)
# One statement text for any number of rows (INSERT ... SELECT FROM jsonb_to_recordset), so it is parsed and
# planned once, where a multi-row VALUES list would be a new statement for every batch size.
_INSERT_MANY_IF_NEW = (
    insert(_SUBMISSIONS)
    .from_select(
        [*_PER_ROW, *_SHARED],
        select(
            *(_ROWS.c[name] for name in _PER_ROW),
            *(bindparam(f"shared_{name}", type_=_SUBMISSIONS.c[name].type) for name in _SHARED),
        ),
    )
    .on_conflict_do_nothing()
    .returning(_SUBMISSIONS.c.id)
)


def _uuid_as_json(value: object) -> str:
    if isinstance(value, uuid.UUID):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not a column value")


def _json_array(rows: list[dict[str, Any]]) -> str:
    """``rows`` as JSON text (UUIDs as strings); integers beyond 64 bits, which orjson refuses, are kept."""
    try:
        return orjson.dumps(rows).decode()
    except orjson.JSONEncodeError:
        return json.dumps(rows, default=_uuid_as_json, ensure_ascii=False, allow_nan=False)


@dataclass(frozen=True)
class FencedMove:
    """Where a leased submission goes next, valid only while ``lease_token`` still holds its lease."""

    submission_id: uuid.UUID
    lease_token: uuid.UUID
    status: SubmissionStatus
    final_decision: Decision | None = None


_MOVES = (
    func.unnest(
        bindparam("move_ids", type_=ARRAY(Uuid())),
        bindparam("move_tokens", type_=ARRAY(Uuid())),
        bindparam("move_statuses", type_=ARRAY(String(20))),
        bindparam("move_decisions", type_=ARRAY(String(20))),
    )
    .table_valued(
        column("id", Uuid()),
        column("token", Uuid()),
        column("status", String(20)),
        column("final_decision", String(20)),
    )
    .render_derived(name="moves")
)
# UPDATE ... FROM unnest(...): every move of a batch in one statement, each fenced by its own lease token.
_FINISH_FENCED_MANY = (
    update(_SUBMISSIONS)
    .where(
        _SUBMISSIONS.c.id == _MOVES.c.id,
        _SUBMISSIONS.c.lease_token == _MOVES.c.token,
        _SUBMISSIONS.c.status == SubmissionStatus.processing.value,
    )
    .values(
        status=_MOVES.c.status,
        final_decision=_MOVES.c.final_decision,
        last_error=None,
        lease_token=None,
        lease_expires_at=None,
        updated_at=bindparam("now"),
    )
    .returning(_SUBMISSIONS.c.id)
)


class SubmissionRepository:
    """Reads and writes submissions and their verdicts."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def get(
        self, submission_id: uuid.UUID, *, tenant_id: uuid.UUID | None = None, fresh: bool = False
    ) -> Submission | None:
        """A submission with its verdict loaded, optionally only if it belongs to the tenant.

        ``fresh`` overwrites a copy this session already holds with the row as it is now.
        """
        stmt = (
            select(Submission).options(selectinload(Submission.verdict)).where(Submission.id == submission_id)
        )
        if tenant_id is not None:
            stmt = stmt.where(Submission.tenant_id == tenant_id)
        if fresh:
            stmt = stmt.execution_options(populate_existing=True)
        return self.session.scalar(stmt)

    def get_many(self, ids: Sequence[uuid.UUID], *, fresh: bool = False) -> list[Submission]:
        """Submissions by id, verdicts loaded; ``fresh`` overwrites copies this session already holds."""
        stmt = select(Submission).options(selectinload(Submission.verdict)).where(Submission.id.in_(ids))
        if fresh:
            stmt = stmt.execution_options(populate_existing=True)
        return list(self.session.scalars(stmt))

    def find_existing(
        self, tenant_id: uuid.UUID, *, idempotency_key: str | None, external_id: str | None
    ) -> Submission | None:
        """The tenant's submission with this idempotency key or external id, if any."""
        conditions = []
        if idempotency_key is not None:
            conditions.append(Submission.idempotency_key == idempotency_key)
        if external_id is not None:
            conditions.append(Submission.external_id == external_id)
        if not conditions:
            return None
        stmt = (
            select(Submission)
            .options(selectinload(Submission.verdict))
            .where(Submission.tenant_id == tenant_id, or_(*conditions))
            .order_by(Submission.created_at)
            .limit(1)
        )
        return self.session.scalar(stmt)

    def find_existing_many(
        self, keys: Sequence[tuple[uuid.UUID, str | None, str | None]]
    ) -> list[Submission]:
        """Submissions matching any ``(tenant_id, idempotency_key, external_id)`` of ``keys`` (one query)."""
        by_key = [(tenant, key) for tenant, key, _ in keys if key is not None]
        by_external = [(tenant, ext) for tenant, _, ext in keys if ext is not None]
        conditions = []
        if by_key:
            conditions.append(tuple_(Submission.tenant_id, Submission.idempotency_key).in_(by_key))
        if by_external:
            conditions.append(tuple_(Submission.tenant_id, Submission.external_id).in_(by_external))
        if not conditions:
            return []
        stmt = select(Submission).options(selectinload(Submission.verdict)).where(or_(*conditions))
        return list(self.session.scalars(stmt))

    def created_at_of(self, ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, datetime]:
        """Creation times of those of these submissions that exist."""
        if not ids:
            return {}
        stmt = select(Submission.id, Submission.created_at).where(Submission.id.in_(ids))
        return {row.id: row.created_at for row in self.session.execute(stmt)}

    def insert_many_if_new(self, rows: Sequence[dict[str, Any]]) -> set[uuid.UUID]:
        """Insert submissions in one statement, skipping any whose key exists; the ids actually inserted.

        The rows must agree on status, attempts and timestamps (a batch accepted together does).
        """
        if not rows:
            return set()
        first = rows[0]
        if any(row[name] != first[name] for row in rows for name in _SHARED):
            raise ValueError("rows inserted together must share status, attempts and timestamps")
        new_rows = [{name: row[name] for name in _PER_ROW} for row in rows]
        params: dict[str, Any] = {"new_rows": _json_array(new_rows)}
        params.update({f"shared_{name}": first[name] for name in _SHARED})
        params["shared_status"] = SubmissionStatus(params["shared_status"]).value
        # Once per intake pass: straight to the driver (SQLAlchemy's execution steps cost more than it does).
        return {row[0] for row in execute_on_driver(self.session, _INSERT_MANY_IF_NEW, params)}

    def attach_inserted(self, values: dict[str, Any]) -> Submission:
        """The submission just inserted with ``values``, put in the session as loaded, without reading it back."""
        submission = Submission()
        submission.id = values["id"]
        make_transient_to_detached(submission)
        for table_column in Submission.__table__.columns:
            key = "metadata_" if table_column.key == "metadata" else table_column.key
            set_committed_value(submission, key, values.get(table_column.key))
        set_committed_value(submission, "verdict", None)
        self.session.add(submission)
        return submission

    def page(
        self,
        tenant_id: uuid.UUID,
        *,
        status: SubmissionStatus | None,
        limit: int,
        before_id: uuid.UUID | None,
    ) -> list[Submission]:
        """A page of the tenant's submissions, newest first (ids are time-ordered)."""
        stmt = (
            select(Submission)
            .options(selectinload(Submission.verdict))
            .where(Submission.tenant_id == tenant_id)
            .order_by(Submission.id.desc())
            .limit(limit)
        )
        if status is not None:
            stmt = stmt.where(Submission.status == status)
        if before_id is not None:
            stmt = stmt.where(Submission.id < before_id)
        return list(self.session.scalars(stmt))

    def mark_enqueued(self, ids: Sequence[uuid.UUID]) -> None:
        """Record that jobs for these submissions were just sent to the broker."""
        if ids:
            self.session.execute(
                update(Submission).where(Submission.id.in_(ids)).values(enqueued_at=func.now())
            )

    def claim(
        self,
        *,
        first_id: uuid.UUID | None,
        limit: int,
        lease_seconds: int,
        max_attempts: int,
        fresh_only: bool,
    ) -> tuple[uuid.UUID, list[Submission]]:
        """Lease up to ``limit`` claimable submissions (``first_id`` first) with SKIP LOCKED; returns the token.

        ``fresh_only`` leases, besides ``first_id``, only submissions never tried before: a retried submission
        (maybe one that crashed its worker or fails its batch) is leased only by its own job, alone. A
        submission taken over from an expired lease has that lease's attempt recorded as ended.
        """
        now = utcnow()
        claimable = or_(
            Submission.status == SubmissionStatus.queued,
            (Submission.status == SubmissionStatus.processing) & (Submission.lease_expires_at < now),
        )
        candidates = (
            select(Submission.id, Submission.lease_token)
            .where(claimable, Submission.attempts < max_attempts)
            .order_by(
                (Submission.id == first_id).desc() if first_id else Submission.created_at,
                Submission.created_at,
            )
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        if fresh_only:
            fresh = Submission.attempts == 0
            candidates = candidates.where(or_(Submission.id == first_id, fresh) if first_id else fresh)
        token = uuid.uuid4()
        found = self.session.execute(candidates).all()
        if not found:
            return token, []
        ids = [row.id for row in found]
        # A worker that died or stalled left its attempt open: it ended when its lease ran out.
        self.finish_attempts(
            [(row.id, row.lease_token) for row in found if row.lease_token is not None],
            "lease_expired",
            "processing lease expired",
        )
        self.session.execute(
            update(Submission)
            .where(Submission.id.in_(ids))
            .values(
                status=SubmissionStatus.processing,
                attempts=Submission.attempts + 1,
                lease_token=token,
                lease_expires_at=now + timedelta(seconds=lease_seconds),
                updated_at=now,
            )
        )
        claimed = list(
            self.session.scalars(
                select(Submission).where(Submission.id.in_(ids)).execution_options(populate_existing=True)
            )
        )
        claimed.sort(key=lambda s: (s.id != first_id, s.created_at))
        return token, claimed

    def finish_fenced(self, submission_id: uuid.UUID, lease_token: uuid.UUID, values: dict[str, Any]) -> bool:
        """Move a leased submission on, only if this worker still holds its lease (fencing)."""
        result = self.session.execute(
            update(Submission)
            .where(
                Submission.id == submission_id,
                Submission.lease_token == lease_token,
                Submission.status == SubmissionStatus.processing,
            )
            .values(lease_token=None, lease_expires_at=None, updated_at=utcnow(), **values)
        )
        return bool(result.rowcount == 1)  # type: ignore[attr-defined]

    def finish_fenced_many(self, moves: Sequence[FencedMove]) -> set[uuid.UUID]:
        """Move many leased submissions on in one statement, each only if its lease still holds (fencing).

        Returns the ids that moved; a submission whose lease was lost keeps its state.
        """
        if not moves:
            return set()
        params = {
            "move_ids": [move.submission_id for move in moves],
            "move_tokens": [move.lease_token for move in moves],
            "move_statuses": [move.status.value for move in moves],
            "move_decisions": [move.final_decision.value if move.final_decision else None for move in moves],
        }
        return set(self.session.execute(_FINISH_FENCED_MANY, {**params, "now": utcnow()}).scalars())

    def add_verdicts(self, verdicts: Sequence[Verdict]) -> None:
        """Insert the verdicts of submissions this worker holds (one statement); a second verdict fails."""
        self.session.add_all(verdicts)
        self.session.flush()

    def finish_attempts(
        self, leases: Sequence[tuple[uuid.UUID, uuid.UUID]], outcome: str, error: str | None = None
    ) -> None:
        """Record how the attempts of several ``(submission id, lease token)`` pairs ended (one statement)."""
        if leases:
            self.session.execute(
                update(ProcessingAttempt)
                .where(tuple_(ProcessingAttempt.submission_id, ProcessingAttempt.lease_token).in_(leases))
                .values(finished_at=utcnow(), outcome=outcome, error=error)
            )

    def add_attempts(self, attempts: Sequence[ProcessingAttempt]) -> None:
        """Record the start of processing attempts."""
        self.session.add_all(attempts)
        self.session.flush()

    def finish_attempt(
        self, submission_id: uuid.UUID, lease_token: uuid.UUID, outcome: str, error: str | None = None
    ) -> None:
        """Record how a processing attempt ended."""
        self.session.execute(
            update(ProcessingAttempt)
            .where(
                ProcessingAttempt.submission_id == submission_id, ProcessingAttempt.lease_token == lease_token
            )
            .values(finished_at=utcnow(), outcome=outcome, error=error)
        )

    def stale_queued(self, older_than: datetime, limit: int, *, max_attempts: int) -> list[uuid.UUID]:
        """Queued submissions with attempts left whose job was sent before ``older_than`` (or never), oldest first."""
        stmt = (
            select(Submission.id)
            .where(
                Submission.status == SubmissionStatus.queued,
                Submission.attempts < max_attempts,
                or_(Submission.enqueued_at.is_(None), Submission.enqueued_at < older_than),
            )
            .order_by(Submission.created_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        return list(self.session.scalars(stmt))

    def exhausted_queued(self, max_attempts: int, limit: int) -> list[Submission]:
        """Queued submissions with no attempts left, which no claim would ever take."""
        stmt = (
            select(Submission)
            .where(Submission.status == SubmissionStatus.queued, Submission.attempts >= max_attempts)
            .order_by(Submission.created_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        return list(self.session.scalars(stmt))

    def expired_leases(self, now: datetime, limit: int) -> list[Submission]:
        """Processing submissions whose lease ran out (their worker died or stalled)."""
        stmt = (
            select(Submission)
            .where(Submission.status == SubmissionStatus.processing, Submission.lease_expires_at < now)
            .order_by(Submission.lease_expires_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        return list(self.session.scalars(stmt))

    def get_for_update(self, submission_id: uuid.UUID, tenant_id: uuid.UUID) -> Submission | None:
        """A tenant's submission, its verdict loaded, with its row locked until the transaction ends."""
        stmt = (
            select(Submission)
            .options(selectinload(Submission.verdict))
            .where(Submission.id == submission_id, Submission.tenant_id == tenant_id)
            .with_for_update(of=Submission)
            .execution_options(populate_existing=True)
        )
        return self.session.scalar(stmt)

    def erase(self, ids: Sequence[uuid.UUID], now: datetime) -> None:
        """Blank the content of submissions and their verdicts; decisions, scores and categories stay.

        Copies of these rows the session holds are updated too.
        """
        if not ids:
            return
        self.session.execute(
            update(Submission)
            .where(Submission.id.in_(ids))
            .values(caption="", metadata_={}, image_source_url=None, erased_at=now, updated_at=now)
        )
        self.session.execute(
            update(Verdict)
            .where(Verdict.submission_id.in_(ids))
            .values(description="", visible_text="", explanation="", reasons=[])
        )

    def expired_unerased(self, tenant_id: uuid.UUID, older_than: datetime, limit: int) -> list[uuid.UUID]:
        """A tenant's final submissions created before ``older_than``, not erased nor appealed, oldest first.

        Their rows are locked. A submission with an open appeal waits until a person has decided it.
        """
        under_review = (
            select(ReviewItem.id)
            .where(
                ReviewItem.submission_id == Submission.id,
                ReviewItem.state.in_(REVIEW_OPEN_STATES),
                ReviewItem.kind != ReviewKind.qa,  # a QA second review is withdrawn by the erasure
            )
            .exists()
        )
        stmt = (
            select(Submission.id)
            .where(
                Submission.tenant_id == tenant_id,
                Submission.erased_at.is_(None),
                Submission.created_at < older_than,
                Submission.status.in_(FINAL_STATUSES),
                ~under_review,
            )
            .order_by(Submission.created_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        return list(self.session.scalars(stmt))

    def unreleased_images(self, limit: int) -> list[tuple[uuid.UUID, str]]:
        """Erased submissions whose image is not released yet, and their image digests, oldest first."""
        stmt = (
            select(Submission.id, Submission.image_sha256)
            .where(Submission.erased_at.is_not(None), Submission.image_released_at.is_(None))
            .order_by(Submission.erased_at)
            .limit(limit)
        )
        return [(row.id, row.image_sha256) for row in self.session.execute(stmt)]

    def images_in_use(self, digests: Sequence[str]) -> set[str]:
        """Which of these image digests a submission that is not erased still refers to."""
        if not digests:
            return set()
        stmt = (
            select(Submission.image_sha256)
            .where(Submission.image_sha256.in_(digests), Submission.erased_at.is_(None))
            .distinct()
        )
        return set(self.session.scalars(stmt))

    def mark_images_released(self, ids: Sequence[uuid.UUID], now: datetime) -> None:
        """Record that these erased submissions no longer hold their image."""
        if ids:
            self.session.execute(
                update(Submission)
                .where(Submission.id.in_(ids))
                .values(image_released_at=now)
                .execution_options(synchronize_session=False)
            )

    def count_by_status(self) -> dict[str, int]:
        """Number of submissions in each status, across tenants."""
        rows = self.session.execute(select(Submission.status, func.count()).group_by(Submission.status))
        return {str(status): int(count) for status, count in rows}

    def count_verdicts_by_decision(self) -> dict[str, int]:
        """Number of verdicts per decision, across tenants."""
        rows = self.session.execute(select(Verdict.decision, func.count()).group_by(Verdict.decision))
        return {str(decision): int(count) for decision, count in rows}
