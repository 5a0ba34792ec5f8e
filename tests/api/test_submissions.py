"""The intake API: accepting, replaying, reading and rejecting submissions."""

from __future__ import annotations

import base64
import io
import json
import time
import uuid
from unittest import mock

import anyio.to_thread
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from api.app import create_app
from moderation.config import Settings
from moderation.jobs import TASK_PROCESS_SUBMISSION
from moderation.net.safe_http import fetch_bytes
from moderation.submissions.models import Submission, SubmissionStatus
from tests.api.conftest import ApiTenant
from tests.conftest import RecordingDispatcher, make_jpeg, make_png


def _post(
    client: TestClient, tenant: ApiTenant, image: bytes, caption: str = "a red square", **extra: object
):  # type: ignore[no-untyped-def]
    data = {"caption": caption, **{k: v for k, v in extra.items() if k != "headers"}}
    headers = {**tenant.headers, **extra.get("headers", {})}  # type: ignore[dict-item]
    return client.post(
        "/v1/submissions", files={"image": ("x.jpg", image, "image/jpeg")}, data=data, headers=headers
    )


def test_multipart_submission_is_accepted_and_queued(
    client: TestClient, tenant: ApiTenant, dispatched: RecordingDispatcher
) -> None:
    res = _post(
        client,
        tenant,
        make_jpeg(),
        caption="一只猫坐在沙发上",
        external_id="post-1",
        metadata='{"lang": "zh"}',
    )
    assert res.status_code == 202, res.text
    body = res.json()
    assert body["status"] == "queued" and set(body) == {"id", "status", "created_at"}
    assert res.headers["location"] == f"/v1/submissions/{body['id']}"
    # Intake's writer publishes the job right after answering: it may land a moment after the 202.
    assert dispatched.wait_for_tasks(TASK_PROCESS_SUBMISSION, 1) == [body["id"]]

    got = client.get(f"/v1/submissions/{body['id']}", headers=tenant.headers).json()
    assert got["caption"] == "一只猫坐在沙发上"
    assert got["external_id"] == "post-1"
    assert got["metadata"] == {"lang": "zh"}
    assert got["status"] == "queued" and got["verdict"] is None and got["review"] is None
    assert got["image"]["format"] == "JPEG" and got["image"]["width"] == 640


def test_json_submission_with_base64(client: TestClient, tenant: ApiTenant) -> None:
    payload = {
        "caption": "green",
        "image_base64": base64.b64encode(make_png()).decode(),
        "metadata": {"k": "v"},
    }
    res = client.post("/v1/submissions", json=payload, headers=tenant.headers)
    assert res.status_code == 202, res.text
    got = client.get(res.headers["location"], headers=tenant.headers).json()
    assert got["image"]["format"] == "PNG" and got["metadata"] == {"k": "v"}


def test_idempotency_key_and_external_id_replay_the_same_submission(
    client: TestClient, tenant: ApiTenant, dispatched: RecordingDispatcher
) -> None:
    first = _post(client, tenant, make_jpeg(seed=1), headers={"Idempotency-Key": "abc"})
    again = _post(client, tenant, make_jpeg(seed=1), headers={"Idempotency-Key": "abc"})
    assert first.status_code == again.status_code == 202
    assert first.json()["id"] == again.json()["id"]
    assert again.headers["idempotent-replayed"] == "true"
    by_ext = _post(client, tenant, make_jpeg(seed=2), external_id="e-1")
    by_ext_again = _post(client, tenant, make_jpeg(seed=3), external_id="e-1")
    assert by_ext.json()["id"] == by_ext_again.json()["id"]
    assert len(dispatched.wait_for_tasks(TASK_PROCESS_SUBMISSION, 2)) == 2
    listed = client.get("/v1/submissions", headers=tenant.headers).json()
    assert len(listed["data"]) == 2


def test_tenants_are_isolated(client: TestClient, tenant: ApiTenant, other_tenant: ApiTenant) -> None:
    sid = _post(client, tenant, make_jpeg(), external_id="same").json()["id"]
    assert client.get(f"/v1/submissions/{sid}", headers=other_tenant.headers).status_code == 404
    # The same external id is a different submission for another tenant.
    other = _post(client, other_tenant, make_jpeg(), external_id="same").json()["id"]
    assert other != sid
    assert [s["id"] for s in client.get("/v1/submissions", headers=other_tenant.headers).json()["data"]] == [
        other
    ]


def test_auth_is_required(client: TestClient, tenant: ApiTenant) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic abc"}):
        res = client.get("/v1/submissions", headers=headers)
        assert res.status_code == 401
        assert res.json()["error"]["code"] == "unauthorized"


