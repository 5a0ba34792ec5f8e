"""Shapes of reviewer identities as the rest of the service sees them."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

from pydantic import BaseModel

from moderation.errors import ModerationError
from moderation.reviewers.models import Reviewer, Role


class Forbidden(ModerationError):
    """The reviewer is signed in but their role does not allow this."""

    code = "forbidden"
    status_code = 403


@dataclass(frozen=True)
class ReviewerRef:
    """Who is acting: a reviewer's email and role (``role=None`` is a trusted internal caller)."""

    email: str
    role: Role | None = None
    id: uuid.UUID | None = None
    display_name: str = ""

    @classmethod
    def of(cls, reviewer: ReviewerRef | Reviewer | str) -> ReviewerRef:
        """Normalise a reviewer given as a ref, an ORM row or a bare email."""
        if isinstance(reviewer, ReviewerRef):
            return reviewer
        if isinstance(reviewer, Reviewer):
            return cls(
                email=reviewer.email, role=reviewer.role, id=reviewer.id, display_name=reviewer.display_name
            )
        return cls(email=reviewer)

    def can(self, role: Role) -> bool:
        """Whether this reviewer has at least ``role``."""
        return self.role is None or self.role.rank >= role.rank

    def require(self, role: Role, what: str) -> None:
        """Raise Forbidden unless this reviewer has at least ``role``."""
        if not self.can(role):
            raise Forbidden(f"only a {role.value} or above may {what}", code="forbidden")

    @property
    def name(self) -> str:
        """The display name, or the email."""
        return self.display_name or self.email


class ReviewerOut(BaseModel):
    """A reviewer account as the API shows it."""

    id: uuid.UUID
    email: str
    display_name: str
    role: str
    active: bool
    locked_until: datetime | None
    last_login_at: datetime | None

    @classmethod
    def from_model(cls, reviewer: Reviewer) -> ReviewerOut:
        """Build from the ORM row."""
        return cls(
            id=reviewer.id,
            email=reviewer.email,
            display_name=reviewer.display_name,
            role=reviewer.role.value,
            active=reviewer.active,
            locked_until=reviewer.locked_until,
            last_login_at=reviewer.last_login_at,
        )
