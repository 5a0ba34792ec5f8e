"""Erasure and retention: content blanked, decisions kept, images deleted only once nothing needs them."""

from __future__ import annotations

import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from moderation.audit.models import AuditEntry
from moderation.blobs import LocalBlobStore
from moderation.config import Settings
from moderation.db import utcnow
from moderation.errors import Conflict, NotFound
from moderation.processing.repository import VerdictCacheRepository
from moderation.review.models import ReviewDecision, ReviewKind
from moderation.review.repository import ReviewRepository
from moderation.review.service import appeal, sample_for_qa
from moderation.reviewers.models import Role
from moderation.reviewers.schemas import ReviewerRef
from moderation.submissions import erasure, service
from moderation.submissions.models import Submission, SubmissionStatus, Verdict
from moderation.submissions.repository import SubmissionRepository
from moderation.tenants.models import Tenant
from moderation.webhooks.models import WebhookDelivery, WebhookEndpoint
from tests.conftest import RecordingDispatcher, insert_submissions, make_jpeg, plan_of
from tests.review.helpers import add_review_item, claim_and_decide, make_tenant
from tests.submissions.helpers import add_decided


@pytest.fixture
def store(tmp_path: Path) -> LocalBlobStore:
    """A local blob store in the test's folder."""
    return LocalBlobStore(tmp_path / "blobs", fsync=False)


@pytest.fixture
def tenant(session: Session, settings: Settings) -> Tenant:
    """A tenant with a webhook endpoint for decisions."""
    tenant = make_tenant(session, settings)
    session.add(
        WebhookEndpoint(
            tenant_id=tenant.id,
            url="https://hooks.example.com/x",
            events=["submission.decided"],
            secret="whsec_AAAAAAAAAAAAAAAA",
        )
    )
    session.flush()
    return tenant


def test_erasing_blanks_the_content_and_keeps_the_decision(
    session: Session,
    tenant: Tenant,
    store: LocalBlobStore,
    settings: Settings,
    dispatched: RecordingDispatcher,
) -> None:
    submission = add_decided(session, tenant, store, settings)
    session.commit()
    dispatched.jobs.clear()

    assert erasure.erase_submission(session, tenant, submission.id) is True
    session.commit()

    out = service.get_submission(session, tenant, submission.id)
    assert out.erased_at is not None
    assert (out.caption, out.metadata, out.status, out.final_decision) == ("", {}, "decided", "allow")
    assert out.verdict is not None
    assert (out.verdict.description, out.verdict.visible_text, out.verdict.explanation) == ("", "", "")
    assert out.verdict.decision == "allow" and out.verdict.conflict_score == pytest.approx(0.1)
    assert out.verdict.categories[0].name == "spam"
    assert out.image["sha256"] == submission.image_sha256
    verdict = session.scalars(select(Verdict).where(Verdict.submission_id == submission.id)).one()
    assert verdict.reasons == []
    # Stored webhook payloads are blanked too; the decision in them stays.
    delivery = session.scalars(
        select(WebhookDelivery).where(WebhookDelivery.submission_id == submission.id)
    ).one()
    data = delivery.payload["data"]
    assert (data["caption"], data["metadata"], data["erased_at"]) == ("", {}, out.erased_at.isoformat())
    assert data["verdict"]["description"] == "" and data["verdict"]["decision"] == "allow"
    assert data["verdict"]["reasons"] == []  # they quote the caption
    # The verdict is no longer offered to later submissions of the same image and caption.
    assert (
        VerdictCacheRepository(session).find(f"key-{submission.id}", newer_than=utcnow() - timedelta(1))
        is None
    )
    entry = session.scalars(select(AuditEntry).where(AuditEntry.submission_id == submission.id)).one()
    assert (entry.action, entry.actor) == ("submission.erase", f"tenant:{tenant.name}")
    # The image itself goes in beat's retention run.
    assert dispatched.jobs == [] and store.exists(submission.image_sha256)

    # A second erasure changes nothing and is not an error.
    assert erasure.erase_submission(session, tenant, submission.id) is False


def test_a_rolled_back_erasure_keeps_the_content(
    session: Session,
    tenant: Tenant,
    store: LocalBlobStore,
    settings: Settings,
    dispatched: RecordingDispatcher,
) -> None:
    submission = add_decided(session, tenant, store, settings)
    session.commit()
    dispatched.jobs.clear()
    erasure.erase_submission(session, tenant, submission.id)
    session.rollback()
    assert service.get_submission(session, tenant, submission.id).caption == "my holiday in Lisbon"


