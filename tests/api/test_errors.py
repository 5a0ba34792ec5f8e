"""Every error leaves the API as JSON with the right status, whatever raised it."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from api.errors import install_error_handlers


def test_a_value_the_database_refuses_is_a_422_not_a_500(sessions: sessionmaker[Session]) -> None:
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/store")
    def store(note: str) -> dict[str, str]:
        with sessions() as session:
            session.execute(text("SELECT CAST(:note AS text)"), {"note": note})
        return {"ok": "stored"}

    with TestClient(app, raise_server_exceptions=False) as client:
        assert client.post("/store", params={"note": "fine"}).json() == {"ok": "stored"}
        refused = client.post("/store", params={"note": "nul\x00inside"})
    assert refused.status_code == 422
    error = refused.json()["error"]
    assert error["code"] == "invalid_value" and "NUL" in error["message"]


def test_unexpected_errors_stay_500_internal_error() -> None:
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("a bug")

    with TestClient(app, raise_server_exceptions=False) as client:
        res = client.get("/boom")
    assert res.status_code == 500 and res.json()["error"]["code"] == "internal_error"
