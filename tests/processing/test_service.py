"""Batch processing and sweeping, with a scripted engine (unit tests of the code around the engine)."""

from __future__ import annotations

import io
import struct
import uuid
import zlib
from datetime import timedelta
from pathlib import Path

import pytest
from PIL import Image
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from moderation.blobs import BlobStoreError, LocalBlobStore
from moderation.config import Settings
from moderation.db import utcnow
from moderation.engine.base import (
    BatchPartlyFailed,
    EngineHealth,
    EngineRequest,
    EngineResult,
    ModelInfo,
    ModerationEngine,
)
from moderation.jobs import TASK_DELIVER_WEBHOOK, TASK_PROCESS_SUBMISSION
from moderation.processing.service import (
    DECODE_BUDGET_FACTOR,
    BatchProcessor,
    EngineUnhealthy,
    review_priority,
    sweep,
)
from moderation.review.models import ReviewItem
from moderation.submissions.models import ProcessingAttempt, Submission, SubmissionStatus, Verdict
from moderation.submissions.repository import SubmissionRepository
from moderation.submissions.schemas import SubmissionOut
from moderation.tenants.models import Tenant
from moderation.webhooks.models import WebhookDelivery
from tests.conftest import RecordingDispatcher, jpeg_header, make_jpeg
from tests.processing.conftest import submit_one


class ScriptedEngine(ModerationEngine):
    """Answers each caption with the conflict score written in it (``conflict=0.9``); can be told to fail."""

    def __init__(self) -> None:
        self.batches: list[int] = []
        self.fail_with: Exception | None = None
        self.broken = False

    @property
    def info(self) -> ModelInfo:
        return ModelInfo(name="scripted", revision="1", prompt_version="test")

    def moderate(self, requests: list[EngineRequest]) -> list[EngineResult]:
        self.batches.append(len(requests))
        if self.fail_with:
            raise self.fail_with
        results = []
        for r in requests:
            score = float(r.caption.split("conflict=")[1].split()[0]) if "conflict=" in r.caption else 0.5
            results.append(
                EngineResult(
                    description="a test image",
                    visible_text="",
                    explanation="scripted",
                    conflict_score=score,
                    confidence=0.9,
                    category_scores={c.name: 0.0 for c in r.categories},
                )
            )
        return results

    def health(self) -> EngineHealth:
        if self.broken:
            return EngineHealth(ok=False, detail="CUDA error: an illegal memory access", device="cuda")
        return EngineHealth(ok=True, detail="ok", device="cpu")


class TakenOverWhileJudging(ScriptedEngine):
    """While it judges, the lease on one submission expires and another worker takes that submission."""

    def __init__(self, sessions: sessionmaker[Session], taken: uuid.UUID) -> None:
        super().__init__()
        self.sessions = sessions
        self.taken = taken

    def moderate(self, requests: list[EngineRequest]) -> list[EngineResult]:
        with self.sessions() as session, session.begin():
            session.execute(
                update(Submission).where(Submission.id == self.taken).values(lease_token=uuid.uuid4())
            )
        return super().moderate(requests)


def test_batch_decides_routes_and_notifies(
    sessions: sessionmaker[Session],
    tenant: Tenant,
    store: LocalBlobStore,
    settings: Settings,
    dispatched: RecordingDispatcher,
) -> None:
    settings.batch_max_size = 8
    ids = [submit_one(sessions, tenant, store, settings, f"post conflict={s}") for s in (0.95, 0.1, 0.5)]
    engine = ScriptedEngine()
    report = BatchProcessor(sessions, engine, store, settings).run(ids[1])
    assert engine.batches == [3]
    assert report.claimed[0] == ids[1] and sorted(report.decided) == sorted(ids)
    with sessions() as session:
        rows = {s.id: s for s in session.scalars(select(Submission).where(Submission.id.in_(ids)))}
        assert [str(rows[i].status) for i in ids] == ["decided", "decided", "in_review"]
        assert [str(rows[i].final_decision) for i in ids] == ["block", "allow", "None"]
        verdicts = {v.submission_id: v for v in session.scalars(select(Verdict))}
        assert verdicts[ids[0]].decision == "block" and verdicts[ids[2]].decision == "review"
        assert verdicts[ids[0]].model_name == "scripted"
        assert {c["name"] for c in verdicts[ids[0]].categories} >= {"sexual", "violence", "prompt_injection"}
        review = session.scalars(select(ReviewItem)).one()
        assert review.submission_id == ids[2] and review.state == "pending"
        attempts = session.scalars(select(ProcessingAttempt)).all()
        assert {a.outcome for a in attempts} == {"decided"} and len(attempts) == 3
        deliveries = session.scalars(select(WebhookDelivery)).all()
        assert len(deliveries) == 3 and {d.event_type for d in deliveries} == {"submission.decided"}
        payload = next(d.payload for d in deliveries if d.submission_id == ids[0])
        assert payload["type"] == "submission.decided"
        assert payload["data"]["verdict"]["decision"] == "block"
    assert sorted(dispatched.tasks(TASK_DELIVER_WEBHOOK)) == sorted(str(d.id) for d in deliveries)
    # A second job for an already decided submission is a no-op.
    assert BatchProcessor(sessions, engine, store, settings).run(ids[0]).claimed == []
    assert engine.batches == [3]