def _refusal(session: Session, tenant: Tenant, submission_id: uuid.UUID) -> str:
    """The code of the Conflict an erasure of this submission is refused with."""
    with pytest.raises(Conflict) as caught:
        erasure.erase_submission(session, tenant, submission_id)
    return caught.value.code


@pytest.mark.parametrize("status", [SubmissionStatus.queued, SubmissionStatus.processing])
def test_a_submission_still_being_judged_cannot_be_erased(
    session: Session, tenant: Tenant, store: LocalBlobStore, settings: Settings, status: SubmissionStatus
) -> None:
    submission = add_decided(session, tenant, store, settings, status=SubmissionStatus.queued)
    submission.status = status
    session.flush()
    assert _refusal(session, tenant, submission.id) == "submission_not_final"


def test_a_submission_a_person_is_reviewing_cannot_be_erased(
    session: Session, tenant: Tenant, store: LocalBlobStore, settings: Settings
) -> None:
    item = add_review_item(session, tenant, store, settings)
    assert _refusal(session, tenant, item.submission_id) == "submission_not_final"  # in_review
    # An appeal reopens a decided submission: it is under review again.
    decided = add_decided(session, tenant, store, settings, image=make_jpeg(64, 48, seed=7))
    appeal(session, tenant, decided.id, "please look again")
    decided.status = SubmissionStatus.decided  # even if the status said final, the open item holds it
    session.flush()
    assert _refusal(session, tenant, decided.id) == "submission_under_review"


def test_other_tenants_submissions_are_not_found(
    session: Session, tenant: Tenant, store: LocalBlobStore, settings: Settings
) -> None:
    submission = add_decided(session, tenant, store, settings)
    other = make_tenant(session, settings)
    for who, ident in ((other, submission.id), (tenant, uuid.uuid4())):
        with pytest.raises(NotFound):
            erasure.erase_submission(session, who, ident)


def test_an_erased_submission_cannot_be_appealed(
    session: Session, tenant: Tenant, store: LocalBlobStore, settings: Settings
) -> None:
    submission = add_decided(session, tenant, store, settings)
    erasure.erase_submission(session, tenant, submission.id)
    with pytest.raises(Conflict) as caught:
        appeal(session, tenant, submission.id, None)
    assert caught.value.code == "submission_erased"


def test_an_image_is_deleted_only_when_every_submission_of_it_is_erased(
    session: Session,
    sessions: sessionmaker[Session],
    tenant: Tenant,
    store: LocalBlobStore,
    settings: Settings,
) -> None:
    image = make_jpeg(64, 48, seed=3)
    other_tenant = make_tenant(session, settings)
    first = add_decided(session, tenant, store, settings, image=image)
    second = add_decided(session, other_tenant, store, settings, image=image, caption="another post")
    assert first.image_sha256 == second.image_sha256
    erasure.erase_submission(session, tenant, first.id)
    session.commit()

    assert erasure.release_erased_images(sessions, store).deleted == 0
    assert store.exists(first.image_sha256)  # the other tenant's submission still needs it

    erasure.erase_submission(session, other_tenant, second.id)
    session.commit()
    assert erasure.release_erased_images(sessions, store).deleted == 1
    assert not store.exists(first.image_sha256)
    released = session.scalars(
        select(Submission.image_released_at)
        .where(Submission.id.in_([first.id, second.id]))
        .execution_options(populate_existing=True)
    ).all()
    assert all(at is not None for at in released)
    assert erasure.release_erased_images(sessions, store).submissions == 0  # nothing left to release


class _OneUndeletable(LocalBlobStore):
    """A store that cannot delete one image (a read-only file, say) and deletes the others."""

    def __init__(self, root: Path, stuck: str) -> None:
        super().__init__(root, fsync=False)
        self.stuck = stuck

    def delete(self, sha256: str) -> None:
        if sha256 == self.stuck:
            raise PermissionError(13, "Permission denied")
        super().delete(sha256)


def test_an_image_the_store_fails_to_delete_is_tried_again_and_holds_back_no_other(
    session: Session,
    sessions: sessionmaker[Session],
    tenant: Tenant,
    store: LocalBlobStore,
    settings: Settings,
    tmp_path: Path,
) -> None:
    stuck = add_decided(session, tenant, store, settings, image=make_jpeg(64, 48, seed=21))
    other = add_decided(session, tenant, store, settings, image=make_jpeg(64, 48, seed=22))
    for submission in (stuck, other):
        erasure.erase_submission(session, tenant, submission.id)
    session.commit()

    report = erasure.release_erased_images(sessions, _OneUndeletable(tmp_path / "blobs", stuck.image_sha256))
    assert (report.deleted, report.failed, report.submissions) == (1, 1, 1)
    assert store.exists(stuck.image_sha256) and not store.exists(other.image_sha256)
    report = erasure.release_erased_images(sessions, store)
    assert (report.deleted, report.failed, report.submissions) == (1, 0, 1)
    assert not store.exists(stuck.image_sha256)


