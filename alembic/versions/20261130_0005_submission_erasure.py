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


_INDEXES = (
    ("ix_submissions_image_sha256", "(image_sha256)", ""),
    ("ix_submissions_unerased_created", "(created_at)", " WHERE erased_at IS NULL"),
    (
        "ix_submissions_image_unreleased",
        "(erased_at)",
        " WHERE erased_at IS NOT NULL AND image_released_at IS NULL",
    ),
)


def upgrade() -> None:
    # Safe to run again after a failure part-way: the columns may exist, an index build may have been
    # cancelled. Waiting for the table lock must not hold intake's inserts queued behind it for long.
    op.execute("SET LOCAL lock_timeout = '10s'")
    op.execute("ALTER TABLE submissions ADD COLUMN IF NOT EXISTS erased_at TIMESTAMP WITH TIME ZONE")
    op.execute("ALTER TABLE submissions ADD COLUMN IF NOT EXISTS image_released_at TIMESTAMP WITH TIME ZONE")
    # Built without locking intake out of a large table (CONCURRENTLY cannot run inside a transaction).
    with op.get_context().autocommit_block():
        bind = op.get_bind()
        for name, columns, where in _INDEXES:
            valid = bind.execute(
                sa.text(
                    "SELECT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
                    "WHERE c.relname = :name"
                ),
                {"name": name},
            ).scalar()
            if valid is False:  # a cancelled concurrent build leaves an invalid index behind
                op.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {name}")
            op.execute(f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {name} ON submissions {columns}{where}")


def downgrade() -> None:
    with op.get_context().autocommit_block():
        for name, _, _ in reversed(_INDEXES):
            op.drop_index(name, table_name="submissions", postgresql_concurrently=True, if_exists=True)
    op.drop_column("submissions", "image_released_at")
    op.drop_column("submissions", "erased_at")