def test_batch_respects_max_size(
    sessions: sessionmaker[Session],
    tenant: Tenant,
    store: LocalBlobStore,
    settings: Settings,
    dispatched: RecordingDispatcher,
) -> None:
    settings.batch_max_size = 2
    ids = [submit_one(sessions, tenant, store, settings, f"c{i}") for i in range(5)]
    engine = ScriptedEngine()
    processor = BatchProcessor(sessions, engine, store, settings)
    for sid in ids:
        processor.run(sid)
    assert engine.batches == [2, 2, 1]


def test_engine_error_requeues_then_fails_after_max_attempts(
    sessions: sessionmaker[Session],
    tenant: Tenant,
    store: LocalBlobStore,
    settings: Settings,
    dispatched: RecordingDispatcher,
) -> None:
    settings.max_attempts = 2
    sid = submit_one(sessions, tenant, store, settings, "boom")
    engine = ScriptedEngine()
    engine.fail_with = RuntimeError("CUDA out of memory")
    processor = BatchProcessor(sessions, engine, store, settings)
    assert processor.run(sid).requeued == [sid]
    assert dispatched.tasks(TASK_PROCESS_SUBMISSION).count(str(sid)) == 2
    assert processor.run(sid).failed == [sid]
    with sessions() as session:
        sub = session.get(Submission, sid)
        assert sub is not None and sub.status == SubmissionStatus.failed
        assert "CUDA out of memory" in (sub.last_error or "")
        events = [d.event_type for d in session.scalars(select(WebhookDelivery))]
        assert events == ["submission.failed"]


def test_a_failure_that_breaks_the_engine_stops_the_worker_after_recording_it(
    sessions: sessionmaker[Session],
    tenant: Tenant,
    store: LocalBlobStore,
    settings: Settings,
    dispatched: RecordingDispatcher,
) -> None:
    sid = submit_one(sessions, tenant, store, settings, "boom")
    engine = ScriptedEngine()
    engine.fail_with = RuntimeError("CUDA error: an illegal memory access was encountered")
    engine.broken = True
    with pytest.raises(EngineUnhealthy, match="illegal memory access"):
        BatchProcessor(sessions, engine, store, settings).run(sid)
    # The attempt is recorded and the submission re-enqueued for a healthy worker.
    assert dispatched.tasks(TASK_PROCESS_SUBMISSION).count(str(sid)) == 2
    with sessions() as session:
        sub = session.get(Submission, sid)
        assert sub is not None and sub.status == SubmissionStatus.queued and sub.attempts == 1


def test_lost_lease_discards_the_late_verdict(
    sessions: sessionmaker[Session],
    tenant: Tenant,
    store: LocalBlobStore,
    settings: Settings,
    dispatched: RecordingDispatcher,
) -> None:
    sid = submit_one(sessions, tenant, store, settings, "slow one conflict=0.1")

    report = BatchProcessor(sessions, TakenOverWhileJudging(sessions, sid), store, settings).run(sid)
    assert report.lease_lost == [sid] and report.decided == []
    with sessions() as session:
        assert session.scalars(select(Verdict)).all() == []


