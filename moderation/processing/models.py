"""The verdict cache: which verdicts may be reused, and which verdicts were copies."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import DateTime, ForeignKey, String
from sqlalchemy.orm import Mapped, mapped_column

from moderation.db import Base


class VerdictCacheEntry(Base):
    """Cache bookkeeping of one verdict: its cache key if the engine made it, its source if it is a copy."""

    __tablename__ = "verdict_cache"

    verdict_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("verdicts.id", ondelete="CASCADE"), primary_key=True
    )
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    # SHA-256 of tenant, image bytes, caption, policy version and model; only on engine-made verdicts.
    cache_key: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    cached_from_verdict_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("verdicts.id", ondelete="SET NULL"), nullable=True
    )
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
