"""The calling tenant's own settings (``/v1/tenant``)."""

from __future__ import annotations

from fastapi import APIRouter

from api.deps import SessionDep, TenantDep
from moderation.tenants.schemas import TenantSettingsOut, TenantSettingsUpdate
from moderation.tenants.service import change_settings

router = APIRouter(prefix="/v1/tenant", tags=["tenant"])


@router.get("", response_model=TenantSettingsOut)
def get_tenant_settings(tenant: TenantDep) -> TenantSettingsOut:
    """Thresholds, custom categories and retention period of the calling tenant."""
    return TenantSettingsOut.from_model(tenant)


@router.patch("", response_model=TenantSettingsOut)
def patch_tenant_settings(
    update: TenantSettingsUpdate, tenant: TenantDep, session: SessionDep
) -> TenantSettingsOut:
    """Change thresholds, custom categories or the retention period; new verdicts use them at once."""
    row = change_settings(session, tenant.id, update, f"tenant:{tenant.name}")
    session.commit()
    return TenantSettingsOut.from_model(row)
