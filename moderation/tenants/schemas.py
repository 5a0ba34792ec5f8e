"""Public JSON shapes of a tenant's own settings."""

from __future__ import annotations

import uuid

from pydantic import BaseModel, Field

from moderation.tenants.models import Tenant


class CustomCategory(BaseModel):
    """A tenant-defined policy category with its one-line definition."""

    name: str
    definition: str


class TenantSettingsOut(BaseModel):
    """A tenant's routing thresholds and policy."""

    id: uuid.UUID
    name: str
    block_threshold: float
    allow_threshold: float
    min_confidence: float
    category_block_threshold: float
    category_review_threshold: float
    rate_limit_per_minute: int | None
    categories: list[CustomCategory]
    policy_version: int
    retention_days: int | None = Field(
        description="Days after which a final submission is erased; null: the service's default, 0: keep all"
    )

    @classmethod
    def from_model(cls, tenant: Tenant) -> TenantSettingsOut:
        """Build from the ORM row."""
        return cls(
            id=tenant.id,
            name=tenant.name,
            block_threshold=tenant.block_threshold,
            allow_threshold=tenant.allow_threshold,
            min_confidence=tenant.min_confidence,
            category_block_threshold=tenant.category_block_threshold,
            category_review_threshold=tenant.category_review_threshold,
            rate_limit_per_minute=tenant.rate_limit_per_minute,
            categories=[CustomCategory(**c) for c in (tenant.policy or {}).get("categories", [])],
            policy_version=tenant.policy_version,
            retention_days=tenant.retention_days,
        )


class TenantSettingsUpdate(BaseModel):
    """A partial update of a tenant's thresholds, custom categories and retention period."""

    block_threshold: float | None = Field(default=None, ge=0, le=1)
    allow_threshold: float | None = Field(default=None, ge=0, le=1)
    min_confidence: float | None = Field(default=None, ge=0, le=1)
    category_block_threshold: float | None = Field(default=None, ge=0, le=1)
    category_review_threshold: float | None = Field(default=None, ge=0, le=1)
    categories: list[CustomCategory] | None = None
    # Sent as null, the tenant goes back to the service's default; left out, it stays as it is.
    retention_days: int | None = Field(default=None, ge=0, le=36500, strict=True)  # `true` is no period
