"""policy lists and verdict cache

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25 10:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "known_images",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("tenant_id", sa.Uuid(), nullable=False),
        sa.Column("phash", sa.BigInteger(), nullable=False),
        sa.Column("dhash", sa.BigInteger(), nullable=False),
        sa.Column("image_sha256", sa.String(length=64), nullable=False),
        sa.Column("label", sa.String(length=200), nullable=False),
        sa.Column("source_submission_id", sa.Uuid(), nullable=True),
        sa.Column("created_by", sa.String(length=320), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["source_submission_id"],
            ["submissions.id"],
            name=op.f("fk_known_images_source_submission_id_submissions"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name=op.f("fk_known_images_tenant_id_tenants"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_known_images")),
        sa.UniqueConstraint("tenant_id", "image_sha256", name=op.f("uq_known_images_tenant_id_image_sha256")),
    )
    op.create_index(op.f("ix_known_images_tenant_id"), "known_images", ["tenant_id"], unique=False)
    op.create_table(
        "verdict_cache",
        sa.Column("verdict_id", sa.Uuid(), nullable=False),
        sa.Column("tenant_id", sa.Uuid(), nullable=False),
        sa.Column("cache_key", sa.String(length=64), nullable=True),
        sa.Column("cached_from_verdict_id", sa.Uuid(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["cached_from_verdict_id"],
            ["verdicts.id"],
            name=op.f("fk_verdict_cache_cached_from_verdict_id_verdicts"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name=op.f("fk_verdict_cache_tenant_id_tenants"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["verdict_id"],
            ["verdicts.id"],
            name=op.f("fk_verdict_cache_verdict_id_verdicts"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("verdict_id", name=op.f("pk_verdict_cache")),
    )
    op.create_index(op.f("ix_verdict_cache_cache_key"), "verdict_cache", ["cache_key"], unique=False)
    op.create_index(op.f("ix_verdict_cache_tenant_id"), "verdict_cache", ["tenant_id"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_verdict_cache_tenant_id"), table_name="verdict_cache")
    op.drop_index(op.f("ix_verdict_cache_cache_key"), table_name="verdict_cache")
    op.drop_table("verdict_cache")
    op.drop_index(op.f("ix_known_images_tenant_id"), table_name="known_images")
    op.drop_table("known_images")
