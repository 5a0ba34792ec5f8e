"""Database plumbing: connection options every process gets."""

from __future__ import annotations

import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from moderation.db import make_engine


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
