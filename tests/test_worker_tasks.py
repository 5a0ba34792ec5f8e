"""The Celery task adapters: what a GPU worker does when its engine breaks."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from celery.exceptions import WorkerShutdown

from moderation.processing.service import BatchProcessor, EngineUnhealthy
from workers import tasks


def test_an_unhealthy_engine_shuts_the_worker_down(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: BatchProcessor, submission_id: uuid.UUID) -> Any:
        raise EngineUnhealthy("engine unhealthy after a failed batch: CUDA error")

    monkeypatch.setattr(BatchProcessor, "run", broken)
    for getter in ("get_sessionmaker", "get_engine", "get_blob_store"):
        monkeypatch.setattr(tasks, getter, lambda: None)
    with pytest.raises(WorkerShutdown):
        tasks.process_submission.run(str(uuid.uuid4()))