def test_retention_erases_only_old_final_submissions_nobody_is_reviewing(
    session: Session,
    sessions: sessionmaker[Session],
    tenant: Tenant,
    store: LocalBlobStore,
    settings: Settings,
    dispatched: RecordingDispatcher,
) -> None:
    old = add_decided(session, tenant, store, settings, image=make_jpeg(64, 48, seed=11))
    old_failed = add_decided(
        session, tenant, store, settings, image=make_jpeg(64, 48, seed=12), status=SubmissionStatus.failed
    )
    old_queued = add_decided(
        session, tenant, store, settings, image=make_jpeg(64, 48, seed=13), status=SubmissionStatus.queued
    )
    old_in_review = add_review_item(session, tenant, store, settings, seed=14).submission_id
    old_appealed = add_decided(session, tenant, store, settings, image=make_jpeg(64, 48, seed=15))
    appeal(session, tenant, old_appealed.id, None)
    old_appealed.status = SubmissionStatus.reviewed  # final by its status, but its appeal is still open
    recent = add_decided(session, tenant, store, settings, image=make_jpeg(64, 48, seed=16))
    session.flush()
    long_ago = utcnow() - timedelta(days=40)
    session.execute(
        update(Submission)
        .where(Submission.id.in_([old.id, old_failed.id, old_queued.id, old_in_review, old_appealed.id]))
        .values(created_at=long_ago)
    )
    session.commit()
    dispatched.jobs.clear()

    assert erasure.erase_expired(sessions, settings) == 0  # retention is off by default
    settings.retention_days = 30
    assert erasure.erase_expired(sessions, settings) == 2
    erased = set(
        session.scalars(
            select(Submission.id)
            .where(Submission.erased_at.is_not(None))
            .execution_options(populate_existing=True)
        )
    )
    assert erased == {old.id, old_failed.id}
    assert recent.id not in erased
    assert erasure.release_erased_images(sessions, store).deleted == 2
    assert not store.exists(old.image_sha256) and store.exists(recent.image_sha256)
    assert erasure.erase_expired(sessions, settings) == 0  # nothing more to erase


def test_the_review_tool_says_an_erased_image_is_gone(
    session: Session, tenant: Tenant, store: LocalBlobStore, settings: Settings
) -> None:
    from moderation.review.queries import submission_image

    submission = add_decided(session, tenant, store, settings)
    assert submission_image(session, store, submission.id)[1] == "image/jpeg"
    erasure.erase_submission(session, tenant, submission.id)
    session.flush()
    with pytest.raises(NotFound) as caught:
        submission_image(session, store, submission.id)
    assert caught.value.code == "image_erased"


LEAD = ReviewerRef("lead@example.com", Role.lead)
OTHER_LEAD = ReviewerRef("other@example.com", Role.lead)


def test_free_text_about_the_submission_is_erased_in_reviews_and_the_audit_trail(
    session: Session, tenant: Tenant, store: LocalBlobStore, settings: Settings
) -> None:
    item = add_review_item(session, tenant, store, settings, caption="Jane Roe 415-555-0199", seed=31)
    item.reason = 'blocklist: pattern \\d{3}-\\d{3}-\\d{4} matched in caption ("415-555-0199")'
    session.flush()
    claim_and_decide(session, LEAD, ReviewDecision.approve, note="Jane Roe's number is her shop's")
    appeal(session, tenant, item.submission_id, "Jane Roe asked us to appeal")
    claim_and_decide(session, OTHER_LEAD, ReviewDecision.approve, note="fine")
    session.flush()

    erasure.erase_submission(session, tenant, item.submission_id)
    session.flush()
    session.expire_all()

    items = ReviewRepository(session).for_submission(item.submission_id)
    assert [i.reason for i in items] == [erasure.ERASED, erasure.ERASED]
    assert [i.note for i in items] == [erasure.ERASED, erasure.ERASED]
    assert all("appeal_reason" not in (i.details or {}) for i in items)
    assert [i.decision for i in items] == [ReviewDecision.approve, ReviewDecision.approve]  # outcomes stay
    entries = session.scalars(select(AuditEntry).where(AuditEntry.submission_id == item.submission_id)).all()
    text = repr([(e.before, e.after) for e in entries])
    assert "Jane Roe" not in text and "415-555-0199" not in text
    assert {e.action for e in entries} >= {"review.decide", "submission.appeal", "submission.erase"}