def test_unreadable_blob_fails_only_that_submission(
    sessions: sessionmaker[Session],
    tenant: Tenant,
    store: LocalBlobStore,
    settings: Settings,
    dispatched: RecordingDispatcher,
) -> None:
    good = submit_one(sessions, tenant, store, settings, "good conflict=0.1")
    bad = submit_one(sessions, tenant, store, settings, "bad")
    with sessions() as session, session.begin():
        session.execute(update(Submission).where(Submission.id == bad).values(image_sha256="0" * 64))
    report = BatchProcessor(sessions, ScriptedEngine(), store, settings).run(good)
    assert report.decided == [good] and report.failed == [bad]


def test_sweeper_recovers_lost_jobs_and_expired_leases(
    sessions: sessionmaker[Session],
    tenant: Tenant,
    store: LocalBlobStore,
    settings: Settings,
    dispatched: RecordingDispatcher,
) -> None:
    settings.max_attempts = 2
    lost = submit_one(sessions, tenant, store, settings, "job lost with redis")
    stalled = submit_one(sessions, tenant, store, settings, "worker died")
    doomed = submit_one(sessions, tenant, store, settings, "keeps killing workers")
    long_ago = utcnow() - timedelta(hours=1)
    with sessions() as session, session.begin():
        session.execute(update(Submission).where(Submission.id == lost).values(enqueued_at=long_ago))
        for sid, attempts in ((stalled, 1), (doomed, 2)):
            session.execute(
                update(Submission)
                .where(Submission.id == sid)
                .values(
                    status=SubmissionStatus.processing,
                    attempts=attempts,
                    lease_token=uuid.uuid4(),
                    lease_expires_at=long_ago,
                )
            )
    dispatched.jobs.clear()
    report = sweep(sessions, settings)
    assert report.requeued == [lost]
    assert report.expired == [stalled]
    assert report.failed == [doomed]
    assert sorted(dispatched.tasks(TASK_PROCESS_SUBMISSION)) == sorted([str(lost), str(stalled)])
    with sessions() as session:
        assert session.get(Submission, stalled).status == SubmissionStatus.queued  # type: ignore[union-attr]
        assert session.get(Submission, doomed).status == SubmissionStatus.failed  # type: ignore[union-attr]
    # Nothing left to recover right after a sweep.
    dispatched.jobs.clear()
    again = sweep(sessions, settings)
    assert (again.requeued, again.expired, again.failed) == ([], [], [])


def test_the_sweeper_fails_a_queued_submission_left_without_attempts(
    sessions: sessionmaker[Session],
    tenant: Tenant,
    store: LocalBlobStore,
    settings: Settings,
    dispatched: RecordingDispatcher,
) -> None:
    # Requeued after its second attempt, then MAX_ATTEMPTS was lowered to 2: no claim will ever take it.
    sid = submit_one(sessions, tenant, store, settings, "requeued, then the limit was lowered")
    with sessions() as session, session.begin():
        session.execute(
            update(Submission)
            .where(Submission.id == sid)
            .values(attempts=2, last_error="engine error: boom", enqueued_at=utcnow() - timedelta(hours=1))
        )
    settings.max_attempts = 2
    dispatched.jobs.clear()
    report = sweep(sessions, settings)
    assert report.failed == [sid] and report.requeued == []
    assert dispatched.tasks(TASK_PROCESS_SUBMISSION) == []
    with sessions() as session:
        submission = session.get(Submission, sid)
        assert submission is not None and submission.status == SubmissionStatus.failed
        assert submission.last_error == "engine error: boom"
        events = [d.event_type for d in session.scalars(select(WebhookDelivery))]
        assert events == ["submission.failed"]


def test_retried_submission_is_judged_alone(
    sessions: sessionmaker[Session],
    tenant: Tenant,
    store: LocalBlobStore,
    settings: Settings,
    dispatched: RecordingDispatcher,
) -> None:
    suspect = submit_one(sessions, tenant, store, settings, "maybe a poison pill")
    for i in range(3):
        submit_one(sessions, tenant, store, settings, f"innocent {i}")
    with sessions() as session, session.begin():
        session.execute(update(Submission).where(Submission.id == suspect).values(attempts=1))
    engine = ScriptedEngine()
    BatchProcessor(sessions, engine, store, settings).run(suspect)
    assert engine.batches == [1]


