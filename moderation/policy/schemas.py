"""Public JSON shapes of a tenant's blocklist and known images."""

from __future__ import annotations

import uuid
from datetime import datetime

from pydantic import BaseModel, Field

from moderation.policy.models import KnownImage
from moderation.policy.perceptual import to_unsigned


class BlocklistIn(BaseModel):
    """The whole blocklist of a tenant: terms and regular expressions (replaces the previous one)."""

    terms: list[str] = Field(default_factory=list)
    patterns: list[str] = Field(default_factory=list)


class BlocklistOut(BaseModel):
    """A tenant's blocklist and the policy version it belongs to."""

    terms: list[str]
    patterns: list[str]
    policy_version: int


class KnownImageCreate(BaseModel):
    """Add the image of a reviewed submission to the tenant's known images."""

    submission_id: uuid.UUID
    label: str = Field(min_length=1, max_length=200)


class KnownImageOut(BaseModel):
    """A known image: its hashes, label and where it came from."""

    id: uuid.UUID
    label: str
    phash: str
    dhash: str
    image_sha256: str
    source_submission_id: uuid.UUID | None
    created_by: str
    created_at: datetime

    @classmethod
    def from_model(cls, known: KnownImage) -> KnownImageOut:
        """Build from the ORM row."""
        return cls(
            id=known.id,
            label=known.label,
            phash=f"{to_unsigned(known.phash):016x}",
            dhash=f"{to_unsigned(known.dhash):016x}",
            image_sha256=known.image_sha256,
            source_submission_id=known.source_submission_id,
            created_by=known.created_by,
            created_at=known.created_at,
        )
