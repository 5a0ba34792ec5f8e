"""Administrative changes made from the review UI: tenants' thresholds, categories, blocklists, known images."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy.orm import Session

from moderation.audit import service as audit
from moderation.blobs import BlobStore
from moderation.config import Settings
from moderation.errors import NotFound
from moderation.policy import service as policy
from moderation.policy.models import KnownImage
from moderation.policy.schemas import BlocklistIn, BlocklistOut, KnownImageOut
from moderation.reviewers.models import Role
from moderation.reviewers.schemas import ReviewerRef
from moderation.tenants.models import Tenant
from moderation.tenants.repository import TenantRepository
from moderation.tenants.schemas import TenantSettingsUpdate
from moderation.tenants.service import change_settings


def list_tenants(session: Session, actor: ReviewerRef) -> list[Tenant]:
    """Every tenant (admins)."""
    actor.require(Role.admin, "manage tenants")
    return TenantRepository(session).list()


def _tenant(session: Session, tenant_id: uuid.UUID, *, for_update: bool = False) -> Tenant:
    tenant = TenantRepository(session).get(tenant_id, for_update=for_update)
    if tenant is None:
        raise NotFound("tenant not found", code="tenant_not_found")
    return tenant


def update_tenant_settings(
    session: Session, actor: ReviewerRef, tenant_id: uuid.UUID, update: TenantSettingsUpdate
) -> Tenant:
    """Change a tenant's thresholds or categories (admins); audited with the settings before and after."""
    actor.require(Role.admin, "manage tenants")
    return change_settings(session, tenant_id, update, actor.email)


def known_images_by_tenant(
    session: Session, actor: ReviewerRef, tenants: list[Tenant]
) -> dict[uuid.UUID, list[KnownImage]]:
    """The known images of each of these tenants, newest first (admins)."""
    actor.require(Role.admin, "manage tenants")
    return {t.id: policy.list_known_images(session, t) for t in tenants}


def set_tenant_blocklist(
    session: Session, actor: ReviewerRef, tenant_id: uuid.UUID, update: BlocklistIn, settings: Settings
) -> tuple[Tenant, BlocklistOut]:
    """Validate and replace a tenant's blocklist (admins); audited with the entries before and after."""
    actor.require(Role.admin, "manage tenants")
    tenant = _tenant(session, tenant_id, for_update=True)
    before = policy.get_blocklist(tenant).model_dump(mode="json")
    out = policy.set_blocklist(session, tenant.id, update, settings)
    old, new = audit.changed(before, out.model_dump(mode="json"))
    audit.record(
        session,
        actor.email,
        "tenant.blocklist",
        audit.subject("tenant", tenant.name),
        old,
        new,
        tenant_id=tenant.id,
    )
    return tenant, out


def _known_image_state(known: KnownImage) -> dict[str, Any]:
    return KnownImageOut.from_model(known).model_dump(mode="json", exclude={"id"})


def add_tenant_known_image(
    session: Session,
    actor: ReviewerRef,
    tenant_id: uuid.UUID,
    submission_id: uuid.UUID,
    *,
    label: str,
    blob_store: BlobStore,
) -> tuple[Tenant, KnownImage]:
    """Add a reviewed submission's image to a tenant's known images (admins); audited."""
    actor.require(Role.admin, "manage tenants")
    tenant = _tenant(session, tenant_id)
    known = policy.add_known_image(
        session, tenant, submission_id, label=label, created_by=actor.email, blob_store=blob_store
    )
    audit.record(
        session,
        actor.email,
        "tenant.known_image_add",
        audit.subject("known_image", known.id),
        None,
        {"tenant": tenant.name, **_known_image_state(known)},
        submission_id=known.source_submission_id,
        tenant_id=tenant.id,
    )
    return tenant, known


def remove_tenant_known_image(
    session: Session, actor: ReviewerRef, tenant_id: uuid.UUID, known_image_id: uuid.UUID
) -> tuple[Tenant, str]:
    """Remove one of a tenant's known images (admins); audited with the image as it was; returns its label."""
    actor.require(Role.admin, "manage tenants")
    tenant = _tenant(session, tenant_id)
    known = policy.get_known_image(session, tenant, known_image_id)
    before = {"tenant": tenant.name, **_known_image_state(known)}
    source = known.source_submission_id
    policy.remove_known_image(session, tenant, known_image_id)
    audit.record(
        session,
        actor.email,
        "tenant.known_image_remove",
        audit.subject("known_image", known_image_id),
        before,
        None,
        submission_id=source,
        tenant_id=tenant.id,
    )
    return tenant, str(before["label"])
