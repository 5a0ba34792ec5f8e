"""tenants: a retention period of their own; retention finds a tenant's expired submissions by its own index

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-01 05:00:00

``tenants.retention_days`` overrides ``MODERATION_RETENTION_DAYS`` for one tenant (NULL: the service's
default; 0: keep everything). Retention then looks for each tenant's expired submissions on its own, so the
index of submissions not erased yet leads with the tenant: with (created_at) alone, a pass would read every
old submission of tenants that keep theirs longer before it reached the expired ones. One index for one, so
intake writes no more index entries than before.
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_NEW = ("ix_submissions_tenant_unerased_created", "(tenant_id, created_at)")
_OLD = ("ix_submissions_unerased_created", "(created_at)")


def _drop_if_invalid(name: str) -> None:
    # A cancelled concurrent build leaves an invalid index behind; building it again needs it gone. (An
    # offline run, --sql, cannot look: its script assumes no build was cancelled.)
    if op.get_context().as_sql:
        return
    invalid = "SELECT 1 FROM pg_index WHERE indexrelid = to_regclass(:name) AND NOT indisvalid"
    if op.get_bind().execute(sa.text(invalid), {"name": name}).scalar():
        op.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {name}")


def _swap(build: tuple[str, str], drop: tuple[str, str]) -> None:
    # Neither step locks intake out, and either can be run again after a failure part-way.
    name, columns = build
    with op.get_context().autocommit_block():
        _drop_if_invalid(name)
        op.execute(
            f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {name} ON submissions {columns} WHERE erased_at IS NULL"
        )
        op.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {drop[0]}")


def upgrade() -> None:
    # The index first: after it, the column commits together with the revision, so a run stopped part-way
    # can simply be run again.
    _swap(_NEW, _OLD)
    op.execute(
        "SET LOCAL lock_timeout = '10s'"
    )  # every request reads tenants: never queue behind a long lock
    op.add_column("tenants", sa.Column("retention_days", sa.Integer(), nullable=True))
    op.create_check_constraint(
        op.f("ck_tenants_retention_days_in_range"), "tenants", "retention_days BETWEEN 0 AND 36500"
    )


def downgrade() -> None:
    _swap(_OLD, _NEW)
    op.execute("SET LOCAL lock_timeout = '10s'")
    op.drop_constraint(op.f("ck_tenants_retention_days_in_range"), "tenants", type_="check")
    op.drop_column("tenants", "retention_days")
