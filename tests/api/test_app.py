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


def test_liveness_fails_once_the_intake_writer_has_died(
    settings: Settings, sessions: sessionmaker[Session], dispatched: RecordingDispatcher, redis_client: object
) -> None:
    app = create_app(settings, dispatcher=dispatched)
    app.state.sessions = app.state.intake_sessions = sessions
    with TestClient(app) as client:
        writer = app.state.intake_writer
        assert client.get("/healthz").json() == {"status": "ok"}
        writer._queue.put(None)  # the thread ends without close(), as it would on an error outside its guard
        writer._thread.join(5)
        assert not writer._thread.is_alive()
        res = client.get("/healthz")
        assert res.status_code == 503 and res.json()["intake_writer"] == "stopped"
