"""Webhook endpoint registration (``/v1/webhook-endpoints``)."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Response

from api.deps import SessionDep, SettingsDep, TenantDep
from moderation.errors import NotFound
from moderation.webhooks import service
from moderation.webhooks.repository import WebhookRepository
from moderation.webhooks.schemas import WebhookEndpointCreate, WebhookEndpointOut

router = APIRouter(prefix="/v1/webhook-endpoints", tags=["webhooks"])


@router.post("", status_code=201, response_model=WebhookEndpointOut)
def create_endpoint(
    data: WebhookEndpointCreate, tenant: TenantDep, session: SessionDep, settings: SettingsDep
) -> WebhookEndpointOut:
    """Register an endpoint; the answer carries its signing secret, shown only this once."""
    endpoint = service.create_endpoint(session, tenant, data, settings)
    session.commit()
    return WebhookEndpointOut.from_model(endpoint, include_secret=True)


@router.get("", response_model=list[WebhookEndpointOut])
def list_endpoints(tenant: TenantDep, session: SessionDep) -> list[WebhookEndpointOut]:
    """The tenant's endpoints."""
    return [WebhookEndpointOut.from_model(e) for e in WebhookRepository(session).list_endpoints(tenant.id)]


@router.delete("/{endpoint_id}", status_code=204)
def delete_endpoint(endpoint_id: str, tenant: TenantDep, session: SessionDep) -> Response:
    """Remove an endpoint."""
    try:
        parsed = uuid.UUID(endpoint_id)
    except ValueError as exc:
        raise NotFound("webhook endpoint not found", code="webhook_endpoint_not_found") from exc
    service.delete_endpoint(session, tenant, parsed)
    session.commit()
    return Response(status_code=204)
