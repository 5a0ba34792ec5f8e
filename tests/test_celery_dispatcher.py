"""The Celery dispatcher: what reaches the Redis broker for each kind of job."""

from __future__ import annotations

import base64
import json
import uuid
from typing import Any

import pytest
import redis

from moderation.config import Settings
from moderation.jobs import Job
from moderation.submissions.service import process_job
from moderation.webhooks.service import delivery_job
from tests.conftest import TEST_REDIS_URL
from workers.celery_app import CeleryDispatcher, make_celery


def _messages(client: redis.Redis, queue: str) -> list[dict[str, Any]]:
    messages = []
    for raw in reversed(client.lrange(queue, 0, -1)):
        message = json.loads(raw)
        message["args"], message["kwargs"], _ = json.loads(base64.b64decode(message["body"]))
        messages.append(message)
    return messages


def test_jobs_reach_their_queues_as_celery_task_messages(redis_client: redis.Redis) -> None:
    app = make_celery(Settings(redis_url=TEST_REDIS_URL))
    dispatcher = CeleryDispatcher(app)
    sid, did = uuid.uuid4(), uuid.uuid4()
    for _ in range(2):  # the first publish of a queue declares it, later ones do not
        dispatcher.dispatch(process_job(sid))
    dispatcher.dispatch(delivery_job(did, countdown=30))
    dispatcher.dispatch(Job("moderation.sweep", (), "maintenance", options={"expires": 60}))
    gpu = _messages(redis_client, "gpu")
    assert [(m["headers"]["task"], m["args"], m["kwargs"]) for m in gpu] == [
        ("moderation.process_submission", [str(sid)], {})
    ] * 2
    assert gpu[0]["headers"]["id"] != gpu[1]["headers"]["id"]
    assert gpu[0]["headers"]["eta"] is None and gpu[0]["headers"]["ignore_result"] is True
    assert gpu[0]["properties"]["delivery_info"] == {"exchange": "", "routing_key": "gpu"}
    (webhook,) = _messages(redis_client, "webhooks")
    assert webhook["headers"]["task"] == "moderation.deliver_webhook" and webhook["args"] == [str(did)]
    assert webhook["headers"]["eta"] is not None
    # Jobs with extra options go through send_task, which understands all of them.
    (sweep,) = _messages(redis_client, "maintenance")
    assert sweep["headers"]["task"] == "moderation.sweep" and sweep["headers"]["expires"] is not None


def test_a_dead_broker_is_given_up_on_quickly_and_logged(caplog: Any) -> None:
    """Intake commits first; a publish that cannot reach the broker is logged for the sweeper, not retried long."""
    import logging

    from moderation import jobs

    app = make_celery(Settings(redis_url="redis://127.0.0.1:9/0"))  # nothing listens on port 9
    assert app.conf.task_publish_retry_policy["max_retries"] == 1
    previous = jobs.get_dispatcher()
    jobs.set_dispatcher(CeleryDispatcher(app))
    try:
        with caplog.at_level(logging.ERROR, logger="moderation.jobs"):
            jobs.dispatch_now(process_job(uuid.uuid4()))
    finally:
        jobs.set_dispatcher(previous)
    assert "the sweeper will recover it" in caplog.text


def test_jobs_dispatched_together_arrive_as_the_same_messages(redis_client: redis.Redis) -> None:
    app = make_celery(Settings(redis_url=TEST_REDIS_URL))
    dispatcher = CeleryDispatcher(app)
    ids = [uuid.uuid4() for _ in range(5)]
    did = uuid.uuid4()
    batch = [process_job(sid) for sid in ids]
    batch.append(delivery_job(did))
    batch.append(Job("moderation.sweep", (), "maintenance", options={"expires": 60}))
    dispatcher.dispatch_many(batch)
    gpu = _messages(redis_client, "gpu")
    assert [m["args"] for m in gpu] == [[str(sid)] for sid in ids]
    assert len({m["headers"]["id"] for m in gpu}) == 5
    assert all(m["properties"]["delivery_info"]["routing_key"] == "gpu" for m in gpu)
    assert [m["args"] for m in _messages(redis_client, "webhooks")] == [[str(did)]]
    assert [m["headers"]["task"] for m in _messages(redis_client, "maintenance")] == ["moderation.sweep"]


def test_a_commit_hands_its_jobs_to_the_broker_together(redis_client: redis.Redis, caplog: Any) -> None:
    import logging

    from moderation import jobs

    calls: list[int] = []

    class Counting(CeleryDispatcher):
        def dispatch_many(self, batch: Any) -> None:
            calls.append(len(batch))
            super().dispatch_many(batch)

    previous = jobs.get_dispatcher()
    try:
        jobs.set_dispatcher(Counting(make_celery(Settings(redis_url=TEST_REDIS_URL))))
        jobs.dispatch_all([process_job(uuid.uuid4()) for _ in range(3)])
        assert calls == [3] and len(_messages(redis_client, "gpu")) == 3
        jobs.set_dispatcher(CeleryDispatcher(make_celery(Settings(redis_url="redis://127.0.0.1:9/0"))))
        with caplog.at_level(logging.ERROR, logger="moderation.jobs"):
            jobs.dispatch_all([process_job(uuid.uuid4()) for _ in range(3)])
        assert "could not dispatch 3 jobs; the sweeper will recover them" in caplog.text
    finally:
        jobs.set_dispatcher(previous)


def test_publishes_reuse_one_redis_client_per_channel(
    redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = make_celery(Settings(redis_url=TEST_REDIS_URL))
    dispatcher = CeleryDispatcher(app)
    dispatcher.dispatch(process_job(uuid.uuid4()))
    built: list[object] = []
    real_init = redis.Redis.__init__

    def counting_init(self: redis.Redis, *args: Any, **kwargs: Any) -> None:
        built.append(self)
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(redis.Redis, "__init__", counting_init)
    sent = [uuid.uuid4() for _ in range(20)]
    for sid in sent:
        dispatcher.dispatch(process_job(sid))
    dispatcher.dispatch_many([process_job(sid) for sid in sent[:3]])
    assert built == []  # kombu would build a client (and its callback table) for every one of them
    assert [m["args"] for m in _messages(redis_client, "gpu")][1:] == [
        [str(sid)] for sid in [*sent, *sent[:3]]
    ]
