"""Shared fixtures: a migrated Postgres, per-test rolled-back transactions, Redis and the fixture model."""

from __future__ import annotations

import io
import os
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
import redis
from PIL import Image
from sqlalchemy import Connection, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from moderation import jobs
from moderation.config import Settings

ROOT = Path(__file__).resolve().parent.parent
TEST_DATABASE_URL = os.environ.get(
    "MODERATION_TEST_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/moderation_test"
)
TEST_REDIS_URL = os.environ.get("MODERATION_TEST_REDIS_URL", "redis://127.0.0.1:6379/9")
FIXTURE_MODEL_DIR = Path(os.environ.get("MODERATION_FIXTURE_MODEL", ROOT / ".data" / "fixture-model"))


def insert_submissions(
    connection: Connection, tenant_id: object, count: int, *, status: str = "queued", age_days: int = 0
) -> None:
    """``count`` bare submission rows of a tenant, written in SQL (fast, and valid at any schema since 0005)."""
    connection.exec_driver_sql(
        "INSERT INTO submissions (id, tenant_id, caption, metadata, image_sha256, image_format, image_width, "
        "image_height, image_bytes, status, attempts, created_at, updated_at) "
        "SELECT gen_random_uuid(), %s, 'c', '{}', 'd', 'JPEG', 1, 1, 1, %s, 0, "
        "now() - make_interval(days => %s), now() FROM generate_series(1, %s)",
        (tenant_id, status, age_days, count),
    )


def plan_of(session: Session, call: Callable[[], object], table: str = "submissions") -> str:
    """Postgres's plan for the first query of ``table`` that ``call`` runs, with sequential scans off.

    Test tables are small enough to be read whole: with that off, the plan shows which index serves the query.
    """
    statements: list[tuple[str, object]] = []

    def record(conn: object, cursor: object, statement: str, parameters: object, *args: object) -> None:
        if statement.lstrip().startswith("SELECT") and f"FROM {table}" in statement:
            statements.append((statement, parameters))

    connection = session.connection()
    event.listen(connection, "before_cursor_execute", record)
    try:
        call()
    finally:
        event.remove(connection, "before_cursor_execute", record)
    (statement, parameters), *_ = statements
    connection.exec_driver_sql("SET LOCAL enable_seqscan = off")
    try:
        rows = connection.exec_driver_sql(f"EXPLAIN {statement}", parameters)  # type: ignore[arg-type]
        return "\n".join(row[0] for row in rows)
    finally:
        connection.exec_driver_sql("SET LOCAL enable_seqscan = on")


def _drop_database(url: str, *, create_again: bool = False) -> None:
    """Drop the database at ``url`` (its sessions too), and create it empty if asked."""
    parsed = make_url(url)
    admin = parsed.set(drivername="postgresql", database="postgres").render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{parsed.database}" WITH (FORCE)')
        if create_again:
            conn.execute(f'CREATE DATABASE "{parsed.database}"')


def _recreate_database(url: str) -> None:
    _drop_database(url, create_again=True)


def migrated_database(url: str) -> str:
    """Create a fresh database at ``url`` and run ``alembic upgrade head`` on it."""
    from moderation.cli import migrate

    _recreate_database(url)
    migrate(url)
    return url


@pytest.fixture(scope="session")
def database_url() -> str:
    """A freshly migrated test database."""
    return migrated_database(TEST_DATABASE_URL)


@pytest.fixture(scope="session")
def db_engine(database_url: str):  # type: ignore[no-untyped-def]
    """Engine on the test database."""
    engine = create_engine(database_url)
    yield engine
    engine.dispose()


@pytest.fixture
def connection(db_engine) -> Iterator[Connection]:  # type: ignore[no-untyped-def]
    """A connection inside a transaction that is rolled back after the test."""
    with db_engine.connect() as conn:
        outer = conn.begin()
        try:
            yield conn
        finally:
            outer.rollback()


@pytest.fixture
def sessions(connection: Connection) -> sessionmaker[Session]:
    """Session factory whose commits become savepoints of the test's transaction."""
    return sessionmaker(bind=connection, join_transaction_mode="create_savepoint", expire_on_commit=False)


@pytest.fixture
def session(sessions: sessionmaker[Session]) -> Iterator[Session]:
    """A session in the test's rolled-back transaction."""
    with sessions() as s:
        yield s


class RecordingDispatcher:
    """Keeps the jobs the code under test dispatched, so tests can check what reached the broker."""

    def __init__(self) -> None:
        self.jobs: list[jobs.Job] = []

    def dispatch(self, job: jobs.Job) -> None:
        """Record the job."""
        self.jobs.append(job)

    def tasks(self, name: str) -> list[str]:
        """The ids the dispatched jobs of one task name, in order (a job may name several)."""
        return [arg for j in self.jobs if j.task == name for arg in j.args]

    def wait_for_tasks(self, name: str, count: int, timeout: float = 5.0) -> list[str]:
        """``tasks(name)`` once it names ``count`` ids (jobs sent after the answer, as intake's, come later)."""
        deadline = time.monotonic() + timeout
        while len(found := self.tasks(name)) < count and time.monotonic() < deadline:
            time.sleep(0.005)
        return found


@pytest.fixture
def dispatched() -> Iterator[RecordingDispatcher]:
    """Install a recording job dispatcher for the test."""
    previous = jobs.get_dispatcher()
    recorder = RecordingDispatcher()
    jobs.set_dispatcher(recorder)
    yield recorder
    jobs.set_dispatcher(previous)


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    """Settings for tests: the test database, Redis db 9, blobs under tmp_path."""
    return Settings(
        database_url=database_url,
        redis_url=TEST_REDIS_URL,
        data_dir=tmp_path,
        blob_dir=tmp_path / "blobs",
        blob_fsync=False,
        model=str(FIXTURE_MODEL_DIR),
        batch_wait_ms=0,
    )


@pytest.fixture
def redis_client() -> Iterator[redis.Redis]:
    """The test Redis database, flushed before and after."""
    client = redis.Redis.from_url(TEST_REDIS_URL)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


@pytest.fixture(scope="session")
def fixture_model_dir() -> Path:
    """The offline fixture model, built once if missing."""
    from moderation.engine.fixture import build_fixture_model

    if not (FIXTURE_MODEL_DIR / "config.json").exists():
        build_fixture_model(FIXTURE_MODEL_DIR)
    return FIXTURE_MODEL_DIR


def make_jpeg(width: int = 640, height: int = 480, seed: int = 0, quality: int = 90) -> bytes:
    """A real JPEG with some structure (noise plus shapes), deterministic per seed."""
    rng = random.Random(seed)
    img = Image.new("RGB", (width, height), (rng.randrange(256), rng.randrange(256), rng.randrange(256)))
    pixels = img.load()
    assert pixels is not None
    for _ in range(200):
        x, y = rng.randrange(width), rng.randrange(height)
        color = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
        for dx in range(min(20, width - x)):
            for dy in range(min(20, height - y)):
                pixels[x + dx, y + dy] = color
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def jpeg_header(data: bytes) -> bytes:
    """The bytes of a baseline JPEG up to and including its scan header."""
    pos = 2
    while data[pos + 1] != 0xDA:
        pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    return data[: pos + 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")]


def make_png(width: int = 64, height: int = 64) -> bytes:
    """A small PNG."""
    buf = io.BytesIO()
    Image.new("RGBA", (width, height), (10, 200, 30, 128)).save(buf, "PNG")
    return buf.getvalue()
