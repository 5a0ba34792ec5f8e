"""Public JSON shapes of webhook endpoints and deliveries."""

from __future__ import annotations

import uuid
from datetime import datetime

from pydantic import BaseModel, Field

from moderation.text import StorableText
from moderation.webhooks.models import WebhookEndpoint


class WebhookEndpointCreate(BaseModel):
    """A request to register a webhook endpoint."""

    url: str = Field(max_length=2048)
    events: list[str] = Field(min_length=1)
    description: StorableText | None = Field(default=None, max_length=500)


class WebhookEndpointOut(BaseModel):
    """A registered webhook endpoint; the secret is shown only when it is created."""

    id: uuid.UUID
    url: str
    events: list[str]
    enabled: bool
    description: str | None
    secret: str | None = None
    created_at: datetime

    @classmethod
    def from_model(cls, endpoint: WebhookEndpoint, *, include_secret: bool = False) -> WebhookEndpointOut:
        """Build from the ORM row."""
        return cls(
            id=endpoint.id,
            url=endpoint.url,
            events=list(endpoint.events),
            enabled=endpoint.enabled,
            description=endpoint.description,
            secret=endpoint.secret if include_secret else None,
            created_at=endpoint.created_at,
        )
