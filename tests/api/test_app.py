"""Process-level behaviour of the API application."""

from __future__ import annotations

import gc

from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from api.app import create_app
from moderation.config import Settings
from tests.conftest import RecordingDispatcher


def test_startup_freezes_long_lived_objects_out_of_gc_scans(
    settings: Settings, sessions: sessionmaker[Session], dispatched: RecordingDispatcher, redis_client: object
) -> None:
    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    app = create_app(settings, dispatcher=dispatched)
    app.state.sessions = app.state.intake_sessions = sessions
    with TestClient(app) as client:
        assert gc.get_freeze_count() > 0
        assert client.get("/healthz").status_code == 200
