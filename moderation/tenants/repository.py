"""SQL for tenants and API keys."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from moderation.tenants.models import ApiKey, Tenant


@dataclass(frozen=True)
class RetentionPeriod:
    """A tenant's own retention period: days, or None for the service's default."""

    days: int | None


class TenantRepository:
    """Reads and writes tenants and their keys."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def get(self, tenant_id: uuid.UUID, *, for_update: bool = False) -> Tenant | None:
        """The tenant with this id, if any, optionally row-locked."""
        return self.session.get(Tenant, tenant_id, with_for_update=for_update, populate_existing=for_update)

    def get_by_name(self, name: str) -> Tenant | None:
        """The tenant with this name, if any."""
        return self.session.scalar(select(Tenant).where(Tenant.name == name))

    def list(self) -> list[Tenant]:
        """All tenants by name."""
        return list(self.session.scalars(select(Tenant).order_by(Tenant.name)))

    def retention_days(self) -> Sequence[tuple[uuid.UUID, int | None]]:
        """Every tenant's id and own retention period (None: the service's default), by id."""
        stmt = select(Tenant.id, Tenant.retention_days).order_by(Tenant.id)
        return [(row.id, row.retention_days) for row in self.session.execute(stmt)]

    def retention_days_of(self, tenant_id: uuid.UUID) -> RetentionPeriod | None:
        """A tenant's own retention period, its row share-locked until the transaction ends; None if gone.

        A share lock waits for a settings change in progress, and does not hold up intake (whose foreign
        key checks take a weaker lock).
        """
        stmt = select(Tenant.retention_days).where(Tenant.id == tenant_id).with_for_update(read=True)
        row = self.session.execute(stmt).first()
        return None if row is None else RetentionPeriod(row.retention_days)

    def add(self, tenant: Tenant) -> Tenant:
        """Insert a tenant."""
        self.session.add(tenant)
        self.session.flush()
        return tenant

    def add_key(self, key: ApiKey) -> ApiKey:
        """Insert an API key."""
        self.session.add(key)
        self.session.flush()
        return key

    def tenant_for_key_hash(self, key_hash: str) -> Tenant | None:
        """The tenant owning a live (unrevoked) key with this hash."""
        stmt = (
            select(Tenant)
            .join(ApiKey, ApiKey.tenant_id == Tenant.id)
            .where(ApiKey.key_hash == key_hash, ApiKey.revoked_at.is_(None))
        )
        return self.session.scalar(stmt)
