"""Creating tenants, issuing API keys and authenticating requests."""

from __future__ import annotations

import hashlib
import secrets
import uuid
from dataclasses import dataclass

from sqlalchemy.orm import Session

from moderation.audit import service as audit
from moderation.config import Settings, get_settings
from moderation.db import utcnow
from moderation.errors import Conflict, InvalidInput, NotFound, Unauthorized
from moderation.tenants.models import ApiKey, Tenant
from moderation.tenants.repository import TenantRepository
from moderation.tenants.schemas import TenantSettingsOut, TenantSettingsUpdate

KEY_PREFIX = "mod_"


@dataclass(frozen=True)
class IssuedKey:
    """A freshly issued API key: the secret is shown once and never stored."""

    tenant: Tenant
    key: str


def hash_api_key(key: str) -> str:
    """SHA-256 of an API key; keys are 256-bit random, so a fast hash is safe and keeps auth cheap."""
    return hashlib.sha256(key.encode()).hexdigest()


def create_tenant(session: Session, name: str, settings: Settings | None = None) -> IssuedKey:
    """Create a tenant with default thresholds and issue its first API key."""
    settings = settings or get_settings()
    name = name.strip()
    if not name or len(name) > 200:
        raise InvalidInput("tenant name must be 1 to 200 characters", code="invalid_tenant_name")
    repo = TenantRepository(session)
    if repo.get_by_name(name) is not None:
        raise Conflict(f"tenant {name!r} already exists", code="tenant_exists")
    tenant = repo.add(
        Tenant(
            name=name,
            block_threshold=settings.default_block_threshold,
            allow_threshold=settings.default_allow_threshold,
            min_confidence=settings.default_min_confidence,
            category_block_threshold=0.95,
            category_review_threshold=0.6,
            policy={},
            policy_version=1,
        )
    )
    return IssuedKey(tenant=tenant, key=issue_api_key(session, tenant))


def issue_api_key(session: Session, tenant: Tenant, label: str | None = None) -> str:
    """Issue a new API key for a tenant and return it; only its hash is stored."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    TenantRepository(session).add_key(
        ApiKey(
            tenant_id=tenant.id, prefix=key[:12], key_hash=hash_api_key(key), label=label, created_at=utcnow()
        )
    )
    return key


def authenticate(session: Session, authorization: str | None) -> Tenant:
    """The tenant of a ``Bearer`` API key, or Unauthorized."""
    if not authorization:
        raise Unauthorized("missing Authorization header; use 'Authorization: Bearer <api key>'")
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("Authorization must be 'Bearer <api key>'")
    tenant = TenantRepository(session).tenant_for_key_hash(hash_api_key(token))
    if tenant is None:
        raise Unauthorized("invalid API key")
    return tenant


def change_settings(
    session: Session, tenant_id: uuid.UUID, update: TenantSettingsUpdate, actor: str
) -> Tenant:
    """Change a tenant's settings under a row lock; audited with what changed, before and after, as ``actor``."""
    tenant = TenantRepository(session).get(tenant_id, for_update=True)
    if tenant is None:
        raise NotFound("tenant not found", code="tenant_not_found")
    before = TenantSettingsOut.from_model(tenant).model_dump(mode="json")
    update_settings(tenant, update)
    session.flush()
    old, new = audit.changed(before, TenantSettingsOut.from_model(tenant).model_dump(mode="json"))
    audit.record(
        session, actor, "tenant.settings", audit.subject("tenant", tenant.name), old, new, tenant_id=tenant.id
    )
    return tenant


def update_settings(tenant: Tenant, update: TenantSettingsUpdate) -> Tenant:
    """Apply a partial settings update, keeping allow <= block; bumps the policy version unless only retention."""
    from moderation.policy.categories import validate_custom_categories

    block = _pick(update.block_threshold, tenant.block_threshold)
    allow = _pick(update.allow_threshold, tenant.allow_threshold)
    if allow > block:
        raise InvalidInput("allow_threshold must not exceed block_threshold", code="invalid_threshold")
    cat_block = _pick(update.category_block_threshold, tenant.category_block_threshold)
    cat_review = _pick(update.category_review_threshold, tenant.category_review_threshold)
    if cat_review > cat_block:
        raise InvalidInput(
            "category_review_threshold must not exceed category_block_threshold", code="invalid_threshold"
        )
    tenant.block_threshold, tenant.allow_threshold = block, allow
    tenant.category_block_threshold, tenant.category_review_threshold = cat_block, cat_review
    tenant.min_confidence = _pick(update.min_confidence, tenant.min_confidence)
    if update.categories is not None:
        categories = validate_custom_categories([c.model_dump() for c in update.categories])
        tenant.policy = {**(tenant.policy or {}), "categories": categories}
    if "retention_days" in update.model_fields_set:
        tenant.retention_days = update.retention_days
    if update.model_fields_set != {"retention_days"}:  # how long content is kept changes no verdict
        tenant.policy_version += 1
    return tenant


def _pick(new: float | None, old: float) -> float:
    return old if new is None else new