def test_an_open_qa_review_is_withdrawn_and_erased_submissions_are_never_sampled(
    session: Session, tenant: Tenant, store: LocalBlobStore, settings: Settings
) -> None:
    item = add_review_item(session, tenant, store, settings, seed=41)
    claim_and_decide(session, LEAD, ReviewDecision.reject, ["scam_fraud"])
    [qa] = sample_for_qa(session, OTHER_LEAD, 1)
    assert qa.submission_id == item.submission_id and qa.kind == ReviewKind.qa

    assert erasure.erase_submission(session, tenant, item.submission_id) is True  # not refused for QA
    session.flush()
    assert [i.kind for i in ReviewRepository(session).for_submission(item.submission_id)] == [
        ReviewKind.review
    ]
    withdrawn = session.scalars(select(AuditEntry).where(AuditEntry.action == "review.qa_withdrawn")).one()
    assert (withdrawn.subject_id, withdrawn.actor) == (str(qa.id), "system:erasure")
    assert sample_for_qa(session, OTHER_LEAD, 5) == []  # nothing left to check


def test_what_webhook_receivers_answered_is_erased_too(
    session: Session, tenant: Tenant, store: LocalBlobStore, settings: Settings
) -> None:
    from moderation.webhooks.models import WebhookAttempt

    submission = add_decided(session, tenant, store, settings)
    delivery = session.scalars(
        select(WebhookDelivery).where(WebhookDelivery.submission_id == submission.id)
    ).one()
    session.add(
        WebhookAttempt(
            delivery_id=delivery.id,
            attempt=1,
            attempted_at=utcnow(),
            status_code=400,
            duration_ms=3.0,
            error="HTTP 400",
            response_excerpt='{"echo": "my holiday in Lisbon"}',
        )
    )
    session.flush()
    erasure.erase_submission(session, tenant, submission.id)
    session.flush()
    session.expire_all()
    attempt = session.scalars(select(WebhookAttempt).where(WebhookAttempt.delivery_id == delivery.id)).one()
    assert attempt.response_excerpt == "" and attempt.status_code == 400


def test_the_audit_log_lets_through_only_the_redaction_of_an_erased_submissions_free_text(
    session: Session, tenant: Tenant, store: LocalBlobStore, settings: Settings
) -> None:
    from sqlalchemy import text
    from sqlalchemy.exc import ProgrammingError

    kept = add_decided(session, tenant, store, settings, image=make_jpeg(64, 48, seed=51))
    erased = add_decided(session, tenant, store, settings, image=make_jpeg(64, 48, seed=52))
    for submission in (kept, erased):
        appeal(session, tenant, submission.id, "please look again")
    for _appeal in range(2):
        claim_and_decide(session, LEAD, ReviewDecision.approve, note="fine")
    erasure.erase_submission(session, tenant, erased.id)
    session.flush()

    def entry_of(submission: Submission) -> AuditEntry:
        return session.scalars(
            select(AuditEntry).where(
                AuditEntry.submission_id == submission.id, AuditEntry.action == "submission.appeal"
            )
        ).one()

    attempts = [
        (entry_of(kept), '{"reason": "(erased)"}'),  # a submission that was not erased
        (entry_of(erased), '{"status": "allow", "reason": "(erased)"}'),  # more than the free text
        (entry_of(erased), '{"reason": "forged"}'),  # free text, but not to "(erased)"
    ]
    for entry, forged in attempts:
        with pytest.raises(ProgrammingError, match="append-only"), session.begin_nested():
            session.execute(text("SET LOCAL moderation.audit_redaction = 'on'"))
            session.execute(
                text("UPDATE audit_log SET after = CAST(:after AS jsonb) WHERE id = :id"),
                {"after": forged, "id": entry.id},
            )
    with pytest.raises(ProgrammingError, match="append-only"), session.begin_nested():
        session.execute(text("UPDATE audit_log SET actor = 'x' WHERE id = :id"), {"id": entry_of(erased).id})


def _aged(
    session: Session, store: LocalBlobStore, settings: Settings, rows: dict[tuple[Tenant, int], int]
) -> dict:  # type: ignore[type-arg]
    """Decided submissions of the given tenants, ``count`` of each age in days: {(tenant name, days, n): id}."""
    made = {}
    seed = 100
    for (owner, days), count in rows.items():
        for n in range(count):
            seed += 1
            submission = add_decided(session, owner, store, settings, image=make_jpeg(32, 24, seed=seed))
            made[(owner.name, days, n)] = submission.id
            session.flush()
            session.execute(
                update(Submission)
                .where(Submission.id == submission.id)
                .values(created_at=utcnow() - timedelta(days=days))
            )
    session.commit()
    return made


