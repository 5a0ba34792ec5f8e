"""A tenant manages its blocklist and known images over the API."""

from __future__ import annotations

import uuid

from fastapi.testclient import TestClient
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from moderation.submissions.models import Decision, Submission, SubmissionStatus
from tests.api.conftest import ApiTenant
from tests.conftest import make_jpeg


def test_blocklist_round_trip(client: TestClient, tenant: ApiTenant, other_tenant: ApiTenant) -> None:
    empty = client.get("/v1/blocklist", headers=tenant.headers).json()
    assert empty["terms"] == [] and empty["patterns"] == []
    res = client.put(
        "/v1/blocklist",
        json={"terms": ["free money", "加微信", "free money"], "patterns": [r"1[3-9]\d{9}"]},
        headers=tenant.headers,
    )
    assert res.status_code == 200, res.text
    body = res.json()
    assert body["terms"] == ["free money", "加微信"] and body["patterns"] == [r"1[3-9]\d{9}"]
    assert body["policy_version"] == empty["policy_version"] + 1
    assert client.get("/v1/blocklist", headers=tenant.headers).json() == body
    assert client.get("/v1/blocklist", headers=other_tenant.headers).json()["terms"] == []


def test_unsafe_blocklist_patterns_are_refused(client: TestClient, tenant: ApiTenant) -> None:
    res = client.put("/v1/blocklist", json={"patterns": ["(a+)+$"]}, headers=tenant.headers)
    assert res.status_code == 422 and res.json()["error"]["code"] == "unsafe_pattern"
    res = client.put("/v1/blocklist", json={"patterns": ["(broken"]}, headers=tenant.headers)
    assert res.status_code == 422 and res.json()["error"]["code"] == "invalid_blocklist"
    assert client.put("/v1/blocklist", json={"terms": "nope"}, headers=tenant.headers).status_code == 422
    assert client.get("/v1/blocklist").status_code == 401


def test_known_images_round_trip(
    client: TestClient, tenant: ApiTenant, other_tenant: ApiTenant, sessions: sessionmaker[Session]
) -> None:
    res = client.post(
        "/v1/submissions",
        files={"image": ("a.jpg", make_jpeg(200, 150, seed=5), "image/jpeg")},
        data={"caption": "leaked ticket"},
        headers=tenant.headers,
    )
    sid = res.json()["id"]
    add = {"submission_id": sid, "label": "leaked ticket"}
    res = client.post("/v1/known-images", json=add, headers=tenant.headers)
    assert res.status_code == 409 and res.json()["error"]["code"] == "submission_not_reviewed"
    with sessions() as session, session.begin():
        session.execute(
            update(Submission)
            .where(Submission.id == uuid.UUID(sid))
            .values(status=SubmissionStatus.reviewed, final_decision=Decision.block)
        )
    assert client.post("/v1/known-images", json=add, headers=other_tenant.headers).status_code == 404
    res = client.post("/v1/known-images", json=add, headers=tenant.headers)
    assert res.status_code == 201, res.text
    known = res.json()
    assert known["label"] == "leaked ticket" and known["source_submission_id"] == sid
    assert len(known["phash"]) == 16 and known["created_by"] == "api"
    assert client.post("/v1/known-images", json=add, headers=tenant.headers).status_code == 409
    assert [k["id"] for k in client.get("/v1/known-images", headers=tenant.headers).json()] == [known["id"]]
    assert client.get("/v1/known-images", headers=other_tenant.headers).json() == []
    assert client.delete(f"/v1/known-images/{known['id']}", headers=other_tenant.headers).status_code == 404
    assert client.delete(f"/v1/known-images/{known['id']}", headers=tenant.headers).status_code == 204
    assert client.delete("/v1/known-images/not-a-uuid", headers=tenant.headers).status_code == 404
    assert client.get("/v1/known-images", headers=tenant.headers).json() == []
