"""Request-scoped dependencies: the database session and the authenticated tenant."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Header, Request
from sqlalchemy.orm import Session

from moderation.config import Settings
from moderation.tenants.models import Tenant
from moderation.tenants.service import authenticate, hash_api_key


async def get_settings_dep(request: Request) -> Settings:
    """The app's settings."""
    settings: Settings = request.app.state.settings
    return settings


def get_session(request: Request) -> Iterator[Session]:
    """A session for this request; handlers that write commit it themselves, before they answer."""
    session: Session = request.app.state.sessions()
    try:
        yield session
    finally:
        session.close()


class TenantCache:
    """Remembers authenticated tenants for a few seconds so intake does not query keys on every request."""

    def __init__(self, ttl_seconds: float = 10.0, max_entries: int = 10_000) -> None:
        self.ttl = ttl_seconds
        self.max_entries = max_entries
        self._entries: dict[str, tuple[float, Tenant]] = {}

    def get(self, key_hash: str) -> Tenant | None:
        """A cached tenant, if still fresh."""
        entry = self._entries.get(key_hash)
        if entry is None or entry[0] < time.monotonic():
            return None
        return entry[1]

    def put(self, key_hash: str, tenant: Tenant) -> None:
        """Remember a tenant for the TTL."""
        if len(self._entries) >= self.max_entries:
            self._entries.clear()
        self._entries[key_hash] = (time.monotonic() + self.ttl, tenant)


def _key_hash(authorization: str | None) -> str:
    """The cache key of a ``Bearer`` header; empty (not cacheable) for anything else."""
    scheme, _, token = (authorization or "").partition(" ")
    token = token.strip()
    # Only what ``authenticate`` would accept may be answered from the cache: another scheme is a 401.
    return hash_api_key(token) if token and scheme.lower() == "bearer" else ""


def cached_tenant(request: Request, authorization: str | None) -> Tenant | None:
    """The detached tenant of an Authorization header authenticated in the last few seconds, else None."""
    key_hash = _key_hash(authorization)
    cache: TenantCache = request.app.state.tenant_cache
    return cache.get(key_hash) if key_hash else None


def resolve_tenant(request: Request, session: Session, authorization: str | None) -> Tenant:
    """The tenant of an Authorization header, attached to ``session``; cached for a few seconds."""
    cache: TenantCache = request.app.state.tenant_cache
    key_hash = _key_hash(authorization)
    if key_hash and (cached := cache.get(key_hash)) is not None:
        return session.merge(cached, load=False)
    tenant = authenticate(session, authorization)
    session.expunge(tenant)
    cache.put(key_hash, tenant)
    return session.merge(tenant, load=False)


def get_tenant(
    request: Request,
    session: Annotated[Session, Depends(get_session)],
    authorization: Annotated[str | None, Header()] = None,
) -> Tenant:
    """The tenant of the request's API key, or 401."""
    return resolve_tenant(request, session, authorization)


SessionDep = Annotated[Session, Depends(get_session)]
TenantDep = Annotated[Tenant, Depends(get_tenant)]
SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
