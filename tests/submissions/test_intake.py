"""Group-committed intake: batches share one lookup, one blob pass, one INSERT and one COMMIT."""

from __future__ import annotations

import asyncio
import hashlib
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import uvloop
from sqlalchemy import Connection, Engine, delete, event, select, text
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from moderation import jobs
from moderation.blobs import BlobStore, BlobStoreError, LocalBlobStore, SegmentBlobStore
from moderation.config import Settings
from moderation.errors import ServiceUnavailable
from moderation.jobs import TASK_PROCESS_SUBMISSION
from moderation.submissions import intake, service
from moderation.submissions.intake import AUTOCOMMIT, IntakeWriter, intake_sessionmaker
from moderation.submissions.models import Submission, SubmissionStatus
from moderation.submissions.service import IntakeResult, PreparedSubmission, store_batch
from moderation.tenants.models import Tenant
from moderation.tenants.service import create_tenant
from moderation.threads import native_name
from tests.conftest import RecordingDispatcher, make_jpeg


@pytest.fixture
def tenant(sessions: sessionmaker[Session], settings: Settings) -> Tenant:
    """A tenant, detached."""
    with sessions() as session, session.begin():
        tenant = create_tenant(session, "acme", settings).tenant
        session.expunge(tenant)
    return tenant


