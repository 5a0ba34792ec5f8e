"""The audit log records every action and the database refuses to rewrite it."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest
from sqlalchemy import delete, select, text, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from moderation.audit import service as audit
from moderation.audit.models import AuditEntry
from moderation.audit.repository import AuditRepository
from moderation.errors import InvalidInput
from moderation.review.models import ReviewState


def test_record_keeps_who_what_when_before_and_after(session: Session) -> None:
    submission_id = uuid.uuid4()
    entry = audit.record(
        session,
        "ann@example.com",
        "review.decide",
        audit.subject("review_item", "42"),
        {"state": ReviewState.claimed},
        {"state": ReviewState.decided, "at": datetime(2026, 1, 1, tzinfo=UTC), "ids": {uuid.UUID(int=1)}},
        submission_id=submission_id,
    )
    session.expire_all()
    stored = session.get(AuditEntry, entry.id)
    assert stored is not None and stored.at is not None
    assert (stored.actor, stored.action, stored.subject_type, stored.subject_id) == (
        "ann@example.com",
        "review.decide",
        "review_item",
        "42",
    )
    assert stored.before == {"state": "claimed"}
    assert stored.after == {
        "state": "decided",
        "at": "2026-01-01T00:00:00+00:00",
        "ids": ["00000000-0000-0000-0000-000000000001"],
    }
    found = AuditRepository(session).search(submission_id=submission_id)
    assert [e.id for e in found] == [entry.id]
    with pytest.raises(InvalidInput):
        audit.record(session, "x", "y", "no-colon")


@pytest.mark.parametrize(
    "statement",
    [
        lambda: update(AuditEntry).values(actor="mallory"),
        lambda: delete(AuditEntry),
        lambda: text("TRUNCATE audit_log"),
    ],
    ids=["update", "delete", "truncate"],
)
def test_the_database_refuses_to_change_or_remove_entries(session: Session, statement) -> None:  # type: ignore[no-untyped-def]
    entry = audit.record(session, "ann@example.com", "login", audit.subject("reviewer", "ann@example.com"))
    with pytest.raises(DBAPIError, match="append-only"), session.begin_nested():
        session.execute(statement())
    assert session.scalar(select(AuditEntry.actor).where(AuditEntry.id == entry.id)) == "ann@example.com"


def test_the_log_reads_a_page_at_a_time_even_when_entries_share_a_moment(session: Session) -> None:
    # Entries of one transaction share their timestamp: pages must neither skip nor repeat any.
    made = [
        audit.record(session, "ann@example.com", f"test.step{i}", audit.subject("x", str(i)))
        for i in range(5)
    ]
    repo = AuditRepository(session)
    seen: list[uuid.UUID] = []
    older_than = None
    while page := repo.search(action="test.step", older_than=older_than, limit=2):
        seen += [e.id for e in page]
        older_than = page[-1].id
    assert sorted(seen) == sorted(e.id for e in made) and len(seen) == len(set(seen))
