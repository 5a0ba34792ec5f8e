"""Accepting submissions: the stored row, idempotent replays and the race between two equal requests."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from moderation.blobs import LocalBlobStore
from moderation.config import Settings
from moderation.db import new_id
from moderation.jobs import TASK_PROCESS_SUBMISSION
from moderation.submissions import service
from moderation.submissions.models import Submission, SubmissionStatus
from moderation.submissions.repository import SubmissionRepository
from moderation.tenants.models import Tenant
from moderation.tenants.service import create_tenant
from tests.conftest import RecordingDispatcher, insert_submissions, make_jpeg, plan_of


@pytest.fixture
def tenant(sessions: sessionmaker[Session], settings: Settings) -> Tenant:
    """A tenant, detached."""
    with sessions() as session, session.begin():
        tenant = create_tenant(session, "acme", settings).tenant
        session.expunge(tenant)
    return tenant


@pytest.fixture
def store(tmp_path: Path) -> LocalBlobStore:
    """A local blob store in the test's folder."""
    return LocalBlobStore(tmp_path / "blobs", fsync=False)


def _submit(
    sessions: sessionmaker[Session],
    tenant: Tenant,
    store: LocalBlobStore,
    settings: Settings,
    **kwargs: object,
) -> service.IntakeResult:
    with sessions() as session, session.begin():
        return service.submit(
            session, tenant, image=make_jpeg(64, 48), blob_store=store, settings=settings, **kwargs
        )


def test_the_answer_is_built_from_the_inserted_values_and_matches_the_row(
    sessions: sessionmaker[Session],
    tenant: Tenant,
    store: LocalBlobStore,
    settings: Settings,
    dispatched: RecordingDispatcher,
) -> None:
    result = _submit(sessions, tenant, store, settings, caption="a cat", metadata='{"lang": "en"}')
    assert result.created and dispatched.tasks(TASK_PROCESS_SUBMISSION) == [str(result.submission.id)]
    with sessions() as session:
        row = session.scalars(select(Submission).where(Submission.id == result.submission.id)).one()
        for column in Submission.__table__.columns:
            key = "metadata_" if column.key == "metadata" else column.key
            assert getattr(result.submission, key) == getattr(row, key), key
    assert row.status == SubmissionStatus.queued and row.metadata_ == {"lang": "en"}
    assert (row.image_format, row.image_width, row.image_height) == ("JPEG", 64, 48)
    assert store.exists(row.image_sha256)


def test_an_insert_skips_a_row_whose_key_exists(
    sessions: sessionmaker[Session],
    tenant: Tenant,
    store: LocalBlobStore,
    settings: Settings,
    dispatched: RecordingDispatcher,
) -> None:
    first = _submit(sessions, tenant, store, settings, caption="x", idempotency_key="k", external_id="e")
    with sessions() as session:
        row = session.scalars(select(Submission).where(Submission.id == first.submission.id)).one()
        values = {c.key: getattr(row, "metadata_" if c.key == "metadata" else c.key) for c in row.__table__.c}
        repo = SubmissionRepository(session)
        for changes in ({"external_id": "other"}, {"idempotency_key": "other"}):
            conflicting = {**values, **changes, "id": new_id()}
            assert repo.insert_many_if_new([conflicting]) == set()
        fresh = {**values, "id": new_id(), "idempotency_key": "k2", "external_id": "e2"}
        assert repo.insert_many_if_new([fresh]) == {fresh["id"]}
        session.rollback()


def test_a_request_that_loses_the_insert_race_answers_with_the_winner(
    sessions: sessionmaker[Session],
    tenant: Tenant,
    store: LocalBlobStore,
    settings: Settings,
    dispatched: RecordingDispatcher,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    winner = _submit(sessions, tenant, store, settings, caption="first", idempotency_key="same")
    # The loser checked for the key before the winner committed, so its own insert is the one that conflicts.
    real_find_many = SubmissionRepository.find_existing_many
    calls: list[int] = []

    def find_late(self: SubmissionRepository, *args: object, **kwargs: object) -> list[Submission]:
        calls.append(1)
        return [] if len(calls) == 1 else real_find_many(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(SubmissionRepository, "find_existing_many", find_late)
    loser = _submit(sessions, tenant, store, settings, caption="second", idempotency_key="same")
    assert not loser.created and loser.submission.id == winner.submission.id and len(calls) == 1
    assert dispatched.tasks(TASK_PROCESS_SUBMISSION) == [str(winner.submission.id)]
    with sessions() as session:
        assert len(session.scalars(select(Submission)).all()) == 1


def test_the_job_reaches_the_broker_only_after_commit_and_never_after_rollback(
    sessions: sessionmaker[Session],
    tenant: Tenant,
    store: LocalBlobStore,
    settings: Settings,
    dispatched: RecordingDispatcher,
) -> None:
    with sessions() as session:
        result = service.submit(
            session, tenant, image=make_jpeg(), caption="kept", blob_store=store, settings=settings
        )
        assert dispatched.jobs == []
        session.commit()
    assert dispatched.tasks(TASK_PROCESS_SUBMISSION) == [str(result.submission.id)]
    with pytest.raises(RuntimeError), sessions() as session, session.begin():
        service.submit(
            session, tenant, image=make_jpeg(), caption="dropped", blob_store=store, settings=settings
        )
        raise RuntimeError("the request failed after submit")
    assert len(dispatched.jobs) == 1
    with sessions() as session:
        assert [s.caption for s in session.scalars(select(Submission))] == ["kept"]


@pytest.mark.parametrize("status", [None, SubmissionStatus.queued])
@pytest.mark.parametrize("after_first_page", [False, True])
def test_a_tenant_s_listing_is_read_in_order_from_its_index(
    session: Session, tenant: Tenant, status: SubmissionStatus | None, after_first_page: bool
) -> None:
    # A known spread, analysed: a tenant with 1% of the rows, whatever other tests left behind. Walking the
    # primary key would pass ~100 rows of others for each of its own; sorting would read all of its rows.
    connection = session.connection()
    other = create_tenant(session, "other", Settings()).tenant
    session.flush()
    for owner, count in ((tenant.id, 30), (other.id, 3000)):
        insert_submissions(connection, owner, count)
    connection.exec_driver_sql("ANALYZE submissions")
    before_id = new_id() if after_first_page else None
    plan = plan_of(
        session,
        lambda: SubmissionRepository(session).page(tenant.id, status=status, limit=51, before_id=before_id),
    )
    assert "Index Scan Backward using ix_submissions_tenant_id_id" in plan and "Sort" not in plan, plan
