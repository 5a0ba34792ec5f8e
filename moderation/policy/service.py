"""Managing a tenant's blocklist and known images, and checking submissions against them."""

from __future__ import annotations

import io
import uuid

from PIL import Image
from sqlalchemy.orm import Session

from moderation.blobs import BlobStore
from moderation.config import Settings
from moderation.db import new_id, utcnow
from moderation.errors import Conflict, InvalidInput, NotFound
from moderation.policy.blocklist import Blocklist, BlocklistLimits, validate_blocklist
from moderation.policy.decision import KnownImageMatch
from moderation.policy.models import KnownImage
from moderation.policy.perceptual import ImageHashes, image_hashes, to_signed
from moderation.policy.repository import KnownImageRepository
from moderation.policy.schemas import BlocklistIn, BlocklistOut
from moderation.submissions.models import SubmissionStatus
from moderation.submissions.repository import SubmissionRepository
from moderation.tenants.models import Tenant
from moderation.tenants.repository import TenantRepository


def blocklist_limits(settings: Settings) -> BlocklistLimits:
    """Blocklist limits from the settings."""
    return BlocklistLimits(
        max_terms=settings.blocklist_max_terms,
        max_patterns=settings.blocklist_max_patterns,
        max_pattern_chars=settings.blocklist_pattern_max_chars,
        timeout_ms=settings.blocklist_regex_timeout_ms,
    )


def blocklist_for(tenant: Tenant, settings: Settings) -> Blocklist:
    """The tenant's blocklist, ready for matching."""
    return Blocklist.from_policy(tenant.policy, timeout_ms=settings.blocklist_regex_timeout_ms)


def get_blocklist(tenant: Tenant) -> BlocklistOut:
    """The tenant's blocklist as stored."""
    data = (tenant.policy or {}).get("blocklist") or {}
    return BlocklistOut(
        terms=list(data.get("terms", [])),
        patterns=list(data.get("patterns", [])),
        policy_version=tenant.policy_version,
    )


def read_blocklist(session: Session, tenant_id: uuid.UUID) -> BlocklistOut:
    """The tenant's blocklist as stored now (not as a cached tenant object remembers it)."""
    tenant = session.get(Tenant, tenant_id, populate_existing=True)
    if tenant is None:
        raise NotFound("tenant not found", code="tenant_not_found")
    return get_blocklist(tenant)


def set_blocklist(
    session: Session, tenant_id: uuid.UUID, update: BlocklistIn, settings: Settings
) -> BlocklistOut:
    """Validate and replace the tenant's blocklist; bumps the policy version (so cached verdicts expire)."""
    clean = validate_blocklist(update.terms, update.patterns, blocklist_limits(settings))
    tenant = TenantRepository(session).get(tenant_id, for_update=True)
    if tenant is None:
        raise NotFound("tenant not found", code="tenant_not_found")
    tenant.policy = {**(tenant.policy or {}), "blocklist": clean}
    tenant.policy_version += 1
    session.flush()
    return get_blocklist(tenant)


def add_known_image(
    session: Session,
    tenant: Tenant,
    submission_id: uuid.UUID,
    *,
    label: str,
    created_by: str,
    blob_store: BlobStore,
) -> KnownImage:
    """Add the image of one of the tenant's reviewed submissions to its known images."""
    label = " ".join(label.split())[:200]
    if not label:
        raise InvalidInput("a known image needs a label", code="invalid_label")
    submission = SubmissionRepository(session).get(submission_id, tenant_id=tenant.id)
    if submission is None:
        raise NotFound("submission not found", code="submission_not_found")
    if submission.status != SubmissionStatus.reviewed:
        raise Conflict(
            f"only a reviewed submission can become a known image; this one is {submission.status}",
            code="submission_not_reviewed",
        )
    if submission.erased_at is not None:
        raise Conflict("the platform erased this submission's image", code="submission_erased")
    with Image.open(io.BytesIO(blob_store.get(submission.image_sha256))) as image:
        hashes = image_hashes(image)
    known = KnownImageRepository(session).add(
        KnownImage(
            id=new_id(),
            tenant_id=tenant.id,
            phash=to_signed(hashes.phash),
            dhash=to_signed(hashes.dhash),
            image_sha256=submission.image_sha256,
            label=label,
            source_submission_id=submission.id,
            created_by=created_by,
            created_at=utcnow(),
        )
    )
    if known is None:
        raise Conflict("this image is already a known image of the tenant", code="known_image_exists")
    return known


def list_known_images(session: Session, tenant: Tenant) -> list[KnownImage]:
    """The tenant's known images, newest first."""
    return KnownImageRepository(session).list(tenant.id)


def get_known_image(session: Session, tenant: Tenant, known_image_id: uuid.UUID) -> KnownImage:
    """One of the tenant's known images; NotFound when it has no such image."""
    known = KnownImageRepository(session).get(known_image_id, tenant.id)
    if known is None:
        raise NotFound("known image not found", code="known_image_not_found")
    return known


def remove_known_image(session: Session, tenant: Tenant, known_image_id: uuid.UUID) -> None:
    """Remove one of the tenant's known images."""
    if not KnownImageRepository(session).delete(known_image_id, tenant.id):
        raise NotFound("known image not found", code="known_image_not_found")


def find_known_image(
    session: Session, tenant_id: uuid.UUID, hashes: ImageHashes, settings: Settings
) -> KnownImageMatch | None:
    """The tenant's known image this image is a near-duplicate of, if any."""
    nearest = KnownImageRepository(session).nearest(
        tenant_id,
        hashes,
        max_phash=settings.known_image_max_distance,
        max_dhash=settings.known_image_dhash_max_distance,
    )
    if nearest is None:
        return None
    return KnownImageMatch(
        known_image_id=nearest.known_image.id,
        label=nearest.known_image.label,
        source_submission_id=nearest.known_image.source_submission_id,
        phash_distance=nearest.phash_distance,
        dhash_distance=nearest.dhash_distance,
    )
