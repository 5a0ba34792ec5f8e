"""Process-level behaviour of the API application."""

from __future__ import annotations

import gc

from fastapi.testclient import TestClient


def test_startup_freezes_long_lived_objects_out_of_gc_scans(client: TestClient) -> None:
    assert gc.get_freeze_count() > 0
    assert client.get("/healthz").status_code == 200
