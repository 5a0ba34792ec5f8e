"""Administrative changes made from the review UI: tenants' routing thresholds and custom categories."""

from __future__ import annotations

import uuid

from sqlalchemy.orm import Session

from moderation.audit import service as audit
from moderation.errors import NotFound
from moderation.reviewers.models import Role
from moderation.reviewers.schemas import ReviewerRef
from moderation.tenants.models import Tenant
from moderation.tenants.repository import TenantRepository
from moderation.tenants.schemas import TenantSettingsOut, TenantSettingsUpdate
from moderation.tenants.service import update_settings


def list_tenants(session: Session, actor: ReviewerRef) -> list[Tenant]:
    """Every tenant (admins)."""
    actor.require(Role.admin, "manage tenants")
    return TenantRepository(session).list()


def update_tenant_settings(
    session: Session, actor: ReviewerRef, tenant_id: uuid.UUID, update: TenantSettingsUpdate
) -> Tenant:
    """Change a tenant's thresholds or categories (admins); audited with the settings before and after."""
    actor.require(Role.admin, "manage tenants")
    tenant = TenantRepository(session).get(tenant_id, for_update=True)
    if tenant is None:
        raise NotFound("tenant not found", code="tenant_not_found")
    before = TenantSettingsOut.from_model(tenant).model_dump(mode="json")
    update_settings(tenant, update)
    session.flush()
    after = TenantSettingsOut.from_model(tenant).model_dump(mode="json")
    old, new = audit.changed(before, after)
    audit.record(
        session,
        actor.email,
        "tenant.settings",
        audit.subject("tenant", tenant.name),
        old,
        new,
        tenant_id=tenant.id,
    )
    return tenant