def test_a_cached_key_under_another_scheme_is_still_refused(client: TestClient, tenant: ApiTenant) -> None:
    assert client.get("/v1/submissions", headers=tenant.headers).status_code == 200  # now cached
    other_scheme = {"Authorization": f"Token {tenant.key}"}
    assert client.get("/v1/submissions", headers=other_scheme).status_code == 401
    assert _post(client, tenant, make_jpeg(), headers=other_scheme).status_code == 401


def test_listing_pages_with_a_cursor_and_filters_by_status(client: TestClient, tenant: ApiTenant) -> None:
    ids = [_post(client, tenant, make_jpeg(64, 64, seed=i)).json()["id"] for i in range(5)]
    seen: list[str] = []
    cursor = None
    while True:
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = client.get("/v1/submissions", params=params, headers=tenant.headers).json()
        seen += [s["id"] for s in page["data"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == list(reversed(ids))
    assert client.get("/v1/submissions?status=decided", headers=tenant.headers).json()["data"] == []
    bad = client.get("/v1/submissions?status=nope", headers=tenant.headers)
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_status"
    assert client.get("/v1/submissions?cursor=%%%", headers=tenant.headers).status_code == 422
    assert client.get("/v1/submissions/not-a-uuid", headers=tenant.headers).status_code == 404


def _error(res) -> tuple[int, str]:  # type: ignore[no-untyped-def]
    return res.status_code, res.json()["error"]["code"]


def test_bad_input_gets_clear_errors_and_the_service_keeps_serving(
    client: TestClient, tenant: ApiTenant, settings
) -> None:  # type: ignore[no-untyped-def]
    big = b"\xff\xd8\xff" + b"0" * (settings.max_image_bytes + 10)
    assert _error(_post(client, tenant, big)) == (413, "image_too_large")
    assert _error(_post(client, tenant, b"%PDF-1.4 not an image")) == (415, "unsupported_image_format")
    jpeg = make_jpeg(800, 600)
    assert _error(_post(client, tenant, jpeg[: len(jpeg) // 2])) == (422, "image_undecodable")
    bomb = io.BytesIO()
    Image.new("1", (8000, 8000)).save(bomb, "PNG")
    assert _error(_post(client, tenant, bomb.getvalue())) == (422, "image_too_many_pixels")
    assert _error(_post(client, tenant, make_jpeg(), caption="")) == (422, "caption_empty")
    assert _error(_post(client, tenant, make_jpeg(), caption="x" * 4001)) == (422, "caption_too_long")
    res = client.post(
        "/v1/submissions",
        files={
            "image": ("x.jpg", make_jpeg(), "image/jpeg"),
            "caption": ("c.txt", b"\xff\xfe\xfa", "text/plain"),
        },
        headers=tenant.headers,
    )
    assert _error(res) == (422, "caption_not_utf8")
    res = client.post("/v1/submissions", files={"caption": (None, "no image")}, headers=tenant.headers)
    assert _error(res) == (422, "image_missing")
    res = client.post("/v1/submissions", data={"caption": "urlencoded"}, headers=tenant.headers)
    assert _error(res) == (415, "unsupported_content_type")
    res = client.post(
        "/v1/submissions", content=b"caption=x", headers={**tenant.headers, "content-type": "text/plain"}
    )
    assert _error(res) == (415, "unsupported_content_type")
    res = client.post(
        "/v1/submissions",
        content=b"{not json",
        headers={**tenant.headers, "content-type": "application/json"},
    )
    assert _error(res) == (422, "invalid_json")
    both = {"caption": "x", "image_base64": "AAAA", "image_url": "https://example.com/a.jpg"}
    assert _error(client.post("/v1/submissions", json=both, headers=tenant.headers)) == (422, "image_missing")
    bad_b64 = {"caption": "x", "image_base64": "!!!notbase64"}
    assert _error(client.post("/v1/submissions", json=bad_b64, headers=tenant.headers)) == (
        422,
        "invalid_base64",
    )
    assert _error(_post(client, tenant, make_jpeg(), metadata="[1]")) == (422, "invalid_metadata")
    assert _error(_post(client, tenant, make_jpeg(), metadata="[" * 100_000)) == (422, "invalid_metadata")
    deep = '{"a": ' * 300 + "1" + "}" * 300
    assert _error(_post(client, tenant, make_jpeg(), metadata=deep)) == (422, "invalid_metadata")
    ssrf = {"caption": "x", "image_url": "http://169.254.169.254/latest/meta-data/"}
    assert _error(client.post("/v1/submissions", json=ssrf, headers=tenant.headers)) == (
        422,
        "blocked_destination",
    )
    local = {"caption": "x", "image_url": "http://127.0.0.1:1/a.jpg"}
    assert _error(client.post("/v1/submissions", json=local, headers=tenant.headers)) == (
        422,
        "blocked_destination",
    )
    assert (
        _error(
            client.post(
                "/v1/submissions",
                json={"caption": "x", "image_url": "file:///etc/passwd"},
                headers=tenant.headers,
            )
        )[0]
        == 422
    )
    # Still serving.
    assert _post(client, tenant, make_jpeg()).status_code == 202
    assert client.get("/healthz").json() == {"status": "ok"}


def test_rate_limit_answers_429_with_retry_after(client: TestClient, tenant: ApiTenant, settings) -> None:  # type: ignore[no-untyped-def]
    settings.rate_limit_per_minute = 60
    settings.rate_limit_burst = 3
    codes = [_post(client, tenant, make_jpeg(32, 32, seed=i)).status_code for i in range(5)]
    assert codes[:3] == [202, 202, 202]
    assert codes[3:] == [429, 429]
    res = _post(client, tenant, make_jpeg(32, 32))
    assert res.json()["error"]["code"] == "rate_limited"
    assert 1 <= int(res.headers["retry-after"]) <= 2


def test_image_url_is_fetched_when_private_targets_are_allowed(
    client: TestClient,
    tenant: ApiTenant,
    settings,
    image_server,  # type: ignore[no-untyped-def]
) -> None:
    settings.allow_private_network = True
    res = client.post(
        "/v1/submissions", json={"caption": "fetched", "image_url": image_server}, headers=tenant.headers
    )
    assert res.status_code == 202, res.text
    got = client.get(res.headers["location"], headers=tenant.headers).json()
    assert got["image"]["format"] == "JPEG"
    missing = client.post(
        "/v1/submissions",
        json={"caption": "x", "image_url": image_server + "-missing"},
        headers=tenant.headers,
    )
    assert _error(missing) == (422, "fetch_failed")

    # A retry of a stored submission is answered from its key, even when the image's origin is gone.
    keyed = {"caption": "fetched once", "image_url": image_server, "external_id": "url-1"}
    headers = {**tenant.headers, "Idempotency-Key": "url-key-1"}
    first = client.post("/v1/submissions", json=keyed, headers=headers)
    assert first.status_code == 202, first.text
    gone = {**keyed, "image_url": image_server + "-missing"}
    for retry_headers, body in ((headers, gone), (tenant.headers, gone)):  # by key, then by external_id
        retry = client.post("/v1/submissions", json=body, headers=retry_headers)
        assert retry.status_code == 202, retry.text
        assert retry.json()["id"] == first.json()["id"] and retry.headers["idempotent-replayed"] == "true"


def test_image_url_fetches_take_tokens_of_their_own_not_the_shared_thread_pool(
    client: TestClient,
    tenant: ApiTenant,
    settings: Settings,
    image_server,  # type: ignore[no-untyped-def]
) -> None:
    settings.allow_private_network = True
    limiter = client.app.state.fetch_limiter  # type: ignore[attr-defined]
    assert limiter.total_tokens == settings.fetch_concurrency
    seen: list[tuple[int, int]] = []
    shared = anyio.to_thread.current_default_thread_limiter

    def watch(url: str, *args: object, **kwargs: object) -> object:
        seen.append((limiter.borrowed_tokens, client.portal.call(lambda: shared().borrowed_tokens)))  # type: ignore[union-attr]
        return fetch_bytes(url, *args, **kwargs)  # type: ignore[arg-type]

    with mock.patch("api.routes.submissions.fetch_bytes", watch):
        res = client.post(
            "/v1/submissions", json={"caption": "c", "image_url": image_server}, headers=tenant.headers
        )
    assert res.status_code == 202, res.text
    assert seen == [(1, 0)]  # the fetch holds one of its own tokens and none of the shared pool's


def test_readyz_and_metrics(client: TestClient, tenant: ApiTenant) -> None:
    _post(client, tenant, make_jpeg())
    ready = client.get("/readyz")
    assert ready.status_code == 200, ready.text
    checks = ready.json()["checks"]
    assert checks == {"database": "ok", "broker": "ok", "blob_store": "ok", "intake_writer": "ok"}

    text = client.get("/metrics").text
    assert "moderation_intake_requests_total" in text
    assert 'moderation_submissions{status="queued"}' in text
    assert "moderation_broker_queue_depth" in text
    assert "moderation_intake_batch_size_count" in text
    assert json.dumps  # keep import used


def test_readiness_and_queue_depth_read_the_configured_broker_not_redis(
    settings: Settings, sessions: sessionmaker[Session], dispatched: RecordingDispatcher, redis_client: object
) -> None:
    # RabbitMQ runs beside Postgres and Redis on development and CI machines.
    for broker_url, ready in (
        ("amqp://guest:guest@127.0.0.1:5672//", True),
        ("amqp://guest:guest@127.0.0.1:9//", False),
    ):
        app = create_app(settings.model_copy(update={"broker_url": broker_url}), dispatcher=dispatched)
        app.state.sessions = app.state.intake_sessions = sessions
        with TestClient(app) as client:
            answer = client.get("/readyz")
            broker = answer.json()["checks"]["broker"]
            assert (answer.status_code, broker == "ok") == ((200, True) if ready else (503, False)), (
                answer.text
            )
            if ready:
                text = client.get("/metrics").text
                assert 'moderation_broker_queue_depth{queue="gpu"}' in text


def test_a_process_whose_intake_writer_stopped_is_not_ready_and_refuses_submissions(
    client: TestClient, tenant: ApiTenant
) -> None:
    client.app.state.intake_writer.close()  # type: ignore[attr-defined]
    ready = client.get("/readyz")
    assert ready.status_code == 503 and ready.json()["checks"]["intake_writer"] == "error: stopped"
    refused = _post(client, tenant, make_jpeg())
    assert _error(refused) == (503, "shutting_down")


def test_a_stuck_store_answers_503_in_time_and_the_process_reports_not_ready(
    client: TestClient, tenant: ApiTenant, settings: Settings, sessions: sessionmaker[Session]
) -> None:
    import threading

    writer = client.app.state.intake_writer  # type: ignore[attr-defined]
    release = threading.Event()
    real_write = writer.write

    def stuck_write(batch):  # type: ignore[no-untyped-def]
        release.wait(30)  # a database that stopped answering
        return real_write(batch)

    writer.write = stuck_write
    settings.intake_timeout_seconds = 0.3
    try:
        slow = _post(client, tenant, make_jpeg(), headers={"Idempotency-Key": "slow-1"})
        assert _error(slow) == (503, "intake_timeout")
        assert "Idempotency-Key" in slow.json()["error"]["message"]
        # The writer took the batch a moment after the request started: it has been stuck for longer than
        # the timeout a moment after the 503.
        deadline = time.monotonic() + 2
        while (ready := client.get("/readyz")).status_code != 503 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert ready.status_code == 503 and ready.json()["checks"]["intake_writer"].startswith("error: stuck")
    finally:
        release.set()
    # Once the database answers again the timed-out submission is stored; its retry is a replay of it.
    settings.intake_timeout_seconds = 30
    retry = _post(client, tenant, make_jpeg(), headers={"Idempotency-Key": "slow-1"})
    assert retry.status_code == 202
    assert client.get("/readyz").status_code == 200
    with sessions() as session:
        keyed = select(Submission).where(Submission.idempotency_key == "slow-1")
        assert len(session.scalars(keyed).all()) == 1


def test_scrapes_count_the_tables_at_most_every_half_minute(
    client: TestClient, tenant: ApiTenant, monkeypatch: pytest.MonkeyPatch
) -> None:
    from moderation.submissions.repository import SubmissionRepository

    calls: list[int] = []
    count = SubmissionRepository.count_by_status

    def counting(self: SubmissionRepository) -> dict[str, int]:
        calls.append(1)
        return count(self)

    monkeypatch.setattr(SubmissionRepository, "count_by_status", counting)
    for _ in range(3):
        assert "moderation_submissions" in client.get("/metrics").text
    assert len(calls) == 1


def test_delete_erases_a_final_submission_and_refuses_one_still_being_judged(
    client: TestClient,
    tenant: ApiTenant,
    other_tenant: ApiTenant,
    sessions: sessionmaker[Session],
    dispatched: RecordingDispatcher,
) -> None:
    sid = _post(client, tenant, make_jpeg(), caption="selling my bike", external_id="bike-1").json()["id"]
    refused = client.delete(f"/v1/submissions/{sid}", headers=tenant.headers)
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "submission_not_final"

    with sessions() as session, session.begin():
        session.get_one(Submission, uuid.UUID(sid)).status = SubmissionStatus.failed
    assert client.delete(f"/v1/submissions/{sid}", headers=other_tenant.headers).status_code == 404
    assert client.delete("/v1/submissions/not-an-id", headers=tenant.headers).status_code == 404
    assert client.delete(f"/v1/submissions/{sid}").status_code == 401

    erased = client.delete(f"/v1/submissions/{sid}", headers=tenant.headers)
    assert erased.status_code == 204 and erased.content == b""
    got = client.get(f"/v1/submissions/{sid}", headers=tenant.headers).json()
    assert got["caption"] == "" and got["metadata"] == {} and got["erased_at"] is not None
    assert (got["status"], got["external_id"]) == ("failed", "bike-1")
    assert client.delete(f"/v1/submissions/{sid}", headers=tenant.headers).status_code == 204  # idempotent
