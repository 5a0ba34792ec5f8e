"""End to end: real API, real Celery workers running the fixture model, real Postgres, Redis and webhooks."""

from __future__ import annotations

import time

import httpx
import redis
from sqlalchemy import text
from standardwebhooks.webhooks import Webhook

from tests.conftest import make_jpeg
from tests.e2e.conftest import E2E_REDIS_URL, Stack
from tests.webhooks.conftest import start_receiver

FINAL = {"decided", "in_review", "reviewed", "failed"}


def _post(stack: Stack, key: str, seed: int, caption: str) -> str:
    res = httpx.post(
        stack.api_url + "/v1/submissions",
        headers={"Authorization": f"Bearer {key}"},
        files={"image": ("photo.jpg", make_jpeg(320, 240, seed=seed), "image/jpeg")},
        data={"caption": caption},
        timeout=30,
    )
    assert res.status_code == 202, res.text
    return str(res.json()["id"])


def _wait_final(stack: Stack, key: str, ids: list[str], timeout: float = 180) -> dict[str, dict]:  # type: ignore[type-arg]
    deadline = time.monotonic() + timeout
    results: dict[str, dict] = {}  # type: ignore[type-arg]
    while time.monotonic() < deadline:
        for sid in ids:
            if sid not in results:
                body = httpx.get(
                    f"{stack.api_url}/v1/submissions/{sid}", headers={"Authorization": f"Bearer {key}"}
                ).json()
                if body["status"] in FINAL:
                    results[sid] = body
        if len(results) == len(ids):
            return results
        time.sleep(0.3)
    raise AssertionError(
        f"{len(ids) - len(results)} submissions not final\nGPU worker log:\n{stack.log('gpu')[-4000:]}\n"
        f"CPU worker log:\n{stack.log('cpu')[-2000:]}"
    )


def test_submission_gets_a_verdict_and_a_verified_webhook(stack: Stack, api_key: str) -> None:
    receiver, server = start_receiver()
    try:
        res = httpx.post(
            stack.api_url + "/v1/webhook-endpoints",
            headers={"Authorization": f"Bearer {api_key}"},
            json={"url": receiver.url, "events": ["submission.decided"]},
        )
        assert res.status_code == 201, res.text
        secret = res.json()["secret"]
        sid = _post(stack, api_key, 1, "A sunny beach with two people playing volleyball")
        verdict = _wait_final(stack, api_key, [sid])[sid]["verdict"]
        assert verdict["decision"] in {"allow", "block", "review"}
        assert verdict["model"]["name"].startswith("fixture:")
        assert 0 <= verdict["conflict_score"] <= 1 and 0 <= verdict["confidence"] <= 1
        names = {c["name"] for c in verdict["categories"]}
        assert {"sexual", "violence", "weapons", "drugs", "hate", "self_harm", "scam_fraud"} <= names
        assert verdict["explanation"]
        assert receiver.received.wait(60), "webhook never arrived:\n" + stack.log("cpu")[-3000:]
        headers, body = receiver.requests[0]
        payload = Webhook(secret).verify(body, headers)
        assert payload["type"] == "submission.decided"
        assert payload["data"]["id"] == sid
        assert payload["data"]["verdict"]["decision"] == verdict["decision"]
    finally:
        server.shutdown()
    metrics = httpx.get(stack.api_url + "/metrics").text
    assert "moderation_intake_requests_total" in metrics and "moderation_verdicts" in metrics


def test_worker_killed_mid_batch_then_every_submission_is_final_with_one_verdict(
    stack: Stack, api_key: str
) -> None:
    ids = [_post(stack, api_key, 100 + i, f"crash test {i}") for i in range(6)]
    assert stack.db is not None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        with stack.db.connect() as conn:
            processing = conn.execute(
                text("SELECT count(*) FROM submissions WHERE status = 'processing' AND id = ANY(:ids)"),
                {"ids": ids},
            ).scalar_one()
        if processing:
            break
        time.sleep(0.01)
    assert processing, "no batch was ever taken"
    stack.kill("gpu")
    stack.start("gpu")
    results = _wait_final(stack, api_key, ids)
    assert all(r["verdict"] is not None for r in results.values()), results
    with stack.db.connect() as conn:
        counts = conn.execute(
            text("SELECT submission_id, count(*) FROM verdicts WHERE submission_id = ANY(:ids) GROUP BY 1"),
            {"ids": ids},
        ).all()
        outcomes = (
            conn.execute(
                text("SELECT outcome FROM processing_attempts WHERE submission_id = ANY(:ids)"), {"ids": ids}
            )
            .scalars()
            .all()
        )
    assert len(counts) == 6 and all(c == 1 for _, c in counts)
    assert "lease_expired" in outcomes, outcomes


def test_redis_flushed_with_jobs_queued_the_sweeper_recovers_them(stack: Stack, api_key: str) -> None:
    stack.kill("gpu")
    ids = [_post(stack, api_key, 200 + i, f"flush test {i}") for i in range(3)]
    redis.Redis.from_url(E2E_REDIS_URL).flushdb()
    stack.start("gpu")
    results = _wait_final(stack, api_key, ids)
    assert all(r["verdict"] is not None for r in results.values())


def test_bad_input_never_stops_the_service(stack: Stack, api_key: str) -> None:
    headers = {"Authorization": f"Bearer {api_key}"}
    bad = httpx.post(
        stack.api_url + "/v1/submissions",
        headers=headers,
        files={"image": ("x", b"\x89PNG\r\n\x1a\nbroken", "image/png")},
        data={"caption": "x"},
    )
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "image_undecodable"
    assert httpx.get(stack.api_url + "/healthz").status_code == 200
    sid = _post(stack, api_key, 300, "still works")
    assert _wait_final(stack, api_key, [sid])[sid]["verdict"] is not None


def test_api_killed_mid_intake_loses_nothing_it_acknowledged(stack: Stack, api_key: str) -> None:
    """Posts stream in from several clients; kill -9 the API among them: every 202 has its row, image and verdict."""
    import threading

    acknowledged: list[str] = []
    stop = threading.Event()

    def client(offset: int) -> None:
        with httpx.Client(timeout=10) as http:
            for n in range(200):
                if stop.is_set():
                    return
                try:
                    res = http.post(
                        stack.api_url + "/v1/submissions",
                        headers={"Authorization": f"Bearer {api_key}"},
                        files={"image": ("p.jpg", make_jpeg(160, 120, seed=1000 * offset + n), "image/jpeg")},
                        data={"caption": f"api crash {offset}-{n}"},
                    )
                except httpx.HTTPError:
                    return  # the API died under this request: it was never acknowledged
                if res.status_code == 202:
                    acknowledged.append(str(res.json()["id"]))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60
    while len(acknowledged) < 12 and time.monotonic() < deadline:
        time.sleep(0.01)
    stack.kill("api")
    stop.set()
    for thread in threads:
        thread.join()
    assert len(acknowledged) >= 12, "intake never got going:\n" + stack.log("api")[-3000:]
    stack.start("api")
    stack.wait_api()
    results = _wait_final(stack, api_key, acknowledged)
    assert all(r["verdict"] is not None for r in results.values())
    assert stack.db is not None
    with stack.db.connect() as conn:
        counts = conn.execute(
            text("SELECT count(*) FROM verdicts WHERE submission_id = ANY(:ids)"), {"ids": acknowledged}
        ).scalar_one()
    assert counts == len(acknowledged)
