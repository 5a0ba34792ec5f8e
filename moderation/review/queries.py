"""Read models of the review UI and API: an item with everything a reviewer needs, history, search."""

from __future__ import annotations

import base64
import binascii
import io
import json
import uuid
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from PIL import Image
from sqlalchemy.orm import Session

from moderation.audit.models import AuditEntry
from moderation.audit.repository import AuditRepository
from moderation.blobs import BlobStore
from moderation.engine.base import CategorySpec
from moderation.errors import InvalidInput, NotFound
from moderation.policy.categories import categories_for
from moderation.review.models import ReviewItem, ReviewKind, ReviewState
from moderation.review.repository import ListPosition, ReviewRepository
from moderation.review.schemas import ReviewItemOut
from moderation.reviewers.models import Role
from moderation.reviewers.schemas import ReviewerRef
from moderation.submissions.models import Submission
from moderation.tenants.models import Tenant
from moderation.tenants.repository import TenantRepository

# Categories whose images a reviewer should not have to see unasked.
SENSITIVE_CATEGORIES = ("sexual", "violence", "self_harm")
BROWSER_IMAGE_TYPES = {
    "JPEG": "image/jpeg",
    "PNG": "image/png",
    "WEBP": "image/webp",
    "GIF": "image/gif",
    "BMP": "image/bmp",
}


@dataclass(frozen=True)
class ScoreBar:
    """One category score as the review screen draws it."""

    name: str
    score: float
    level: str


@dataclass
class ItemContext:
    """A review item with its submission, verdict, tenant, the submission's review history and audit trail."""

    item: ReviewItem
    submission: Submission
    tenant: Tenant
    history: list[ReviewItem]
    audit: list[AuditEntry]
    categories: tuple[CategorySpec, ...]
    scores: list[ScoreBar] = field(default_factory=list)
    sensitive: list[str] = field(default_factory=list)
    origin: ReviewItem | None = None
    #: The submission is under a blind QA second review and the viewer is not a lead: its human decisions
    #: stay hidden, wherever they would show.
    decisions_hidden: bool = False
    #: Only leads read the audit trail.
    audit_hidden: bool = False

    @property
    def blind(self) -> bool:
        """Earlier decisions are not shown: a QA second review's own screen, or a submission under one."""
        return self.decisions_hidden or (
            self.item.kind == ReviewKind.qa and self.item.state != ReviewState.decided
        )

    def out(self, viewer: str | None) -> ReviewItemOut:
        """The JSON shape of the item, with its submission."""
        return ReviewItemOut.from_model(
            self.item,
            viewer=viewer,
            submission=self.submission,
            tenant=self.tenant.name,
            redact=self.decisions_hidden,
        )


def _level(score: float, review_at: float, block_at: float) -> str:
    if score >= block_at:
        return "high"
    if score >= review_at:
        return "medium"
    return "low"


def hidden_decisions(
    session: Session, viewer: ReviewerRef | None, submission_ids: list[uuid.UUID]
) -> set[uuid.UUID]:
    """Submissions whose human decisions ``viewer`` may not see: under a blind QA review, unless a lead."""
    if viewer is None or viewer.can(Role.lead):
        return set()
    return ReviewRepository(session).under_open_qa(submission_ids)


