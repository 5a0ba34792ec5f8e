"""Known images: perceptual hashes of images a tenant wants blocked on sight."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import BigInteger, DateTime, ForeignKey, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from moderation.db import Base, new_id


class KnownImage(Base):
    """A tenant's known image: its pHash and dHash, a label and the reviewed submission it came from."""

    __tablename__ = "known_images"
    __table_args__ = (UniqueConstraint("tenant_id", "image_sha256"),)

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    # Unsigned 64-bit hashes stored as signed bigint (see perceptual.to_signed).
    phash: Mapped[int] = mapped_column(BigInteger)
    dhash: Mapped[int] = mapped_column(BigInteger)
    image_sha256: Mapped[str] = mapped_column(String(64))
    label: Mapped[str] = mapped_column(String(200))
    source_submission_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("submissions.id", ondelete="SET NULL"), nullable=True
    )
    created_by: Mapped[str] = mapped_column(String(320))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
