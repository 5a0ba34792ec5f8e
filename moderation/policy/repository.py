"""SQL for known images."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import cast, delete, func, select
from sqlalchemy.dialects.postgresql import BIT, insert
from sqlalchemy.orm import Session

from moderation.policy.models import KnownImage
from moderation.policy.perceptual import ImageHashes, to_signed


@dataclass(frozen=True)
class NearestKnownImage:
    """A known image close to a probe image, with both Hamming distances."""

    known_image: KnownImage
    phash_distance: int
    dhash_distance: int


class KnownImageRepository:
    """Reads and writes a tenant's known images."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def add(self, known: KnownImage) -> KnownImage | None:
        """Insert a known image unless the tenant already has one for these bytes; None when it does."""
        values = {c.key: getattr(known, c.key) for c in KnownImage.__table__.columns}
        stmt = (
            insert(KnownImage)
            .values(**values)
            .on_conflict_do_nothing(index_elements=[KnownImage.tenant_id, KnownImage.image_sha256])
            .returning(KnownImage.id)
        )
        new_id = self.session.scalar(stmt)
        return None if new_id is None else self.session.get(KnownImage, new_id)

    def get(self, known_image_id: uuid.UUID, tenant_id: uuid.UUID) -> KnownImage | None:
        """One of the tenant's known images."""
        return self.session.scalar(
            select(KnownImage).where(KnownImage.id == known_image_id, KnownImage.tenant_id == tenant_id)
        )

    def list(self, tenant_id: uuid.UUID, *, limit: int = 1000) -> list[KnownImage]:
        """The tenant's known images, newest first."""
        stmt = (
            select(KnownImage)
            .where(KnownImage.tenant_id == tenant_id)
            .order_by(KnownImage.created_at.desc(), KnownImage.id.desc())
            .limit(limit)
        )
        return list(self.session.scalars(stmt))

    def delete(self, known_image_id: uuid.UUID, tenant_id: uuid.UUID) -> bool:
        """Remove one of the tenant's known images; True when it existed."""
        result = self.session.execute(
            delete(KnownImage).where(KnownImage.id == known_image_id, KnownImage.tenant_id == tenant_id)
        )
        return bool(result.rowcount)  # type: ignore[attr-defined]

    def tenants_with_known_images(self, tenant_ids: Iterable[uuid.UUID]) -> set[uuid.UUID]:
        """Which of these tenants have any known image."""
        ids = list(tenant_ids)
        if not ids:
            return set()
        stmt = select(KnownImage.tenant_id).where(KnownImage.tenant_id.in_(ids)).distinct()
        return set(self.session.scalars(stmt))

    def nearest(
        self, tenant_id: uuid.UUID, hashes: ImageHashes, *, max_phash: int, max_dhash: int
    ) -> NearestKnownImage | None:
        """The tenant's known image nearest to ``hashes`` within both Hamming limits, if any."""
        phash_distance = func.bit_count(cast(KnownImage.phash.op("#")(to_signed(hashes.phash)), BIT(64)))
        dhash_distance = func.bit_count(cast(KnownImage.dhash.op("#")(to_signed(hashes.dhash)), BIT(64)))
        stmt = (
            select(KnownImage, phash_distance.label("pd"), dhash_distance.label("dd"))
            .where(
                KnownImage.tenant_id == tenant_id,
                phash_distance <= max_phash,
                dhash_distance <= max_dhash,
            )
            .order_by(phash_distance + dhash_distance, KnownImage.created_at)
            .limit(1)
        )
        row = self.session.execute(stmt).first()
        if row is None:
            return None
        return NearestKnownImage(known_image=row[0], phash_distance=int(row[1]), dhash_distance=int(row[2]))