class PoisonEngine(ScriptedEngine):
    """Fails every batch that holds a caption with "poison" in it, as a request that crashes the model would."""

    def __init__(self) -> None:
        super().__init__()
        self.poisoned: list[int] = []  # sizes of the batches it failed

    def moderate(self, requests: list[EngineRequest]) -> list[EngineResult]:
        if any("poison" in r.caption for r in requests):
            self.poisoned.append(len(requests))
            raise RuntimeError("device-side assert triggered")
        return super().moderate(requests)


def _run_queued_jobs(processor: BatchProcessor, dispatched: RecordingDispatcher) -> None:
    """Run every queued GPU job, and the jobs those runs queue, until none is left."""
    while dispatched.jobs:
        job = dispatched.jobs.pop(0)
        if job.task == TASK_PROCESS_SUBMISSION:
            for sid in job.args:
                processor.run(uuid.UUID(sid))


def test_a_poison_submission_fails_alone_and_its_batch_companions_are_decided(
    sessions: sessionmaker[Session],
    tenant: Tenant,
    store: LocalBlobStore,
    settings: Settings,
    dispatched: RecordingDispatcher,
) -> None:
    poison = submit_one(sessions, tenant, store, settings, "poison pill")
    innocents = [
        submit_one(sessions, tenant, store, settings, f"innocent {i} conflict=0.1") for i in range(3)
    ]
    engine = PoisonEngine()
    processor = BatchProcessor(sessions, engine, store, settings)
    dispatched.jobs.clear()
    assert sorted(processor.run(poison).requeued) == sorted([poison, *innocents])
    # Fresh work arrives before the retries' jobs run: its batch must not take the retried ones along.
    fresh = [submit_one(sessions, tenant, store, settings, f"fresh {i} conflict=0.1") for i in range(2)]
    report = processor.run(fresh[0])
    assert sorted(report.claimed) == sorted(fresh) and report.decided == report.claimed
    _run_queued_jobs(processor, dispatched)
    with sessions() as session:
        statuses = {s.id: s for s in session.scalars(select(Submission))}
    assert statuses[poison].status == SubmissionStatus.failed
    assert statuses[poison].attempts == settings.max_attempts
    assert "device-side assert triggered" in (statuses[poison].last_error or "")
    assert all(statuses[sid].status == SubmissionStatus.decided for sid in [*innocents, *fresh])
    # After the first failed batch, the poison was only ever judged alone.
    assert engine.poisoned == [4] + [1] * (settings.max_attempts - 1)


class OneNeverFits(ScriptedEngine):
    """Judges every submission but the one whose caption says "huge", which it reports as failed."""

    def moderate(self, requests: list[EngineRequest]) -> list[EngineResult]:
        results = super().moderate(requests)
        if not any("huge" in r.caption for r in requests):
            return results
        kept: list[EngineResult | None] = [
            None if "huge" in r.caption else result for r, result in zip(requests, results, strict=True)
        ]
        raise BatchPartlyFailed(kept, "GPU out of memory judging this submission alone")


def test_a_submission_the_engine_cannot_judge_fails_alone_and_its_companions_are_decided(
    sessions: sessionmaker[Session],
    tenant: Tenant,
    store: LocalBlobStore,
    settings: Settings,
    dispatched: RecordingDispatcher,
) -> None:
    small = submit_one(sessions, tenant, store, settings, "small conflict=0.1")
    huge = submit_one(sessions, tenant, store, settings, "huge conflict=0.1")
    report = BatchProcessor(sessions, OneNeverFits(), store, settings).run(small)
    assert report.decided == [small] and report.requeued == [huge]
    with sessions() as session:
        requeued = session.get(Submission, huge)
        assert requeued is not None and requeued.status == SubmissionStatus.queued
        assert "out of memory" in (requeued.last_error or "")


class FlakyStore(LocalBlobStore):
    """The test's local store, unreachable for reads while ``down`` (as S3 is in an outage)."""

    down = False

    def get(self, sha256: str) -> bytes:
        if self.down:
            raise BlobStoreError("S3 is unreachable: connection timed out")
        return super().get(sha256)