def item_context(
    session: Session, item_id: uuid.UUID, *, blur_threshold: float, viewer: ReviewerRef | None = None
) -> ItemContext:
    """Everything the review screen shows ``viewer`` about an item (None: everything); NotFound if missing."""
    repo = ReviewRepository(session)
    item = repo.get(item_id)
    if item is None:
        raise NotFound("review item not found", code="review_item_not_found")
    submission = repo.submissions([item.submission_id])[item.submission_id]
    tenant = TenantRepository(session).get(item.tenant_id)
    assert tenant is not None
    history = [h for h in repo.for_submission(item.submission_id) if h.id != item.id]
    lead = viewer is None or viewer.can(Role.lead)
    context = ItemContext(
        item=item,
        submission=submission,
        tenant=tenant,
        history=history,
        audit=AuditRepository(session).search(submission_id=item.submission_id, limit=200) if lead else [],
        categories=categories_for(tenant),
        origin=repo.get(item.origin_id) if item.origin_id else None,
        decisions_hidden=bool(hidden_decisions(session, viewer, [item.submission_id])),
        audit_hidden=not lead,
    )
    if submission.verdict is not None:
        scores = sorted(submission.verdict.categories, key=lambda c: -float(c["score"]))
        context.scores = [
            ScoreBar(
                name=str(c["name"]),
                score=float(c["score"]),
                level=_level(
                    float(c["score"]), tenant.category_review_threshold, tenant.category_block_threshold
                ),
            )
            for c in scores
        ]
        context.sensitive = [
            s.name for s in context.scores if s.name in SENSITIVE_CATEGORIES and s.score >= blur_threshold
        ]
    return context


def submission_image(session: Session, blob_store: BlobStore, submission_id: uuid.UUID) -> tuple[bytes, str]:
    """A submission's image bytes and content type, converted to PNG when browsers cannot show the format."""
    submission = ReviewRepository(session).submissions([submission_id]).get(submission_id)
    if submission is None:
        raise NotFound("submission not found", code="submission_not_found")
    if submission.erased_at is not None:
        raise NotFound("the platform erased this submission's image", code="image_erased")
    data = blob_store.get(submission.image_sha256)
    content_type = BROWSER_IMAGE_TYPES.get(submission.image_format.upper())
    if content_type is not None:
        return data, content_type
    with Image.open(io.BytesIO(data)) as image:
        buffer = io.BytesIO()
        image.convert("RGBA").save(buffer, "PNG")
    return buffer.getvalue(), "image/png"


def search(session: Session, query: str) -> list[tuple[Submission, list[ReviewItem], str]]:
    """Submissions matching an id or external id, each with its review items and tenant name."""
    if not query.strip():
        return []
    repo = ReviewRepository(session)
    found = repo.find_submissions(query)
    names = repo.tenant_names([s.tenant_id for s in found])
    return [(s, repo.for_submission(s.id), names.get(s.tenant_id, "?")) for s in found]


def items_with_submissions(
    session: Session, items: list[ReviewItem]
) -> list[tuple[ReviewItem, Submission | None, str]]:
    """Items next to their submissions and tenant names, for lists."""
    repo = ReviewRepository(session)
    subs = repo.submissions([i.submission_id for i in items])
    names = repo.tenant_names([i.tenant_id for i in items])
    return [(i, subs.get(i.submission_id), names.get(i.tenant_id, "?")) for i in items]


def encode_position(position: ListPosition) -> str:
    """An opaque cursor for the review listing page that starts after ``position``."""
    raw = json.dumps([position.decided, position.rank, position.moment, str(position.id)])
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_position(cursor: str) -> ListPosition:
    """The position a cursor stands for; InvalidInput when it is not one this service made."""
    try:
        decided, rank, moment, item_id = json.loads(
            base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        )
        Decimal(moment)  # an exact decimal, or not a cursor of ours
        return ListPosition(int(decided), int(rank), str(moment), uuid.UUID(item_id))
    except (ValueError, TypeError, ArithmeticError, binascii.Error) as exc:
        raise InvalidInput("invalid cursor", code="invalid_cursor") from exc


def items_page(
    session: Session, *, limit: int, cursor: str | None, **filters: Any
) -> tuple[list[ReviewItem], str | None]:
    """One page of review items (``ReviewRepository.list_page`` filters) and the cursor of the next, if any."""
    page = ReviewRepository(session).list_page(
        **filters, limit=limit + 1, after=decode_position(cursor) if cursor else None
    )
    more = len(page) > limit
    page = page[:limit]
    return [item for item, _ in page], encode_position(page[-1][1]) if more and page else None
