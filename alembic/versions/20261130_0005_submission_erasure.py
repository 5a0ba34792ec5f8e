"""submissions: erasure and retention (erased_at, image_released_at and their indexes)

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30 23:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("submissions", sa.Column("erased_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("submissions", sa.Column("image_released_at", sa.DateTime(timezone=True), nullable=True))
    # Built without locking intake out of a large table (CONCURRENTLY cannot run inside a transaction).
    with op.get_context().autocommit_block():
        op.create_index(
            "ix_submissions_image_sha256",
            "submissions",
            ["image_sha256"],
            postgresql_concurrently=True,
            if_not_exists=True,
        )
        op.create_index(
            "ix_submissions_unerased_created",
            "submissions",
            ["created_at"],
            postgresql_where=sa.text("erased_at IS NULL"),
            postgresql_concurrently=True,
            if_not_exists=True,
        )
        op.create_index(
            "ix_submissions_image_unreleased",
            "submissions",
            ["erased_at"],
            postgresql_where=sa.text("erased_at IS NOT NULL AND image_released_at IS NULL"),
            postgresql_concurrently=True,
            if_not_exists=True,
        )


def downgrade() -> None:
    with op.get_context().autocommit_block():
        for name in (
            "ix_submissions_image_unreleased",
            "ix_submissions_unerased_created",
            "ix_submissions_image_sha256",
        ):
            op.drop_index(name, table_name="submissions", postgresql_concurrently=True, if_exists=True)
    op.drop_column("submissions", "image_released_at")
    op.drop_column("submissions", "erased_at")
