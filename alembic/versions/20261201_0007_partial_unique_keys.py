"""submissions: the unique (tenant, external id) and (tenant, idempotency key) indexes skip rows without one

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01 02:00:00

Most submissions carry neither key, and a unique index holds a NULL entry for every such row: two index
insertions per submission that enforce nothing (NULLs never conflict). Partial unique indexes over the rows
that have a key enforce the same uniqueness, and ``ON CONFLICT DO NOTHING`` (no target) uses them as before.
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_KEYS = ("external_id", "idempotency_key")


def _exists(sql: str, **params: str) -> bool:
    return bool(op.get_bind().execute(sa.text(sql), params).scalar())


def _constraint_exists(name: str) -> bool:
    return _exists("SELECT 1 FROM pg_constraint WHERE conname = :name", name=name)


def _drop_if_invalid(name: str) -> None:
    # A cancelled concurrent build leaves an invalid index behind; building it again needs it gone.
    invalid = (
        "SELECT 1 FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
        "WHERE c.relname = :name AND NOT i.indisvalid"
    )
    if _exists(invalid, name=name):
        op.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {name}")


def upgrade() -> None:
    # Safe to run again after a failure part-way: each key is swapped (constraint dropped, partial index
    # renamed into its name) in one short transaction, after the index was built without locking intake out.
    for key in _KEYS:
        name = f"uq_submissions_tenant_id_{key}"
        building = f"{name}_partial"
        if not _constraint_exists(name):
            continue
        with op.get_context().autocommit_block():
            _drop_if_invalid(building)
            op.execute(
                f"CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS {building} "
                f"ON submissions (tenant_id, {key}) WHERE {key} IS NOT NULL"
            )
        # Uniqueness holds throughout: the partial index enforces it before the constraint goes.
        op.execute("SET LOCAL lock_timeout = '10s'")
        op.execute(f"ALTER TABLE submissions DROP CONSTRAINT {name}")
        op.execute(f"ALTER INDEX {building} RENAME TO {name}")


def downgrade() -> None:
    for key in _KEYS:
        name = f"uq_submissions_tenant_id_{key}"
        building = f"{name}_full"
        if _constraint_exists(name):
            continue
        with op.get_context().autocommit_block():
            _drop_if_invalid(building)
            op.execute(
                f"CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS {building} ON submissions (tenant_id, {key})"
            )
        op.execute("SET LOCAL lock_timeout = '10s'")
        op.execute(f"DROP INDEX {name}")
        op.execute(f"ALTER TABLE submissions ADD CONSTRAINT {name} UNIQUE USING INDEX {building}")