@pytest.fixture(params=["segments", "files"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> BlobStore:
    """A local blob store of each layout in the test's folder, syncing as in production."""
    if request.param == "files":
        return LocalBlobStore(tmp_path / "blobs", fsync=True)
    return SegmentBlobStore(tmp_path / "blobs", fsync=True)


@pytest.fixture
def statements(connection: Connection) -> Iterator[list[str]]:
    """The SQL statements the test's connection runs, first words only (savepoints included)."""
    seen: list[str] = []

    def record(conn: object, cursor: object, statement: str, *args: object) -> None:
        seen.append(" ".join(statement.split()[:2]).upper())

    event.listen(connection, "before_cursor_execute", record)
    yield seen
    event.remove(connection, "before_cursor_execute", record)


def prepare(tenant: Tenant, settings: Settings, seed: int, **kwargs: object) -> PreparedSubmission:
    return service.prepare_submission(
        tenant.id,
        image=make_jpeg(48, 32, seed=seed),
        caption=f"caption {seed}",
        settings=settings,
        **kwargs,  # type: ignore[arg-type]
    )


def writer_with_batch_sizes(
    sessions: sessionmaker[Session], store: BlobStore, max_batch: int
) -> tuple[IntakeWriter, list[int]]:
    """A writer (not started) and the list the sizes of the batches it writes are recorded in."""
    writer = IntakeWriter(sessions, store, max_batch=max_batch)
    sizes: list[int] = []
    real_write = writer.write
    writer.write = lambda batch: (sizes.append(len(batch)), real_write(batch))[1]  # type: ignore[method-assign]
    return writer, sizes


def wait_until(condition: Callable[[], bool], timeout: float) -> bool:
    """Poll ``condition`` until it holds or ``timeout`` seconds pass; whether it held."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def rows(sessions: sessionmaker[Session]) -> list[Submission]:
    with sessions() as session:
        return list(session.scalars(select(Submission).order_by(Submission.caption)))


def test_a_batch_is_one_insert_and_one_commit_and_each_job_follows_the_commit(
    sessions: sessionmaker[Session],
    tenant: Tenant,
    store: BlobStore,
    settings: Settings,
    dispatched: RecordingDispatcher,
    statements: list[str],
) -> None:
    batch = [prepare(tenant, settings, seed) for seed in range(5)]
    jobs_at_commit: list[int] = []
    with sessions() as session:
        event.listen(session, "before_commit", lambda _: jobs_at_commit.append(len(dispatched.jobs)))
        outcomes = store_batch(session, batch, store)
        session.commit()
        inserts = [s for s in statements if s.startswith("INSERT")]
        assert inserts == ["INSERT INTO"]
    assert jobs_at_commit == [0]
    assert all(isinstance(o, IntakeResult) and o.created for o in outcomes)
    stored = rows(sessions)
    assert [r.caption for r in stored] == [f"caption {seed}" for seed in range(5)]
    assert {r.id for r in stored} == {o.id for o in outcomes if isinstance(o, IntakeResult)}
    assert all(r.status == SubmissionStatus.queued and store.get(r.image_sha256) for r in stored)
    # One job names the whole batch, in the order it was accepted.
    (job,) = dispatched.jobs
    assert job.task == TASK_PROCESS_SUBMISSION and job.queue == "gpu"
    assert list(job.args) == [str(o.id) for o in outcomes if isinstance(o, IntakeResult)]


def test_repeats_in_a_batch_and_of_stored_submissions_are_replays(
    sessions: sessionmaker[Session],
    tenant: Tenant,
    store: BlobStore,
    settings: Settings,
    dispatched: RecordingDispatcher,
) -> None:
    with sessions() as session:
        (earlier,) = store_batch(session, [prepare(tenant, settings, 0, external_id="post-1")], store)
        session.commit()
    assert isinstance(earlier, IntakeResult)
    batch = [
        prepare(tenant, settings, 1, external_id="post-1"),  # repeats the stored one
        prepare(tenant, settings, 2, idempotency_key="k"),
        prepare(tenant, settings, 3, idempotency_key="k"),  # repeats the one before it, same batch
        prepare(tenant, settings, 4, external_id="post-2"),
    ]
    with sessions() as session:
        outcomes = store_batch(session, batch, store)
        session.commit()
    results = [o for o in outcomes if isinstance(o, IntakeResult)]
    assert len(results) == 4
    assert (results[0].created, results[0].id) == (False, earlier.id)
    assert results[1].created and (results[2].created, results[2].id) == (False, results[1].id)
    assert results[3].created
    assert [r.caption for r in rows(sessions)] == ["caption 0", "caption 2", "caption 4"]
    # One job per stored row, none for replays.
    assert sorted(dispatched.tasks(TASK_PROCESS_SUBMISSION)) == sorted(
        str(r.id) for r in (earlier, results[1], results[3])
    )
    # The image of a repeat of a stored submission is not written again.
    assert not store.exists(hashlib.sha256(batch[0].image).hexdigest())


def test_a_blob_that_cannot_be_written_fails_only_its_own_submission(
    sessions: sessionmaker[Session],
    tenant: Tenant,
    settings: Settings,
    tmp_path: Path,
    dispatched: RecordingDispatcher,
) -> None:
    store = LocalBlobStore(tmp_path / "blobs", fsync=False)
    batch = [prepare(tenant, settings, seed) for seed in range(3)]
    blocked = store.path_for(hashlib.sha256(batch[1].image).hexdigest()).parent
    blocked.parent.mkdir(parents=True)
    blocked.write_bytes(b"a file where a fan-out folder should be")
    with sessions() as session:
        outcomes = store_batch(session, batch, store)
        session.commit()
    assert isinstance(outcomes[1], BlobStoreError) and outcomes[1].status_code == 503
    assert isinstance(outcomes[0], IntakeResult) and isinstance(outcomes[2], IntakeResult)
    assert [r.caption for r in rows(sessions)] == ["caption 0", "caption 2"]
    assert len(dispatched.tasks(TASK_PROCESS_SUBMISSION)) == 2 and len(dispatched.jobs) == 1


def test_a_batch_that_fails_as_a_whole_is_written_one_by_one(
    sessions: sessionmaker[Session],
    tenant: Tenant,
    store: BlobStore,
    settings: Settings,
    dispatched: RecordingDispatcher,
) -> None:
    # A tenant deleted between the check and the write: its row breaks the batch's one INSERT.
    orphan = prepare(tenant, settings, 1)
    orphan = PreparedSubmission(**{**orphan.__dict__, "tenant_id": uuid.uuid4()})
    writer = IntakeWriter(sessions, store)
    outcomes = writer.write([prepare(tenant, settings, 0), orphan, prepare(tenant, settings, 2)])
    writer.send_jobs()
    assert isinstance(outcomes[1], IntegrityError)
    assert isinstance(outcomes[0], IntakeResult) and isinstance(outcomes[2], IntakeResult)
    assert [r.caption for r in rows(sessions)] == ["caption 0", "caption 2"]
    assert sorted(dispatched.tasks(TASK_PROCESS_SUBMISSION)) == sorted(
        str(o.id) for o in (outcomes[0], outcomes[2]) if isinstance(o, IntakeResult)
    )


def test_the_writer_batches_what_waits_and_answers_every_caller(
    sessions: sessionmaker[Session],
    tenant: Tenant,
    store: BlobStore,
    settings: Settings,
    dispatched: RecordingDispatcher,
) -> None:
    writer, sizes = writer_with_batch_sizes(sessions, store, max_batch=4)
    # Ten are stored before the writer thread starts: their rows wait together and go in batches of four.
    futures = [writer.submit(prepare(tenant, settings, seed)) for seed in range(10)]
    wait_until(lambda: writer.waiting == 10, timeout=30)
    assert writer.waiting == 10 and not any(future.done() for future in futures)
    writer.start()
    results = [future.result(timeout=30) for future in futures]
    assert sizes == [4, 4, 2]
    assert all(r.created for r in results) and len({r.id for r in results}) == 10
    # A lone submission is written at once, in a batch of its own.
    lone = writer.submit(prepare(tenant, settings, 10)).result(timeout=30)
    assert lone.created and sizes[-1] == 1
    writer.close()
    assert len(rows(sessions)) == 11
    # One job per transaction: batches of four, four and two, then the lone one.
    assert [len(job.args) for job in dispatched.jobs] == [4, 4, 2, 1]
    assert sorted(dispatched.tasks(TASK_PROCESS_SUBMISSION)) == sorted(str(r.id) for r in [*results, lone])


def test_closing_writes_what_was_accepted_then_refuses_more(
    sessions: sessionmaker[Session],
    tenant: Tenant,
    store: BlobStore,
    settings: Settings,
    dispatched: RecordingDispatcher,
) -> None:
    writer = IntakeWriter(sessions, store)
    queued = [writer.submit(prepare(tenant, settings, seed)) for seed in range(3)]
    gone = writer.submit(prepare(tenant, settings, 3))
    assert gone.cancel()  # its caller went away before the writer took it: never answered, never stored
    writer.start()
    writer.close()
    assert all(future.result(timeout=1).created for future in queued)
    with pytest.raises(ServiceUnavailable) as refused:
        writer.submit(prepare(tenant, settings, 4))
    assert (refused.value.status_code, refused.value.code) == (503, "shutting_down")
    assert [r.caption for r in rows(sessions)] == ["caption 0", "caption 1", "caption 2"]


def test_concurrent_callers_share_transactions(
    sessions: sessionmaker[Session],
    tenant: Tenant,
    store: BlobStore,
    settings: Settings,
    dispatched: RecordingDispatcher,
) -> None:
    writer, sizes = writer_with_batch_sizes(sessions, store, max_batch=64)
    writer.start()
    prepared = [prepare(tenant, settings, seed) for seed in range(40)]
    barrier = threading.Barrier(8)
    answers: list[IntakeResult] = []

    def caller(offset: int) -> None:
        barrier.wait()
        for item in prepared[offset::8]:
            answers.append(writer.submit(item).result(timeout=30))

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    writer.close()
    assert len(answers) == 40 and len({a.id for a in answers}) == 40
    assert sum(sizes) == 40 and max(sizes) > 1
    assert len(rows(sessions)) == 40


def test_the_writer_answers_an_image_it_cannot_store_with_the_store_error_and_writes_no_row(
    sessions: sessionmaker[Session],
    tenant: Tenant,
    settings: Settings,
    tmp_path: Path,
    dispatched: RecordingDispatcher,
) -> None:
    store = LocalBlobStore(tmp_path / "blobs", fsync=False)
    good, bad = prepare(tenant, settings, 0), prepare(tenant, settings, 1)
    blocked = store.path_for(hashlib.sha256(bad.image).hexdigest()).parent
    blocked.parent.mkdir(parents=True)
    blocked.write_bytes(b"a file where a fan-out folder should be")
    writer = IntakeWriter(sessions, store)
    writer.start()
    kept, failed = writer.submit(good), writer.submit(bad)
    assert kept.result(timeout=30).created
    error = failed.exception(timeout=30)
    assert isinstance(error, BlobStoreError) and (error.status_code, error.code) == (
        503,
        "blob_store_unavailable",
    )
    writer.close()
    assert [r.caption for r in rows(sessions)] == ["caption 0"] and len(dispatched.jobs) == 1


def test_every_column_of_a_batch_insert_is_stored_as_given(
    sessions: sessionmaker[Session],
    tenant: Tenant,
    settings: Settings,
    dispatched: RecordingDispatcher,
) -> None:
    from moderation.db import utcnow
    from moderation.submissions.repository import SubmissionRepository

    now = utcnow()
    batch = [
        prepare(tenant, settings, 0, metadata='{"lang": "zh", "标签": ["猫", 1.5, null, {"deep": true}]}'),
        prepare(tenant, settings, 1, external_id="ext-1", idempotency_key="idem-1"),
        service.prepare_submission(
            tenant.id,
            image=make_jpeg(30, 20, seed=2),
            caption="一只猫坐在垫子上 — a cat on a mat",
            settings=settings,
            source_url="https://images.example/cat.jpg",
        ),
        # What JSON text must escape, astral characters, and an integer beyond 64 bits.
        service.prepare_submission(
            tenant.id,
            image=make_jpeg(30, 20, seed=3),
            caption='quote " backslash \\ tab \t newline \n 🐱 \u2028 </script>',
            settings=settings,
            metadata={"id": 123456789012345678901234567890, "s": '"\\\u001f🐱', "n": -0.5},
        ),
    ]
    values = [item.row_values(hashlib.sha256(item.image).hexdigest(), now) for item in batch]
    with sessions() as session:
        repo = SubmissionRepository(session)
        assert repo.insert_many_if_new(values) == {v["id"] for v in values}
        # The same keys again (new ids): nothing is inserted.
        again = [{**values[1], "id": uuid.uuid4()}]
        assert repo.insert_many_if_new(again) == set()
        with pytest.raises(ValueError, match="share"):
            repo.insert_many_if_new([values[0], {**values[2], "attempts": 1}])
        session.commit()
    with sessions() as session:
        stored = {s.id: s for s in session.scalars(select(Submission))}
        for row in values:
            got = stored[row["id"]]
            for column in Submission.__table__.columns:
                if column.key in row:
                    key = "metadata_" if column.key == "metadata" else column.key
                    assert getattr(got, key) == row[column.key], column.key


def test_writing_a_batch_again_after_an_unknown_outcome_stores_nothing_twice(
    sessions: sessionmaker[Session],
    tenant: Tenant,
    store: BlobStore,
    settings: Settings,
    dispatched: RecordingDispatcher,
) -> None:
    batch = [prepare(tenant, settings, 0), prepare(tenant, settings, 1, idempotency_key="k")]
    with sessions() as session:
        first = store_batch(session, batch, store)
        session.commit()
    # The same submissions again, as after a failure whose commit may or may not have happened.
    with sessions() as session:
        again = store_batch(session, batch, store)
        session.commit()
    assert [r.caption for r in rows(sessions)] == ["caption 0", "caption 1"]
    for before, after in zip(first, again, strict=True):
        assert isinstance(before, IntakeResult) and isinstance(after, IntakeResult)
        assert (after.id, after.created, after.created_at) == (before.id, True, before.created_at)


def test_a_failure_after_the_commit_does_not_store_the_batch_twice(
    sessions: sessionmaker[Session],
    tenant: Tenant,
    store: BlobStore,
    settings: Settings,
    dispatched: RecordingDispatcher,
    monkeypatch: pytest.MonkeyPatch,
) -> None:

    with sessions() as session:
        (original,) = store_batch(session, [prepare(tenant, settings, 0, external_id="post-1")], store)
        session.commit()
    failures: list[int] = []

    def sessions_whose_first_commit_is_lost() -> Session:
        session = sessions()
        real_commit = session.commit

        def commit() -> None:
            real_commit()
            if not failures:
                failures.append(1)
                raise RuntimeError("connection lost after the commit")

        session.commit = commit  # type: ignore[method-assign]
        return session

    # The repeat slips past the look-up (as when another process commits it meanwhile) and conflicts.
    monkeypatch.setattr(service, "_match_existing", lambda prepared, existing: None)
    writer = IntakeWriter(sessions_whose_first_commit_is_lost, store)
    fresh, repeat = writer.write(
        [prepare(tenant, settings, 1), prepare(tenant, settings, 2, external_id="post-1")]
    )
    assert isinstance(fresh, IntakeResult) and fresh.created
    assert isinstance(repeat, IntakeResult) and not repeat.created and isinstance(original, IntakeResult)
    assert repeat.id == original.id
    # The batch was written again one by one after the failure: still one row each.
    assert failures == [1]
    assert [r.caption for r in rows(sessions)] == ["caption 0", "caption 1"]


def test_the_batch_statements_compile_whatever_module_is_imported_first() -> None:
    import subprocess
    import sys

    code = (
        "from moderation.submissions.repository import _INSERT_MANY_IF_NEW, _FINISH_FENCED_MANY\n"
        "from sqlalchemy.dialects import postgresql\n"
        "print(_INSERT_MANY_IF_NEW.compile(dialect=postgresql.dialect()))\n"
        "print(_FINISH_FENCED_MANY.compile(dialect=postgresql.dialect()))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert "new_rows(id UUID, tenant_id UUID," in out and "%(move_tokens)s::UUID[]" in out


class GatedStore(SegmentBlobStore):
    """A segment store whose first ``put_many`` waits for a gate, or fails when told to."""

    def __init__(self, root: Path, fail_first: bool = False) -> None:
        super().__init__(root, fsync=True)
        self.gate = threading.Event()
        self.fail_first = fail_first
        self.batches: list[int] = []

    def put_many(self, blobs: Sequence[bytes]) -> list[str | BlobStoreError]:
        self.batches.append(len(blobs))
        if len(self.batches) == 1:
            self.gate.wait(30)
            if self.fail_first:
                raise RuntimeError("the store broke in an unexpected way")
        return super().put_many(blobs)


def test_the_writer_stores_the_images_that_arrived_meanwhile_in_one_pass(
    sessions: sessionmaker[Session],
    tenant: Tenant,
    settings: Settings,
    tmp_path: Path,
    dispatched: RecordingDispatcher,
) -> None:
    store = GatedStore(tmp_path / "blobs")
    writer = IntakeWriter(sessions, store)
    writer.start()
    first = writer.submit(prepare(tenant, settings, 0))
    wait_until(lambda: bool(store.batches), timeout=30)
    rest = [writer.submit(prepare(tenant, settings, seed)) for seed in range(1, 10)]
    assert writer.busy_for > 0  # the writer is busy with the first
    store.gate.set()
    assert first.result(timeout=30).created and all(f.result(timeout=30).created for f in rest)
    assert store.batches == [1, 9]  # the nine that waited went to the store together: one data sync
    writer.close()
    assert len(rows(sessions)) == 10
    assert all(store.get(r.image_sha256) for r in rows(sessions))


def test_an_unexpected_store_failure_fails_its_batch_and_the_writer_goes_on(
    sessions: sessionmaker[Session],
    tenant: Tenant,
    settings: Settings,
    tmp_path: Path,
    dispatched: RecordingDispatcher,
) -> None:
    store = GatedStore(tmp_path / "blobs", fail_first=True)
    writer = IntakeWriter(sessions, store)
    writer.start()
    failed = writer.submit(prepare(tenant, settings, 0))
    store.gate.set()
    assert isinstance(failed.exception(timeout=30), RuntimeError)
    assert writer.running
    assert writer.submit(prepare(tenant, settings, 1)).result(timeout=30).created
    writer.close()
    assert [r.caption for r in rows(sessions)] == ["caption 1"] and len(dispatched.jobs) == 1


def test_the_writers_own_connection_autocommits_and_survives_being_cut(
    db_engine: Engine, settings: Settings, tmp_path: Path, dispatched: RecordingDispatcher
) -> None:
    # The writer's sessions as the API builds them, on a real connection: rows are committed, so this test
    # makes its own tenant and removes what it made.
    intake_sessions = intake_sessionmaker(settings)
    engine = intake_sessions.kw["bind"]
    with Session(db_engine) as session, session.begin():
        tenant = create_tenant(session, f"autocommit-{uuid.uuid4().hex[:8]}", settings).tenant
        session.expunge(tenant)
    writer = IntakeWriter(intake_sessions, SegmentBlobStore(tmp_path / "blobs"))
    writer.start()
    try:
        with engine.connect() as conn:
            assert conn.connection.driver_connection.autocommit is True
            assert not engine.pool._pre_ping

        def writers_backend() -> int:
            # The writer keeps its session (and connection) between batches; it is idle while this looks.
            assert writer._session is not None
            return int(writer._session.connection().connection.driver_connection.info.backend_pid)

        first = writer.submit(prepare(tenant, settings, 0, idempotency_key="k-0")).result(timeout=30)
        session_kept, backend = writer._session, writers_backend()
        kept = writer.submit(prepare(tenant, settings, 1)).result(timeout=30)
        assert writer._session is session_kept and writers_backend() == backend  # batch after batch
        # A replay in a later batch of the kept session is found (nothing stale from the first batch).
        again = writer.submit(prepare(tenant, settings, 0, idempotency_key="k-0")).result(timeout=30)
        assert again.id == first.id and not again.created
        with db_engine.connect() as conn:  # the server drops the writer's connection between batches
            assert conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": backend}).scalar_one()
        # The first statement of the next batch (the key's lookup) finds the connection dead: the batch is
        # written again on a new session and connection, and the dead one is not left checked out.
        second = writer.submit(prepare(tenant, settings, 2, idempotency_key="k-2")).result(timeout=30)
        assert writer._session is not session_kept and writers_backend() != backend
        assert engine.pool.checkedout() == 1
        assert first.created and kept.created and second.created
        with pytest.raises(RuntimeError, match="another thread"):
            _ = second.submission  # built in the writer's session, which stays in use on its thread
        # Committed: visible on another connection.
        with Session(db_engine) as session:
            stored = session.scalars(select(Submission).where(Submission.tenant_id == tenant.id)).all()
        assert sorted(s.id for s in stored) == sorted([first.id, kept.id, second.id])
        writer.close()
        assert [job.args for job in dispatched.jobs] == [(str(r.id),) for r in (first, kept, second)]
        assert engine.pool.checkedout() == 0  # closing the writer gave its connection back
    finally:
        writer.close()
        engine.dispose()
        with Session(db_engine) as session, session.begin():
            session.execute(delete(Submission).where(Submission.tenant_id == tenant.id))
            session.execute(delete(Tenant).where(Tenant.id == tenant.id))


def test_under_load_the_jobs_of_consecutive_batches_are_sent_together(
    sessions: sessionmaker[Session],
    tenant: Tenant,
    store: BlobStore,
    settings: Settings,
    dispatched: RecordingDispatcher,
) -> None:
    writer = IntakeWriter(sessions, store, job_interval=1.0)
    writer.start()
    first = writer.submit(prepare(tenant, settings, 0)).result(timeout=30)
    # Nothing was held: the job follows the answer at once.
    assert wait_until(lambda: len(dispatched.jobs) == 1, timeout=5)
    assert [job.args for job in dispatched.jobs] == [(str(first.id),)]
    held = [writer.submit(prepare(tenant, settings, seed)).result(timeout=30) for seed in (1, 2)]
    started = time.monotonic()
    assert len(dispatched.jobs) == 1  # committed and answered; their job waits for the interval
    wait_until(lambda: len(dispatched.jobs) >= 2, timeout=10)
    assert [job.args for job in dispatched.jobs][1] == tuple(str(r.id) for r in held)
    assert time.monotonic() - started < 5  # sent by the idle writer once the interval passed
    last = writer.submit(prepare(tenant, settings, 3)).result(timeout=30)
    writer.close()  # a job still held is sent on the way out
    assert dispatched.jobs[-1].args == (str(last.id),)
    assert sorted(dispatched.tasks(TASK_PROCESS_SUBMISSION)) == sorted(
        str(r.id) for r in [first, *held, last]
    )


class GatedDispatcher(RecordingDispatcher):
    """Records jobs, each only once ``gate`` is set: a broker that is slow to take them."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.entered = threading.Event()

    def dispatch(self, job: jobs.Job) -> None:
        """Wait for the gate, then record the job."""
        self.entered.set()
        self.gate.wait(30)
        super().dispatch(job)


def test_callers_are_answered_before_their_job_is_published(
    sessions: sessionmaker[Session], tenant: Tenant, store: BlobStore, settings: Settings
) -> None:
    broker = GatedDispatcher()
    previous = jobs.get_dispatcher()
    jobs.set_dispatcher(broker)
    writer = IntakeWriter(sessions, store)
    try:
        writer.start()
        # The broker takes nothing until the gate opens: the answer must not wait for it.
        answered = writer.submit(prepare(tenant, settings, 0)).result(timeout=5)
        assert answered.created
        assert broker.entered.wait(30)  # the publish follows the answer
        broker.gate.set()
    finally:
        broker.gate.set()
        writer.close()
        jobs.set_dispatcher(previous)
    assert [job.args for job in broker.jobs] == [(str(answered.id),)]


def test_held_jobs_are_split_at_the_gpu_batch_size(
    sessions: sessionmaker[Session],
    tenant: Tenant,
    store: BlobStore,
    settings: Settings,
    dispatched: RecordingDispatcher,
) -> None:
    writer = IntakeWriter(sessions, store, job_interval=60, job_max_submissions=2)
    futures = [writer.submit(prepare(tenant, settings, seed)) for seed in range(5)]
    wait_until(lambda: writer.waiting == 5, timeout=30)
    writer.start()
    results = [future.result(timeout=30) for future in futures]
    writer.close()
    assert [len(job.args) for job in dispatched.jobs] == [2, 2, 1]
    assert [arg for job in dispatched.jobs for arg in job.args] == [str(r.id) for r in results]


def test_a_database_that_cannot_be_reached_fails_the_batch_without_a_row_by_row_retry(
    tenant: Tenant, settings: Settings, tmp_path: Path, dispatched: RecordingDispatcher
) -> None:
    from moderation.db import make_engine

    # Nothing listens on port 9: every connection attempt fails at once.
    unreachable = sessionmaker(bind=make_engine("postgresql+psycopg://postgres@127.0.0.1:9/none"))
    opened: list[Session] = []

    def sessions() -> Session:
        opened.append(unreachable())
        return opened[-1]

    writer = IntakeWriter(sessions, SegmentBlobStore(tmp_path / "blobs"))
    outcomes = writer.write([prepare(tenant, settings, seed) for seed in range(3)])
    assert all(isinstance(o, OperationalError) for o in outcomes)
    assert len(opened) == 1 and dispatched.jobs == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="thread names via /proc")
def test_the_writer_thread_is_named_for_the_operating_system(
    sessions: sessionmaker[Session], store: BlobStore
) -> None:
    writer = IntakeWriter(sessions, store)
    writer.start()
    try:
        assert wait_until(lambda: native_name(writer._thread.native_id or 0) == "intake-writer", 5)
    finally:
        writer.close()


# uvloop serves the API; asyncio's own loop serves tests and anyone who runs it without uvloop.
LOOPS = {"asyncio": asyncio.run, "uvloop": uvloop.run}


@pytest.mark.parametrize("run", LOOPS.values(), ids=list(LOOPS))
def test_answers_reach_the_event_loop_of_their_callers_together(
    run: Callable[[Any], Any],
    sessions: sessionmaker[Session],
    tenant: Tenant,
    store: BlobStore,
    settings: Settings,
    dispatched: RecordingDispatcher,
) -> None:
    writer, sizes = writer_with_batch_sizes(sessions, store, max_batch=64)
    handed_over: list[int] = []

    async def main() -> list[IntakeResult]:
        loop = asyncio.get_running_loop()
        real = loop.call_soon_threadsafe

        def counting(callback, *args, **kwargs):  # type: ignore[no-untyped-def]
            handed_over.append(len(args[0]) if args else 0)
            return real(callback, *args, **kwargs)

        loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
        futures = [writer.submit_from_loop(prepare(tenant, settings, seed), 30) for seed in range(6)]
        writer.start()  # the six wait together: one batch, one hand-over of its six answers
        return list(await asyncio.gather(*futures))

    results = run(main())
    writer.close()
    assert all(r.created for r in results) and len({r.id for r in results}) == 6
    assert sizes == [6] and handed_over == [6]
    assert len(rows(sessions)) == 6


@pytest.mark.parametrize("run", LOOPS.values(), ids=list(LOOPS))
def test_a_wait_on_the_loop_times_out_and_what_was_not_taken_is_not_stored(
    run: Callable[[Any], Any],
    sessions: sessionmaker[Session],
    tenant: Tenant,
    store: BlobStore,
    settings: Settings,
    dispatched: RecordingDispatcher,
) -> None:
    writer = IntakeWriter(sessions, store)

    async def main() -> tuple[float, bool, bool]:
        # Waits of different lengths, the longer set first: each fails at its own deadline.
        slow = writer.submit_from_loop(prepare(tenant, settings, 0), 5)
        started = time.monotonic()
        quick = writer.submit_from_loop(prepare(tenant, settings, 1), 0.2)
        with pytest.raises(ServiceUnavailable) as timed_out:
            await quick
        assert timed_out.value.code == "intake_timeout" and timed_out.value.status_code == 503
        quick_after = time.monotonic() - started
        gone = writer.submit_from_loop(prepare(tenant, settings, 2), 5)
        gone.cancel()  # its caller went away
        # Waits that are due at once (uvloop arms such a timer differently), then one more behind them.
        due = [writer.submit_from_loop(prepare(tenant, settings, seed), 0) for seed in (3, 4)]
        for future in due:
            with pytest.raises(ServiceUnavailable):
                await future
        writer.start()  # only now: the timed-out and the cancelled submissions are skipped
        last = writer.submit_from_loop(prepare(tenant, settings, 5), 5)
        return quick_after, (await slow).created and (await last).created, gone.cancelled()

    quick_after, stored, gone_cancelled = run(main())
    writer.close()
    assert 0.15 < quick_after < 2 and stored and gone_cancelled
    assert [r.caption for r in rows(sessions)] == ["caption 0", "caption 5"]


def test_answered_waits_leave_nothing_behind_until_their_deadline(
    sessions: sessionmaker[Session],
    tenant: Tenant,
    store: BlobStore,
    settings: Settings,
    dispatched: RecordingDispatcher,
) -> None:
    writer = IntakeWriter(sessions, store)
    writer.start()

    async def main() -> int:
        for seed in range(20):
            assert (await writer.submit_from_loop(prepare(tenant, settings, seed), 30)).created
        # Twenty answered waits, deadlines 30 s away: the next wait drops them (and what they hold).
        pending = writer.submit_from_loop(prepare(tenant, settings, 20), 30)
        assert writer._loop_answers is not None
        held = len(writer._loop_answers._deadlines)
        await pending
        return held

    held = uvloop.run(main())
    writer.close()
    assert held == 1 and len(rows(sessions)) == 21


def test_a_kept_session_is_renewed_as_a_pool_recycles_its_connections(
    connection: Connection,
    tenant: Tenant,
    store: BlobStore,
    settings: Settings,
    dispatched: RecordingDispatcher,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Sessions marked as autocommitting (on the test's connection, whose transaction is rolled back).
    marked = sessionmaker(bind=connection, join_transaction_mode="create_savepoint", info={AUTOCOMMIT: True})
    writer = IntakeWriter(marked, store)
    writer.write([prepare(tenant, settings, 0)])
    kept = writer._session
    writer.write([prepare(tenant, settings, 1)])
    assert kept is not None and writer._session is kept
    monkeypatch.setattr(intake, "KEEP_SESSION_SECONDS", 0.0)
    writer.write([prepare(tenant, settings, 2)])
    assert writer._session is not None and writer._session is not kept
    writer.close()  # never started: closing still gives the kept session back
    assert writer._session is None