def test_an_unreachable_blob_store_retries_the_submission_instead_of_failing_it(
    sessions: sessionmaker[Session],
    tenant: Tenant,
    tmp_path: Path,
    settings: Settings,
    dispatched: RecordingDispatcher,
) -> None:
    store = FlakyStore(tmp_path / "flaky", fsync=False)
    sid = submit_one(sessions, tenant, store, settings, "an outage conflict=0.1")
    store.down = True
    processor = BatchProcessor(sessions, ScriptedEngine(), store, settings)
    report = processor.run(sid)
    assert report.requeued == [sid] and report.failed == []
    with sessions() as session:
        submission = session.get(Submission, sid)
        assert submission is not None and submission.status == SubmissionStatus.queued
        assert "S3 is unreachable" in (submission.last_error or "")
    store.down = False
    assert processor.run(sid).decided == [sid]


class RefusedVerdictEngine(ScriptedEngine):
    """Answers once with a description Postgres refuses to store (a NUL character), then normally."""

    def moderate(self, requests: list[EngineRequest]) -> list[EngineResult]:
        results = super().moderate(requests)
        if len(self.batches) == 1:
            results[0] = EngineResult(
                description="a\x00b",
                visible_text="",
                explanation="scripted",
                conflict_score=0.1,
                confidence=0.9,
                category_scores=results[0].category_scores,
            )
        return results


def test_a_batch_whose_verdicts_cannot_be_written_is_released_with_the_error_recorded(
    sessions: sessionmaker[Session],
    tenant: Tenant,
    store: LocalBlobStore,
    settings: Settings,
    dispatched: RecordingDispatcher,
) -> None:
    first = submit_one(sessions, tenant, store, settings, "first conflict=0.1")
    second = submit_one(sessions, tenant, store, settings, "second conflict=0.1")
    processor = BatchProcessor(sessions, RefusedVerdictEngine(), store, settings)
    dispatched.jobs.clear()
    report = processor.run(first)
    # Not left under a lease that runs out minutes later: requeued at once, each with its own job.
    assert sorted(report.requeued) == sorted([first, second]) and report.decided == []
    with sessions() as session:
        for sid in (first, second):
            submission = session.get(Submission, sid)
            assert submission is not None and submission.status == SubmissionStatus.queued
            assert submission.lease_token is None
            assert "processing error: DataError" in (submission.last_error or "")
        attempts = list(session.scalars(select(ProcessingAttempt)))
        assert {a.outcome for a in attempts} == {"error"}
        assert all("DataError" in (a.error or "") for a in attempts)
        assert session.scalar(select(Verdict).limit(1)) is None
    _run_queued_jobs(processor, dispatched)
    with sessions() as session:
        assert {s.status for s in session.scalars(select(Submission))} == {SubmissionStatus.decided}


def test_taking_over_an_expired_lease_records_how_the_earlier_attempt_ended(
    sessions: sessionmaker[Session],
    tenant: Tenant,
    store: LocalBlobStore,
    settings: Settings,
    dispatched: RecordingDispatcher,
) -> None:
    sid = submit_one(sessions, tenant, store, settings, "its worker died conflict=0.1")
    dead_token = uuid.uuid4()
    long_ago = utcnow() - timedelta(hours=1)
    with sessions() as session, session.begin():
        session.execute(
            update(Submission)
            .where(Submission.id == sid)
            .values(
                status=SubmissionStatus.processing,
                attempts=1,
                lease_token=dead_token,
                lease_expires_at=long_ago,
            )
        )
        session.add(
            ProcessingAttempt(
                submission_id=sid,
                attempt=1,
                lease_token=dead_token,
                worker="gone",
                batch_size=1,
                started_at=long_ago,
            )
        )
    assert BatchProcessor(sessions, ScriptedEngine(), store, settings).run(sid).decided == [sid]
    with sessions() as session:
        attempts = {a.lease_token: a for a in session.scalars(select(ProcessingAttempt))}
    earlier = attempts.pop(dead_token)
    assert (earlier.outcome, earlier.error) == ("lease_expired", "processing lease expired")
    assert earlier.finished_at is not None
    assert [a.outcome for a in attempts.values()] == ["decided"]


