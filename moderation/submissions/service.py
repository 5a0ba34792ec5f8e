"""Accepting submissions and reading them back."""

from __future__ import annotations

import base64
import binascii
import functools
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from functools import cached_property
from typing import Any, TypeAlias, cast

from sqlalchemy.orm import Session

from moderation.blobs import BlobStore, BlobStoreError
from moderation.config import Settings
from moderation.db import new_id, utcnow
from moderation.errors import InvalidInput, NotFound, PayloadTooLarge
from moderation.jobs import QUEUE_GPU, TASK_PROCESS_SUBMISSION, Job, enqueue_after_commit
from moderation.review.repository import ReviewRepository
from moderation.submissions.models import Submission, SubmissionStatus
from moderation.submissions.repository import SubmissionRepository
from moderation.submissions.schemas import SubmissionOut, SubmissionPage
from moderation.submissions.validation import (
    ImageInfo,
    decode_caption,
    parse_metadata,
    validate_identifier,
    validate_image,
)
from moderation.tenants.models import Tenant


@dataclass(frozen=True)
class IntakeResult:
    """What intake answers (id, status, creation time) and whether this request created the submission."""

    id: uuid.UUID
    status: SubmissionStatus
    created_at: datetime
    created: bool
    _load: Callable[[], Submission] = field(repr=False, compare=False)

    @cached_property
    def submission(self) -> Submission:
        """The submission as an ORM object in the intake session (built on first use, not read back)."""
        return self._load()

    def detached(self) -> IntakeResult:
        """This answer without a way to build its ORM object (for answers that leave the session's thread)."""
        return replace(self, _load=_no_submission)

    @classmethod
    def replay(cls, existing: Submission) -> IntakeResult:
        """The answer of an idempotent replay: the original submission."""
        return cls(existing.id, existing.status, existing.created_at, False, lambda: existing)

    @classmethod
    def inserted(cls, repo: SubmissionRepository, values: dict[str, Any]) -> IntakeResult:
        """The answer for a row just inserted with ``values``; the ORM object is built only if asked for."""
        return cls(
            values["id"],
            SubmissionStatus.queued,
            values["created_at"],
            True,
            functools.partial(repo.attach_inserted, values),
        )


def _no_submission() -> Submission:
    raise RuntimeError("this intake answer was handed to another thread: it builds no ORM object")


def process_job(*submission_ids: uuid.UUID) -> Job:
    """The GPU job that judges these submissions (those accepted together share one job)."""
    if not submission_ids:
        raise ValueError("a process job needs at least one submission")
    return Job(task=TASK_PROCESS_SUBMISSION, args=tuple(str(i) for i in submission_ids), queue=QUEUE_GPU)


def decode_base64_image(value: str, settings: Settings) -> bytes:
    """Decode an ``image_base64`` field (a data: URL prefix is accepted), enforcing the size limit early."""
    if value.startswith("data:"):
        _, _, value = value.partition(",")
    # Base64 inflates by 4/3; refuse obviously oversized input before decoding it.
    if len(value) > settings.max_image_bytes * 4 // 3 + 16:
        raise PayloadTooLarge(
            f"image is larger than {settings.max_image_bytes} bytes", code="image_too_large"
        )
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidInput("image_base64 is not valid base64", code="invalid_base64") from exc


@dataclass(frozen=True)
class PreparedSubmission:
    """A submission that passed every check that needs no storage: ready to be written."""

    tenant_id: uuid.UUID
    caption: str
    metadata: dict[str, Any]
    image: bytes
    image_info: ImageInfo
    external_id: str | None = None
    idempotency_key: str | None = None
    source_url: str | None = None
    # Chosen once, so that writing the same submission again (after a failure whose outcome is unknown)
    # finds its own row instead of adding a second one.
    id: uuid.UUID = field(default_factory=new_id)

    @property
    def has_key(self) -> bool:
        """Whether a repeat of this submission must be answered as a replay (it carries a client key)."""
        return self.idempotency_key is not None or self.external_id is not None

    def row_values(self, image_sha256: str, now: datetime) -> dict[str, Any]:
        """The ``submissions`` row for this submission, queued as of ``now``."""
        return {
            "id": self.id,
            "tenant_id": self.tenant_id,
            "external_id": self.external_id,
            "idempotency_key": self.idempotency_key,
            "caption": self.caption,
            "metadata": self.metadata,
            "image_sha256": image_sha256,
            "image_format": self.image_info.format,
            "image_width": self.image_info.width,
            "image_height": self.image_info.height,
            "image_bytes": len(self.image),
            "image_source_url": self.source_url,
            "status": SubmissionStatus.queued,
            "attempts": 0,
            "enqueued_at": now,
            "created_at": now,
            "updated_at": now,
        }


