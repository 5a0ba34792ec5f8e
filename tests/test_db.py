"""Database plumbing: connection options every process gets."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import pytest
import sqlalchemy as sa
from sqlalchemy import Engine, event, make_url, text
from sqlalchemy.engine import ExceptionContext
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.orm import Session

from moderation.db import RandomBytes, execute_on_driver, make_engine, new_id

if TYPE_CHECKING:
    from alembic.config import Config


@contextmanager
def _scratch_database(database_url: str, suffix: str) -> Iterator[tuple[Config, Engine]]:
    """A database of its own, not migrated yet: its alembic config and an engine; dropped afterwards."""
    from moderation.cli import alembic_config
    from tests.conftest import _drop_database, _recreate_database

    parsed = make_url(database_url)
    url = parsed.set(database=f"{parsed.database}_{suffix}").render_as_string(hide_password=False)
    _recreate_database(url)
    engine = make_engine(url, pool_size=1)
    try:
        yield alembic_config(url), engine
    finally:
        engine.dispose()
        _drop_database(url)


def test_an_engine_with_a_statement_timeout_cancels_slow_statements(database_url: str) -> None:
    engine = make_engine(database_url, statement_timeout_seconds=0.2)
    try:
        with engine.connect() as conn:
            settings = conn.execute(
                text("SELECT current_setting('statement_timeout'), current_setting('lock_timeout')")
            ).one()
            assert tuple(settings) == ("200ms", "200ms")
            with pytest.raises(OperationalError, match="statement timeout"):
                conn.execute(text("SELECT pg_sleep(2)"))
    finally:
        engine.dispose()
    plain = make_engine(database_url)
    try:
        with plain.connect() as conn:
            assert conn.execute(text("SELECT current_setting('statement_timeout')")).scalar_one() == "0"
    finally:
        plain.dispose()


def test_ids_are_uuid7_ordered_by_time_and_unique() -> None:
    before = time.time_ns() // 1_000_000
    ids = [new_id() for _ in range(5000)]
    after = time.time_ns() // 1_000_000
    assert len(set(ids)) == len(ids)
    assert all(i.version == 7 and i.variant == uuid.RFC_4122 for i in ids)
    assert all(before <= i.int >> 80 <= after for i in ids)
    assert [i.int >> 80 for i in ids] == sorted(i.int >> 80 for i in ids)


def test_random_bytes_are_never_handed_out_twice_across_blocks() -> None:
    source = RandomBytes(block_size=64)
    taken = [source.take(10) for _ in range(200)]  # crosses many blocks, leaving tails unused
    assert all(len(chunk) == 10 for chunk in taken)
    assert len(set(taken)) == len(taken)
    assert len(source.take(100)) == 100  # larger than a block: straight from the OS


def test_a_forked_child_does_not_repeat_its_parents_random_bytes() -> None:
    source = RandomBytes()
    source.take(10)  # the parent now holds a block with bytes still to hand out
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe and exits at once
        os.write(write_end, source.take(10))
        os._exit(0)
    os.close(write_end)
    child = os.read(read_end, 10)
    os.close(read_end)
    os.waitpid(pid, 0)
    assert len(child) == 10
    assert child != source.take(10)


def test_database_errors_do_not_carry_statement_parameters_into_logs(database_url: str) -> None:
    engine = make_engine(database_url, pool_size=1)
    try:
        with pytest.raises(DBAPIError) as raised, engine.connect() as conn:
            conn.execute(text("SELECT CAST(:caption AS text), 1 / 0"), {"caption": "a private caption 私人"})
    finally:
        engine.dispose()
    assert "division by zero" in str(raised.value)
    assert "私人" not in str(raised.value) and "private caption" not in str(raised.value)


def test_the_migrations_build_exactly_the_schema_the_models_describe(database_url: str) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    import moderation.models  # noqa: F401  (every model registered on the metadata)
    from moderation.db import Base

    engine = make_engine(database_url)
    try:
        with engine.connect() as connection:
            opts = {
                "compare_type": True,
                # Check constraints are compared by name only when asked to.
                "autogenerate_plugins": ["alembic.autogenerate.*", "alembic.ext.checkconstraint_byname"],
            }
            context = MigrationContext.configure(connection, opts=opts)
            assert compare_metadata(context, Base.metadata) == []
            # An index whose concurrent build was cancelled exists but is never used.
            invalid = connection.exec_driver_sql(
                "SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid WHERE NOT i.indisvalid"
            ).all()
            assert invalid == []
    finally:
        engine.dispose()


_LABELS = sa.table("execute_on_driver_test", sa.column("id", sa.Integer), sa.column("label", sa.Text))


@pytest.fixture
def labels(session: Session) -> Session:
    """A session whose transaction (rolled back after the test) holds a small table with a unique id."""
    session.execute(text("CREATE TEMP TABLE execute_on_driver_test (id int PRIMARY KEY, label text)"))
    return session


def test_a_statement_run_on_the_driver_returns_its_rows_and_sees_the_transaction(labels: Session) -> None:
    insert = (
        sa.insert(_LABELS).values(id=sa.bindparam("id"), label=sa.bindparam("label")).returning(_LABELS.c.id)
    )
    assert execute_on_driver(labels, insert, {"id": 1, "label": "一"}) == [(1,)]
    assert execute_on_driver(labels, sa.delete(_LABELS).where(_LABELS.c.id == 2), {}) == []
    assert labels.execute(text("SELECT label FROM execute_on_driver_test")).scalar_one() == "一"


def test_a_driver_error_is_raised_as_sqlalchemys_without_its_parameters(labels: Session) -> None:
    insert = sa.insert(_LABELS).values(id=sa.bindparam("id"), label=sa.bindparam("label"))
    execute_on_driver(labels, insert, {"id": 1, "label": "a"})
    with pytest.raises(IntegrityError) as err:
        execute_on_driver(labels, insert, {"id": 1, "label": "a secret caption"})
    assert not err.value.connection_invalidated and "a secret caption" not in str(err.value)


def test_a_lost_connection_is_invalidated(database_url: str, db_engine: Engine) -> None:
    engine = make_engine(database_url, pool_size=1, autocommit=True, pre_ping=False)
    try:
        with Session(engine) as session:
            backend = session.execute(text("SELECT pg_backend_pid()")).scalar_one()
            with db_engine.connect() as conn:
                assert conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": backend}).scalar_one()
            with pytest.raises(DBAPIError) as err:
                execute_on_driver(session, sa.delete(_LABELS), {})
            assert err.value.connection_invalidated
        with Session(engine) as session:  # the pool hands out a new connection
            assert session.execute(text("SELECT pg_backend_pid()")).scalar_one() != backend
    finally:
        engine.dispose()


def test_with_cursor_listeners_the_statement_goes_through_sqlalchemy(labels: Session) -> None:
    seen: list[str] = []

    def record(conn: object, cursor: object, statement: str, *args: object) -> None:
        seen.append(statement.split()[0])

    connection = labels.connection()
    event.listen(connection, "before_cursor_execute", record)
    try:
        insert = (
            sa.insert(_LABELS)
            .values(id=sa.bindparam("id"), label=sa.bindparam("label"))
            .returning(_LABELS.c.label)
        )
        assert execute_on_driver(labels, insert, {"id": 7, "label": "seen"}) == [("seen",)]
    finally:
        event.remove(connection, "before_cursor_execute", record)
    assert seen == ["INSERT"]


def test_the_key_indexes_hold_only_rows_with_a_key_and_migrate_both_ways(database_url: str) -> None:
    from alembic import command
    from moderation.config import Settings
    from moderation.tenants.service import create_tenant

    with _scratch_database(database_url, "keys") as (config, engine):

        def key_indexes() -> dict[str, str]:
            with engine.connect() as conn:
                rows = conn.exec_driver_sql(
                    "SELECT indexname, indexdef FROM pg_indexes WHERE indexname LIKE 'uq_submissions_tenant_id_%%'"
                ).all()
            return {name: definition for name, definition in rows}

        command.upgrade(config, "0006")
        assert all("WHERE" not in d for d in key_indexes().values()) and len(key_indexes()) == 2
        command.upgrade(config, "head")
        assert all(d.endswith("IS NOT NULL)") for d in key_indexes().values()) and len(key_indexes()) == 2
        with Session(engine) as session, session.begin():
            tenant_id = create_tenant(session, "keys", Settings()).tenant.id
        with engine.begin() as conn:
            insert = (
                "INSERT INTO submissions (id, tenant_id, idempotency_key, caption, metadata, image_sha256, "
                "image_format, image_width, image_height, image_bytes, status, attempts, created_at, updated_at) "
                "VALUES "
                "(gen_random_uuid(), %s, %s, 'c', '{}', 'd', 'JPEG', 1, 1, 1, 'queued', 0, now(), now()) "
                "ON CONFLICT DO NOTHING RETURNING id"
            )
            inserted = [
                conn.exec_driver_sql(insert, (tenant_id, key)).all() for key in (None, None, "k", "k")
            ]
        assert [len(rows) for rows in inserted] == [1, 1, 1, 0]  # keyless rows never conflict; keys do
        command.downgrade(config, "0006")
        assert all("WHERE" not in d for d in key_indexes().values()) and len(key_indexes()) == 2
        # An upgrade that stopped part-way: one key swapped, the other's partial index built, not swapped.
        with engine.begin() as conn:
            conn.exec_driver_sql(
                "CREATE UNIQUE INDEX uq_submissions_tenant_id_external_id_partial "
                "ON submissions (tenant_id, external_id) WHERE external_id IS NOT NULL"
            )
            conn.exec_driver_sql(
                "ALTER TABLE submissions DROP CONSTRAINT uq_submissions_tenant_id_external_id"
            )
            conn.exec_driver_sql(
                "ALTER INDEX uq_submissions_tenant_id_external_id_partial "
                "RENAME TO uq_submissions_tenant_id_external_id"
            )
            conn.exec_driver_sql(
                "CREATE UNIQUE INDEX uq_submissions_tenant_id_idempotency_key_partial "
                "ON submissions (tenant_id, idempotency_key) WHERE idempotency_key IS NOT NULL"
            )
        command.upgrade(config, "head")
        assert sorted(key_indexes()) == [
            "uq_submissions_tenant_id_external_id",
            "uq_submissions_tenant_id_idempotency_key",
        ]
        assert all(d.endswith("IS NOT NULL)") for d in key_indexes().values())


def test_the_listing_index_replaces_the_created_at_one_both_ways_and_after_a_stop(database_url: str) -> None:
    from alembic import command
    from tests.conftest import insert_submissions

    old = "CREATE INDEX ix_submissions_tenant_created ON public.submissions USING btree (tenant_id, created_at, id)"
    new = "CREATE INDEX ix_submissions_tenant_id_id ON public.submissions USING btree (tenant_id, id)"
    with _scratch_database(database_url, "listing") as (config, engine):

        def tenant_indexes() -> dict[str, tuple[str, bool]]:
            with engine.connect() as conn:
                rows = conn.exec_driver_sql(
                    "SELECT c.relname, pg_get_indexdef(i.indexrelid), i.indisvalid FROM pg_index i "
                    "JOIN pg_class c ON c.oid = i.indexrelid "
                    "WHERE c.relname IN ('ix_submissions_tenant_id_id', 'ix_submissions_tenant_created')"
                ).all()
            return {name: (definition, valid) for name, definition, valid in rows}

        command.upgrade(config, "0007")
        assert tenant_indexes() == {"ix_submissions_tenant_created": (old, True)}
        command.upgrade(config, "0008")
        assert tenant_indexes() == {"ix_submissions_tenant_id_id": (new, True)}
        command.downgrade(config, "0007")
        assert tenant_indexes() == {"ix_submissions_tenant_created": (old, True)}

        # Stopped after the new index was built, before the old one was dropped.
        with engine.begin() as conn:
            conn.exec_driver_sql("CREATE INDEX ix_submissions_tenant_id_id ON submissions (tenant_id, id)")
        command.upgrade(config, "0008")
        assert tenant_indexes() == {"ix_submissions_tenant_id_id": (new, True)}
        command.downgrade(config, "0007")

        # Stopped by a failed concurrent build, which leaves an invalid index (here of another definition).
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            # The models describe the newest schema: rows of an older one are written by hand.
            tenant_id = conn.exec_driver_sql(
                "INSERT INTO tenants (id, name, block_threshold, allow_threshold, min_confidence, "
                "category_block_threshold, category_review_threshold, policy, policy_version) "
                "VALUES (gen_random_uuid(), 'listing', 0.8, 0.3, 0.6, 0.95, 0.6, '{}', 1) RETURNING id"
            ).scalar_one()
            insert_submissions(conn, tenant_id, 2)
            with pytest.raises(IntegrityError):
                conn.exec_driver_sql(
                    "CREATE UNIQUE INDEX CONCURRENTLY ix_submissions_tenant_id_id ON submissions (tenant_id)"
                )
        assert tenant_indexes()["ix_submissions_tenant_id_id"][1] is False
        command.upgrade(config, "0008")
        assert tenant_indexes() == {"ix_submissions_tenant_id_id": (new, True)}


def test_tenant_retention_and_its_index_migrate_both_ways_and_after_a_stop(database_url: str) -> None:
    from alembic import command

    old = (
        "CREATE INDEX ix_submissions_unerased_created ON public.submissions USING btree (created_at) "
        "WHERE (erased_at IS NULL)"
    )
    new = (
        "CREATE INDEX ix_submissions_tenant_unerased_created ON public.submissions USING btree "
        "(tenant_id, created_at) WHERE (erased_at IS NULL)"
    )
    insert = (
        "INSERT INTO tenants (id, name, block_threshold, allow_threshold, min_confidence, "
        "category_block_threshold, category_review_threshold, policy, policy_version, retention_days) "
        "VALUES (gen_random_uuid(), %s, 0.8, 0.3, 0.6, 0.95, 0.6, '{}', 1, %s)"
    )
    with _scratch_database(database_url, "retention") as (config, engine):

        def state() -> tuple[bool, list[str]]:
            with engine.connect() as conn:
                column = conn.exec_driver_sql(
                    "SELECT 1 FROM information_schema.columns "
                    "WHERE table_name = 'tenants' AND column_name = 'retention_days'"
                ).first()
                indexes = conn.exec_driver_sql(
                    "SELECT pg_get_indexdef(indexrelid) FROM pg_index WHERE indexrelid IN "
                    "(to_regclass('ix_submissions_unerased_created'), "
                    "to_regclass('ix_submissions_tenant_unerased_created'))"
                ).scalars()
                return column is not None, sorted(indexes)

        command.upgrade(config, "0008")
        assert state() == (False, [old])
        command.upgrade(config, "0009")
        assert state() == (True, [new])
        for name, days in (("negative", -1), ("too-long", 40000)):
            with engine.connect() as conn, pytest.raises(IntegrityError):
                conn.exec_driver_sql(insert, (name, days))
        with engine.begin() as conn:
            conn.exec_driver_sql(insert, ("a-year", 365))
        command.downgrade(config, "0008")
        assert state() == (False, [old])
        # Stopped after the index swap, before the column: the revision is still 0008.
        with engine.begin() as conn:
            conn.exec_driver_sql(new.replace(" ON public.", " ON "))
            conn.exec_driver_sql("DROP INDEX ix_submissions_unerased_created")
        command.upgrade(config, "0009")
        assert state() == (True, [new])


def test_with_an_error_listener_the_error_reaches_it(labels: Session) -> None:
    seen: list[str] = []

    def record(context: ExceptionContext) -> None:
        seen.append(type(context.original_exception).__name__)

    engine = labels.get_bind()
    event.listen(engine.engine, "handle_error", record)
    try:
        insert = sa.insert(_LABELS).values(id=sa.bindparam("id"), label=sa.bindparam("label"))
        execute_on_driver(labels, insert, {"id": 1, "label": "a"})
        with pytest.raises(IntegrityError):
            execute_on_driver(labels, insert, {"id": 1, "label": "a"})
    finally:
        event.remove(engine.engine, "handle_error", record)
    assert seen == ["UniqueViolation"]