def test_a_huge_image_is_held_scaled_down_while_its_batch_runs(
    sessions: sessionmaker[Session],
    tenant: Tenant,
    store: LocalBlobStore,
    settings: Settings,
    dispatched: RecordingDispatcher,
) -> None:
    flat = io.BytesIO()
    Image.new("RGB", (6000, 4000), (200, 30, 30)).save(flat, "PNG")  # ~70 KB on disk, 72 MB decoded
    sid = submit_one(sessions, tenant, store, settings, "a red wall conflict=0.1", image=flat.getvalue())
    seen: list[tuple[int, int]] = []

    class Recording(ScriptedEngine):
        def moderate(self, requests: list[EngineRequest]) -> list[EngineResult]:
            seen.extend(r.image.size for r in requests)
            return super().moderate(requests)

    assert BatchProcessor(sessions, Recording(), store, settings).run(sid).decided == [sid]
    ((width, height),) = seen
    assert width * height <= DECODE_BUDGET_FACTOR * settings.image_max_pixels
    assert abs(width / height - 1.5) < 0.01  # the aspect ratio is kept


def test_review_priority_puts_risky_items_first() -> None:
    assert review_priority(0.9, {"violence": 0.1}) < review_priority(0.4, {"violence": 0.1})
    assert review_priority(0.1, {"weapons": 0.95}) < review_priority(0.5, {})


def test_image_that_passes_intake_but_cannot_be_decoded_fails_with_a_code(
    sessions: sessionmaker[Session],
    tenant: Tenant,
    store: LocalBlobStore,
    settings: Settings,
    dispatched: RecordingDispatcher,
) -> None:
    # Intake only checks structure: a PNG with valid chunks and CRCs but no zlib stream in its IDAT gets in.
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", 16, 16, 8, 2, 0, 0, 0))
    image = b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", b"not a zlib stream") + chunk(b"IEND", b"")
    assert settings.intake_image_check == "structural"
    sid = submit_one(sessions, tenant, store, settings, "broken pixels", image=image)
    engine = ScriptedEngine()
    report = BatchProcessor(sessions, engine, store, settings).run(sid)
    assert report.failed == [sid] and engine.batches == []
    assert dispatched.tasks(TASK_PROCESS_SUBMISSION) == [str(sid)]
    with sessions() as session:
        sub = session.get(Submission, sid)
        assert sub is not None and sub.status == SubmissionStatus.failed
        assert (sub.last_error or "").startswith("image_undecodable: image could not be decoded")
        loaded = SubmissionRepository(session).get(sid)
        assert loaded is not None and SubmissionOut.from_model(loaded).error == sub.last_error
        attempts = session.scalars(select(ProcessingAttempt)).all()
        assert [a.outcome for a in attempts] == ["failed"]
        events = [d.event_type for d in session.scalars(select(WebhookDelivery))]
        assert events == ["submission.failed"]


def test_a_jpeg_with_markers_out_of_place_fails_in_the_worker(
    sessions: sessionmaker[Session],
    tenant: Tenant,
    store: LocalBlobStore,
    settings: Settings,
) -> None:
    # Intake walks a JPEG that ends with its end-of-image marker only to its first scan; the worker walks it
    # all before decoding, and names what it found.
    whole = make_jpeg(64, 48, seed=3)
    sid = submit_one(
        sessions, tenant, store, settings, "spliced", image=jpeg_header(whole) + b"\x12" * 99 + whole
    )
    engine = ScriptedEngine()
    report = BatchProcessor(sessions, engine, store, settings).run(sid)
    assert report.failed == [sid] and engine.batches == []
    with sessions() as session:
        sub = session.get(Submission, sid)
        assert sub is not None and sub.status == SubmissionStatus.failed
        assert (sub.last_error or "").startswith(
            "image_undecodable: image is not well formed: JPEG has a second start-of-image marker"
        )


def test_with_the_decoding_intake_check_the_worker_judges_what_decodes(
    sessions: sessionmaker[Session],
    tenant: Tenant,
    store: LocalBlobStore,
    settings: Settings,
) -> None:
    # Intake decoded it (it lacks its end-of-image marker, which decoders forgive): no walk refuses it later.
    settings.intake_image_check = "decode"
    image = make_jpeg(64, 48, seed=4)[:-2] + b"\x00" * 10
    sid = submit_one(sessions, tenant, store, settings, "decoded at intake", image=image)
    report = BatchProcessor(sessions, ScriptedEngine(), store, settings).run(sid)
    assert report.decided == [sid]