def prepare_submission(
    tenant_id: uuid.UUID,
    *,
    image: bytes,
    caption: str | bytes,
    settings: Settings,
    external_id: str | None = None,
    idempotency_key: str | None = None,
    metadata: str | dict[str, Any] | None = None,
    source_url: str | None = None,
) -> PreparedSubmission:
    """Validate everything a submission carries (caption, identifiers, metadata, image); raise clear errors."""
    text = decode_caption(caption, settings)
    external_id = validate_identifier(external_id, "external_id")
    idempotency_key = validate_identifier(idempotency_key, "idempotency_key")
    meta = parse_metadata(metadata)
    info = validate_image(image, settings)
    return PreparedSubmission(
        tenant_id=tenant_id,
        caption=text,
        metadata=meta,
        image=image,
        image_info=info,
        external_id=external_id,
        idempotency_key=idempotency_key,
        source_url=source_url,
    )


def submit(
    session: Session,
    tenant: Tenant,
    *,
    image: bytes,
    caption: str | bytes,
    blob_store: BlobStore,
    settings: Settings,
    external_id: str | None = None,
    idempotency_key: str | None = None,
    metadata: str | dict[str, Any] | None = None,
    source_url: str | None = None,
) -> IntakeResult:
    """Validate and store a submission and queue its judgement after commit; replays return the original."""
    prepared = prepare_submission(
        tenant.id,
        image=image,
        caption=caption,
        settings=settings,
        external_id=external_id,
        idempotency_key=idempotency_key,
        metadata=metadata,
        source_url=source_url,
    )
    return store_prepared(session, prepared, blob_store)


def store_prepared(session: Session, prepared: PreparedSubmission, blob_store: BlobStore) -> IntakeResult:
    """Store one prepared submission in the caller's transaction and queue its job after commit."""
    (outcome,) = store_batch(session, [prepared], blob_store)
    if isinstance(outcome, Exception):
        raise outcome
    return outcome


def find_replay(
    session: Session, tenant_id: uuid.UUID, *, idempotency_key: str | None, external_id: str | None
) -> IntakeResult | None:
    """The replay answer for a repeat of a stored submission (same key or external id), if it is one."""
    key = validate_identifier(idempotency_key, "idempotency_key")
    external = validate_identifier(external_id, "external_id")
    if key is None and external is None:
        return None
    existing = SubmissionRepository(session).find_existing(
        tenant_id, idempotency_key=key, external_id=external
    )
    return IntakeResult.replay(existing) if existing is not None else None


def replay_of_conflict(repo: SubmissionRepository, prepared: PreparedSubmission) -> IntakeResult:
    """The replay answer for a submission whose insert lost to an existing row with the same key."""
    existing = repo.find_existing(
        prepared.tenant_id, idempotency_key=prepared.idempotency_key, external_id=prepared.external_id
    )
    if existing is None:  # pragma: no cover - the conflicting row must exist
        raise RuntimeError("idempotent insert conflicted but no submission was found")
    return IntakeResult.replay(existing)


Outcome: TypeAlias = IntakeResult | Exception


def _match_existing(prepared: PreparedSubmission, existing: Sequence[Submission]) -> Submission | None:
    """The oldest of ``existing`` that this submission repeats (same tenant and key or external id)."""
    matches = [
        row
        for row in existing
        if row.tenant_id == prepared.tenant_id
        and (
            (prepared.idempotency_key is not None and row.idempotency_key == prepared.idempotency_key)
            or (prepared.external_id is not None and row.external_id == prepared.external_id)
        )
    ]
    return min(matches, key=lambda row: row.created_at) if matches else None


