"""Database plumbing: the declarative base, engine and session factory."""

from __future__ import annotations

import functools
import os
import threading
import time
import uuid
import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

from sqlalchemy import DateTime, Engine, MetaData, create_engine, func
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from sqlalchemy.sql.dml import UpdateBase

from moderation.config import get_settings

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class RandomBytes:
    """Bytes from the operating system's CSPRNG, fetched a block at a time; a forked child starts afresh.

    ``os.urandom`` releases the GIL for its system call, and an API process's event loop that releases it
    per request waits for the intake writer's thread to hand it back; one call per block avoids that.
    """

    def __init__(self, block_size: int = 4096) -> None:
        self.block_size = block_size
        self._forget()
        os.register_at_fork(after_in_child=functools.partial(_forget_in_child, weakref.ref(self)))

    def _forget(self) -> None:
        # A forked child starts here too: it must never hand out the bytes its parent hands out.
        self._lock = threading.Lock()
        self._block = b""
        self._used = 0

    def take(self, count: int) -> bytes:
        """``count`` fresh random bytes (never handed out before in this or any other process)."""
        if count > self.block_size:
            return os.urandom(count)
        with self._lock:
            if self._used + count > len(self._block):
                self._block, self._used = os.urandom(self.block_size), 0
            start = self._used
            self._used += count
            return self._block[start : self._used]


def _forget_in_child(reference: weakref.ref[RandomBytes]) -> None:
    source = reference()
    if source is not None:
        source._forget()


_random_bytes = RandomBytes()


def new_id() -> uuid.UUID:
    """A time-ordered UUIDv7, so primary keys index well and sort by creation."""
    millis = time.time_ns() // 1_000_000
    rand = int.from_bytes(_random_bytes.take(10), "big")
    value = (millis & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76
    value |= ((rand >> 62) & 0xFFF) << 64
    value |= 0b10 << 62
    value |= rand & ((1 << 62) - 1)
    return uuid.UUID(int=value)


def utcnow() -> datetime:
    """The current time, timezone-aware in UTC."""
    return datetime.now(UTC)


class Base(DeclarativeBase):
    """Declarative base of every table, with a naming convention for constraints."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class TimestampMixin:
    """Created and updated timestamps maintained by the database and the ORM."""

    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), default=utcnow, nullable=False
    )
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), default=utcnow, onupdate=utcnow, nullable=False
    )


def make_engine(
    url: str | None = None,
    *,
    pool_size: int = 10,
    statement_timeout_seconds: float | None = None,
    autocommit: bool = False,
    pre_ping: bool = True,
) -> Engine:
    """Create a SQLAlchemy engine for the configured database.

    Connections send TCP keepalives, so one whose server vanished fails within about a minute instead of
    blocking its caller; ``statement_timeout_seconds`` also caps every statement and lock wait. With
    ``autocommit`` each statement commits by itself (no BEGIN and COMMIT round trips); without ``pre_ping``
    a connection is not tested before use, and a dead one fails its first statement instead.
    """
    connect_args: dict[str, object] = {
        "application_name": f"moderation-{os.getpid()}",
        "connect_timeout": 10,  # a database host that does not answer fails a connect, not hangs it
        "keepalives": 1,
        "keepalives_idle": 30,
        "keepalives_interval": 10,
        "keepalives_count": 3,
    }
    if statement_timeout_seconds:
        millis = int(statement_timeout_seconds * 1000)
        connect_args["options"] = f"-c statement_timeout={millis} -c lock_timeout={millis}"
    return create_engine(
        url or get_settings().database_url,
        pool_size=pool_size,
        max_overflow=20,
        pool_pre_ping=pre_ping,
        pool_recycle=1800,
        connect_args=connect_args,
        # Errors must not carry statement parameters into logs: captions, metadata, key hashes.
        hide_parameters=True,
        **({"isolation_level": "AUTOCOMMIT"} if autocommit else {}),
    )


@lru_cache(maxsize=64)
def _driver_sql(statement: UpdateBase, dialect: Dialect) -> tuple[str, dict[str, Any]]:
    """The statement's SQL for the driver, and the values of the parameters it binds itself."""
    compiled = statement.compile(dialect=dialect)
    # Only named parameters that reach the driver as they are: nothing SQLAlchemy expands or renames.
    if (
        compiled.positiontup is not None
        or compiled.post_compile_params
        or compiled.literal_execute_params
        or compiled.escaped_bind_names
    ):
        raise ValueError("the statement needs SQLAlchemy's own parameter processing: use session.execute")
    return compiled.string, {name: value for name, value in compiled.params.items() if value is not None}


def execute_on_driver(
    session: Session, statement: UpdateBase, params: Mapping[str, Any]
) -> list[tuple[Any, ...]]:
    """Run ``statement`` on the session's connection through the driver itself; the rows it returns.

    For a hot path only: SQLAlchemy's execution steps cost several times the driver's own work for one small
    statement. The statement is compiled once per dialect and ``params`` reach the driver as they are (no
    SQLAlchemy type processing: pass values both take). A driver error is raised as SQLAlchemy's, and a lost
    connection is invalidated, as ``session.execute`` does. Where anything listens for SQLAlchemy's
    execution or error events (tracing, tests), the statement goes through SQLAlchemy (``Connection.execute``)
    so that they see it; the session's own ORM events (``do_orm_execute``) are never run.
    """
    connection = session.connection()
    events = connection.dispatch
    if (
        events.before_cursor_execute
        or events.after_cursor_execute
        or events.before_execute
        or events.after_execute
        or connection.dialect.dispatch.handle_error
    ):
        result = connection.execute(statement, params)
        return [tuple(row) for row in result] if result.returns_rows else []
    dialect = connection.dialect
    sql, own_params = _driver_sql(statement, dialect)
    if own_params:
        params = {**own_params, **params}
    driver = connection.connection.driver_connection
    assert driver is not None  # a checked-out connection always has one
    cursor = None
    try:
        cursor = driver.cursor()
        cursor.execute(sql, params)
        return cursor.fetchall() if cursor.description is not None else []
    except dialect.loaded_dbapi.Error as exc:
        lost = dialect.is_disconnect(exc, driver, cursor)
        if lost:
            connection.invalidate(exc)
        raise DBAPIError.instance(
            sql,
            None,
            exc,
            dialect.loaded_dbapi.Error,
            hide_parameters=True,
            connection_invalidated=lost,
            dialect=dialect,
        ) from exc
    finally:
        if cursor is not None:
            cursor.close()


@lru_cache(maxsize=1)
def get_engine() -> Engine:
    """The process-wide engine (one connection pool per process)."""
    return make_engine()


@lru_cache(maxsize=1)
def get_sessionmaker() -> sessionmaker[Session]:
    """The process-wide session factory."""
    return sessionmaker(bind=get_engine(), expire_on_commit=False)


def reset_engine() -> None:
    """Drop the process-wide engine, e.g. after fork in a worker process."""
    if get_engine.cache_info().currsize:
        get_engine().dispose(close=False)
    get_engine.cache_clear()
    get_sessionmaker.cache_clear()


@contextmanager
def session_scope() -> Iterator[Session]:
    """A session whose transaction commits on success and rolls back on error."""
    session = get_sessionmaker()()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