def test_a_lost_lease_in_a_batch_discards_only_that_verdict(
    sessions: sessionmaker[Session],
    tenant: Tenant,
    store: LocalBlobStore,
    settings: Settings,
    dispatched: RecordingDispatcher,
) -> None:
    settings.batch_max_size = 8
    blocked, allowed, taken, reviewed = (
        submit_one(sessions, tenant, store, settings, f"post conflict={score}")
        for score in (0.95, 0.1, 0.1, 0.5)
    )

    report = BatchProcessor(sessions, TakenOverWhileJudging(sessions, taken), store, settings).run(blocked)
    assert report.lease_lost == [taken]
    assert sorted(report.decided) == sorted([blocked, allowed, reviewed])
    with sessions() as session:
        subs = {s.id: s for s in session.scalars(select(Submission))}
        assert (subs[blocked].status, subs[blocked].final_decision) == (SubmissionStatus.decided, "block")
        assert (subs[allowed].status, subs[allowed].final_decision) == (SubmissionStatus.decided, "allow")
        assert (subs[reviewed].status, subs[reviewed].final_decision) == (SubmissionStatus.in_review, None)
        # The taken one is untouched: still processing under the other worker's lease.
        assert subs[taken].status == SubmissionStatus.processing and subs[taken].lease_token is not None
        assert all(subs[i].lease_token is None for i in (blocked, allowed, reviewed))
        assert {v.submission_id for v in session.scalars(select(Verdict))} == {blocked, allowed, reviewed}
        assert [r.submission_id for r in session.scalars(select(ReviewItem))] == [reviewed]
        outcomes = {a.submission_id: a.outcome for a in session.scalars(select(ProcessingAttempt))}
        assert outcomes == {blocked: "decided", allowed: "decided", reviewed: "decided", taken: "lease_lost"}
        deliveries = session.scalars(select(WebhookDelivery)).all()
        assert sorted(d.submission_id for d in deliveries) == sorted([blocked, allowed, reviewed])
        review_payload = next(d.payload for d in deliveries if d.submission_id == reviewed)
        assert (
            review_payload["data"]["status"] == "in_review" and review_payload["data"]["review"] is not None
        )
    assert sorted(dispatched.tasks(TASK_DELIVER_WEBHOOK)) == sorted(str(d.id) for d in deliveries)


def test_a_job_whose_submission_is_done_or_leased_leases_nothing(
    sessions: sessionmaker[Session],
    tenant: Tenant,
    store: LocalBlobStore,
    settings: Settings,
    dispatched: RecordingDispatcher,
) -> None:
    settings.batch_max_size = 1
    done = submit_one(sessions, tenant, store, settings, "first conflict=0.1")
    BatchProcessor(sessions, ScriptedEngine(), store, settings).run(done)
    held = submit_one(sessions, tenant, store, settings, "held by another worker")
    waiting = submit_one(sessions, tenant, store, settings, "still queued")
    with sessions() as session, session.begin():
        session.execute(
            update(Submission)
            .where(Submission.id == held)
            .values(
                status=SubmissionStatus.processing,
                lease_token=uuid.uuid4(),
                lease_expires_at=utcnow() + timedelta(minutes=5),
                attempts=1,
            )
        )
    engine = ScriptedEngine()
    processor = BatchProcessor(sessions, engine, store, settings)
    # Late jobs of a decided submission and of one another worker holds: nothing is leased or released.
    assert processor.run(done).claimed == [] and processor.run(held).claimed == []
    assert engine.batches == []
    with sessions() as session:
        queued = session.get(Submission, waiting)
        assert queued is not None and queued.status == SubmissionStatus.queued and queued.attempts == 0
        outcomes = [a.outcome for a in session.scalars(select(ProcessingAttempt))]
        assert outcomes == ["decided"]
    # The waiting one's own job still takes it.
    assert processor.run(waiting).claimed == [waiting]