def store_batch(
    session: Session, batch: Sequence[PreparedSubmission], blob_store: BlobStore, *, enqueue_job: bool = True
) -> list[Outcome]:
    """Store a batch in the caller's transaction: one lookup, one blob pass, one INSERT, one job after commit.

    The images of new submissions are stored first, in one pass. Repeats of stored submissions (and of
    each other) are answered as replays; an image that cannot be written fails only its own submission.
    The caller commits; the job naming the new rows goes to the broker only then, and is dropped on
    rollback. (In an autocommit session, as the intake writer's, the INSERT commits by itself: a failure
    after it drops the job, and the sweeper sends it later; writing the batch again finds the rows and
    sends it at once.)
    """
    repo = SubmissionRepository(session)
    outcomes: list[Outcome | None] = [None] * len(batch)
    keyed = [(p.tenant_id, p.idempotency_key, p.external_id) for p in batch if p.has_key]
    existing = repo.find_existing_many(keyed) if keyed else []
    to_store: list[int] = []
    rewritten: list[uuid.UUID] = []  # rows an earlier attempt at this very batch already committed
    for index, prepared in enumerate(batch):
        match = _match_existing(prepared, existing) if prepared.has_key else None
        if match is None:
            to_store.append(index)
        elif match.id == prepared.id:
            outcomes[index] = replace(IntakeResult.replay(match), created=True)
            rewritten.append(match.id)
        else:
            outcomes[index] = IntakeResult.replay(match)
    written = blob_store.put_many([batch[index].image for index in to_store]) if to_store else []
    now = utcnow()
    rows: dict[int, dict[str, Any]] = {}
    for index, digest in zip(to_store, written, strict=True):
        if isinstance(digest, BlobStoreError):
            outcomes[index] = digest
        else:
            rows[index] = batch[index].row_values(digest, now)
    # A fixed order of keys, so that two processes inserting the same keys cannot deadlock on the indexes.
    ordered = sorted(
        rows.values(),
        key=lambda v: (str(v["tenant_id"]), v["idempotency_key"] or "", v["external_id"] or "", str(v["id"])),
    )
    inserted = repo.insert_many_if_new(ordered)
    conflicted = [index for index, values in rows.items() if values["id"] not in inserted]
    # A submission written by an earlier attempt whose outcome was lost (a failure after its commit)
    # conflicts with its own row: it is answered as created, not stored twice.
    earlier = repo.created_at_of([rows[index]["id"] for index in conflicted])
    ours: list[int] = []
    for index, values in rows.items():
        if values["id"] in earlier:
            values = {**values, "created_at": earlier[values["id"]]}
        elif values["id"] not in inserted:
            continue
        outcomes[index] = IntakeResult.inserted(repo, values)
        ours.append(index)
    job_ids = [*(rows[index]["id"] for index in ours), *rewritten]
    if job_ids and enqueue_job:
        # One job names them all: a GPU worker judges them in one batch, and no job is left over to find
        # its submission already judged as another's companion. (A repeated job is harmless.)
        enqueue_after_commit(session, process_job(*job_ids))
    # A row that lost to an equal key (another transaction's, which the INSERT waited for, or an earlier
    # one of this batch) is visible to the next statement.
    for index in conflicted:
        if outcomes[index] is None:
            outcomes[index] = replay_of_conflict(repo, batch[index])
    if any(outcome is None for outcome in outcomes):  # pragma: no cover - every branch above sets one
        raise RuntimeError("a submission of the batch got no outcome")
    return cast(list[Outcome], outcomes)


def get_submission(session: Session, tenant: Tenant, submission_id: uuid.UUID) -> SubmissionOut:
    """A tenant's submission with its verdict and review; NotFound for other tenants' ids."""
    submission = SubmissionRepository(session).get(submission_id, tenant_id=tenant.id)
    if submission is None:
        raise NotFound("submission not found", code="submission_not_found")
    review = ReviewRepository(session).latest_for_submissions([submission.id]).get(submission.id)
    return SubmissionOut.from_model(submission, review)


def encode_cursor(submission_id: uuid.UUID) -> str:
    """An opaque pagination cursor."""
    return base64.urlsafe_b64encode(submission_id.bytes).decode().rstrip("=")


def decode_cursor(cursor: str) -> uuid.UUID:
    """Decode a pagination cursor, or InvalidInput."""
    try:
        return uuid.UUID(bytes=base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (ValueError, binascii.Error) as exc:
        raise InvalidInput("invalid cursor", code="invalid_cursor") from exc


def list_submissions(
    session: Session, tenant: Tenant, *, status: str | None, limit: int, cursor: str | None
) -> SubmissionPage:
    """A page of the tenant's submissions, newest first."""
    if not 1 <= limit <= 200:
        raise InvalidInput("limit must be between 1 and 200", code="invalid_limit")
    status_value: SubmissionStatus | None = None
    if status:
        try:
            status_value = SubmissionStatus(status)
        except ValueError as exc:
            allowed = ", ".join(s.value for s in SubmissionStatus)
            raise InvalidInput(f"status must be one of {allowed}", code="invalid_status") from exc
    before = decode_cursor(cursor) if cursor else None
    rows = SubmissionRepository(session).page(
        tenant.id, status=status_value, limit=limit + 1, before_id=before
    )
    has_more = len(rows) > limit
    rows = rows[:limit]
    reviews = ReviewRepository(session).latest_for_submissions([r.id for r in rows])
    return SubmissionPage(
        data=[SubmissionOut.from_model(r, reviews.get(r.id)) for r in rows],
        next_cursor=encode_cursor(rows[-1].id) if has_more and rows else None,
    )