def _erased(session: Session, made: dict) -> set:  # type: ignore[type-arg]
    ids = set(
        session.scalars(
            select(Submission.id)
            .where(Submission.erased_at.is_not(None))
            .execution_options(populate_existing=True)
        )
    )
    return {key for key, submission_id in made.items() if submission_id in ids}


def test_retention_follows_each_tenant_s_own_period_then_the_default(
    session: Session,
    sessions: sessionmaker[Session],
    tenant: Tenant,
    store: LocalBlobStore,
    settings: Settings,
) -> None:
    keeper = make_tenant(session, settings, "keeper")  # keeps everything
    brief = make_tenant(session, settings, "brief")  # 5 days
    patient = make_tenant(session, settings, "patient")  # 60 days, longer than the default below
    keeper.retention_days, brief.retention_days, patient.retention_days = 0, 5, 60
    made = _aged(
        session,
        store,
        settings,
        {(tenant, 40): 1, (tenant, 10): 1, (keeper, 400): 1, (brief, 10): 1, (brief, 2): 1, (patient, 40): 1},
    )
    # The service keeps everything by default: only tenants with a period of their own lose any.
    assert erasure.erase_expired(sessions, settings) == 1
    assert _erased(session, made) == {("brief", 10, 0)}
    settings.retention_days = 30
    assert erasure.erase_expired(sessions, settings) == 1
    assert _erased(session, made) == {("brief", 10, 0), (tenant.name, 40, 0)}
    assert erasure.erase_expired(sessions, settings) == 0


def test_each_tenant_gets_its_share_of_a_retention_pass_before_a_backlog_takes_the_rest(
    session: Session,
    sessions: sessionmaker[Session],
    tenant: Tenant,
    store: LocalBlobStore,
    settings: Settings,
) -> None:
    other = make_tenant(session, settings, "other")
    made = _aged(session, store, settings, {(tenant, 40): 3, (other, 40): 1})
    settings.retention_days = 30
    for _ in range(5):  # whichever tenant the pass starts with
        assert erasure.erase_expired(sessions, settings, limit=2) == 2
        assert {name for name, _, _ in _erased(session, made)} == {tenant.name, "other"}
        session.execute(update(Submission).values(erased_at=None))
        session.commit()
    assert erasure.erase_expired(sessions, settings, limit=3) == 3  # the backlog takes what is left
    assert erasure.erase_expired(sessions, settings, limit=3) == 1
    assert len(_erased(session, made)) == 4


def test_retention_reads_a_tenant_s_expired_submissions_from_its_own_index(
    session: Session, tenant: Tenant, store: LocalBlobStore, settings: Settings
) -> None:
    other = make_tenant(session, settings, "other")
    connection = session.connection()
    # A known spread, analysed: a tenant with 1% of the submissions not erased yet.
    for owner, count in ((tenant.id, 30), (other.id, 3000)):
        insert_submissions(connection, owner, count, status="decided", age_days=9)
    connection.exec_driver_sql("ANALYZE submissions")
    repo = SubmissionRepository(session)
    plan = plan_of(session, lambda: repo.expired_unerased(tenant.id, utcnow() - timedelta(days=1), 10))
    assert "Index Scan using ix_submissions_tenant_unerased_created" in plan, plan
    assert "Index Cond: ((tenant_id = " in plan and "(created_at < " in plan, plan


def test_a_tenant_whose_erasure_fails_holds_back_no_other(
    session: Session,
    sessions: sessionmaker[Session],
    tenant: Tenant,
    store: LocalBlobStore,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    other = make_tenant(session, settings, "other")
    made = _aged(session, store, settings, {(tenant, 40): 1, (other, 40): 1})
    settings.retention_days = 30
    erase = erasure._erase
    doomed = made[(tenant.name, 40, 0)]

    def failing(session: Session, ids: list[uuid.UUID], now: object) -> None:
        if doomed in ids:
            raise RuntimeError("a malformed row")
        erase(session, ids, now)  # type: ignore[arg-type]

    monkeypatch.setattr(erasure, "_erase", failing)
    assert erasure.erase_expired(sessions, settings) == 1
    assert _erased(session, made) == {("other", 40, 0)}
    assert "could not erase the expired submissions of tenant" in caplog.text
