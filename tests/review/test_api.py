"""The review JSON API: API tokens and session cookies with CSRF, roles, images, appeals."""

from __future__ import annotations

import re

from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from moderation.audit.models import AuditEntry
from moderation.blobs import LocalBlobStore
from moderation.config import Settings
from moderation.jobs import TASK_DELIVER_WEBHOOK
from moderation.reviewers.service import get_reviewer, issue_token
from moderation.tenants.service import issue_api_key
from tests.conftest import RecordingDispatcher
from tests.review.conftest import Account, login
from tests.review.helpers import add_review_item, make_tenant


def _seed(
    sessions: sessionmaker[Session], settings: Settings, blobs: LocalBlobStore, n: int = 2
) -> tuple[str, list[str]]:
    with sessions() as session, session.begin():
        tenant = make_tenant(session, settings, hook="https://hooks.example/x")
        key = issue_api_key(session, tenant)
        items = [
            str(
                add_review_item(
                    session,
                    tenant,
                    blobs,
                    settings,
                    caption=f"这是我家的猫 #{i}",
                    conflict=0.5 + i / 10,
                    external_id=f"post-{i}",
                    seed=i,
                ).submission_id
            )
            for i in range(n)
        ]
    return key, items


def _token(sessions: sessionmaker[Session], email: str) -> dict[str, str]:
    with sessions() as session, session.begin():
        token = issue_token(session, get_reviewer(session, email), actor="test")
    return {"Authorization": f"Bearer {token}"}


def test_programmatic_review_with_an_api_token(
    app_client: TestClient,
    sessions: sessionmaker[Session],
    settings: Settings,
    blobs: LocalBlobStore,
    accounts: dict[str, Account],
    dispatched: RecordingDispatcher,
) -> None:
    key, submission_ids = _seed(sessions, settings, blobs)
    headers = _token(sessions, accounts["reviewer"].email)
    claimed = app_client.post("/v1/review/claim", headers=headers, json={})
    assert claimed.status_code == 200, claimed.text
    item = claimed.json()
    assert item["state"] == "claimed" and item["lease_token"] and item["claimed_by"] == "reviewer@example.com"
    assert (
        item["submission"]["verdict"]["conflict_score"] == 0.6
        and item["submission"]["caption"] == "这是我家的猫 #1"
    )
    image = app_client.get(item["image_url"], headers=headers)
    assert image.status_code == 200 and image.headers["content-type"] == "image/jpeg"
    assert image.headers["cache-control"].startswith("private") and image.content[:2] == b"\xff\xd8"
    assert app_client.get(item["image_url"]).status_code == 401
    with sessions() as session:  # who saw which image, and when, is on record
        views = session.scalars(select(AuditEntry).where(AuditEntry.action == "submission.view_image")).all()
        assert [(v.actor, v.subject_id) for v in views] == [("reviewer@example.com", item["submission_id"])]
    listed = app_client.get("/v1/review/items?state=pending", headers=headers).json()["data"]
    assert [i["submission_id"] for i in listed] == [submission_ids[0]]
    assert listed[0]["lease_token"] is None
    bad = app_client.post(
        f"/v1/review/items/{item['id']}/decision",
        headers=headers,
        json={"lease_token": item["lease_token"], "decision": "reject"},
    )
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "categories_required"
    decided = app_client.post(
        f"/v1/review/items/{item['id']}/decision",
        headers=headers,
        json={
            "lease_token": item["lease_token"],
            "decision": "reject",
            "categories": ["spam"],
            "note": "广告",
        },
    )
    assert decided.status_code == 200, decided.text
    assert decided.json()["state"] == "decided" and decided.json()["lease_token"] is None
    again = app_client.post(
        f"/v1/review/items/{item['id']}/decision",
        headers=headers,
        json={"lease_token": item["lease_token"], "decision": "approve"},
    )
    assert again.status_code == 409 and again.json()["error"]["code"] == "review_lease_lost"
    tenant_view = app_client.get(
        f"/v1/submissions/{item['submission_id']}", headers={"Authorization": f"Bearer {key}"}
    )
    body = tenant_view.json()
    assert body["status"] == "reviewed" and body["final_decision"] == "block"
    assert body["review"]["categories"] == ["spam"] and body["review"]["state"] == "decided"
    # Who decided and the internal note stay inside the review tool.
    assert "note" not in body["review"] and "reviewer" not in body["review"]
    assert "广告" not in tenant_view.text
    assert len(dispatched.tasks(TASK_DELIVER_WEBHOOK)) == 1
    # Reviewers cannot read reports or the audit log; tenant keys are not reviewer tokens.
    assert app_client.get("/v1/review/reports/model", headers=headers).status_code == 403
    assert app_client.get("/v1/review/audit", headers=headers).status_code == 403
    assert app_client.post("/v1/review/claim", headers={"Authorization": f"Bearer {key}"}).status_code == 401
    lead = _token(sessions, accounts["lead"].email)
    report = app_client.get("/v1/review/reports/model", headers=lead).json()
    assert report["labeled"] == 1 and report["confusion"]["both_block"] == 1
    audit = app_client.get(f"/v1/review/audit?subject=review_item:{item['id']}", headers=lead).json()
    assert [e["action"] for e in audit] == ["review.decide", "review.claim"]
    assert app_client.get("/v1/review/overview", headers=headers).json()["pending"] >= 1


def test_session_cookies_are_hardened_and_writes_need_the_csrf_token(
    app_client: TestClient,
    sessions: sessionmaker[Session],
    settings: Settings,
    blobs: LocalBlobStore,
    accounts: dict[str, Account],
) -> None:
    _seed(sessions, settings, blobs, n=1)
    page = app_client.get("/review/login")
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert token is not None
    forged = app_client.post(
        "/review/login",
        data={"email": "lead@example.com", "password": accounts["lead"].password, "csrf_token": "forged"},
        follow_redirects=False,
    )
    assert forged.status_code == 400
    csrf = login(app_client, accounts["lead"])
    cookie = next(h for h in app_client.cookies.jar if h.name == "moderation_review_session")
    assert cookie.has_nonstandard_attr("HttpOnly") and not cookie.secure
    assert app_client.post("/v1/review/claim", json={}).status_code == 403
    cross = app_client.post(
        "/v1/review/claim", json={}, headers={"X-CSRF-Token": csrf, "Origin": "https://evil.example"}
    )
    assert cross.status_code == 403
    ok = app_client.post(
        "/v1/review/claim", json={}, headers={"X-CSRF-Token": csrf, "Origin": "http://localhost"}
    )
    assert ok.status_code == 200 and ok.json()["claimed_by"] == "lead@example.com"
    assert app_client.get("/v1/review/me").json()["role"] == "lead"
    out = app_client.post("/review/logout", data={"csrf_token": csrf}, follow_redirects=False)
    assert out.status_code == 303
    assert app_client.get("/v1/review/me").status_code == 401


def test_cookies_are_secure_off_localhost(
    settings: Settings, sessions: sessionmaker[Session], accounts: dict[str, Account], app_client: TestClient
) -> None:
    remote = TestClient(app_client.app, base_url="http://review.example.com")
    page = remote.get("/review/login")
    assert "secure" in page.headers["set-cookie"].lower()
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert token is not None
    response = remote.post(
        "/review/login",
        data={
            "email": "reviewer@example.com",
            "password": accounts["reviewer"].password,
            "csrf_token": token.group(1),
        },
        headers={"cookie": f"moderation_review_login={page.cookies['moderation_review_login']}"},
        follow_redirects=False,
    )
    assert response.status_code == 303
    set_cookie = response.headers["set-cookie"].lower()
    assert "moderation_review_session=" in set_cookie
    assert "httponly" in set_cookie and "samesite=lax" in set_cookie and "secure" in set_cookie


def test_the_login_form_locks_after_repeated_failures(
    app_client: TestClient, accounts: dict[str, Account], settings: Settings, sessions: sessionmaker[Session]
) -> None:
    for attempt in range(settings.review_max_failed_logins + 1):
        page = app_client.get("/review/login")
        token = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
        assert token is not None
        response = app_client.post(
            "/review/login",
            data={
                "email": "reviewer@example.com",
                "password": "not the password",
                "csrf_token": token.group(1),
            },
            follow_redirects=False,
        )
        expected = 401 if attempt < settings.review_max_failed_logins - 1 else 429
        assert response.status_code == expected, (attempt, response.text)
    assert "try again" in response.text
    with sessions() as session:
        actions = session.scalars(
            select(AuditEntry.action).where(AuditEntry.subject_id == "reviewer@example.com")
        ).all()
    assert "login.locked" in actions


def test_tenants_appeal_final_decisions(
    app_client: TestClient,
    sessions: sessionmaker[Session],
    settings: Settings,
    blobs: LocalBlobStore,
    accounts: dict[str, Account],
) -> None:
    key, (submission_id,) = _seed(sessions, settings, blobs, n=1)
    tenant_headers = {"Authorization": f"Bearer {key}"}
    early = app_client.post(f"/v1/submissions/{submission_id}/appeal", headers=tenant_headers, json={})
    assert early.status_code == 409 and early.json()["error"]["code"] == "not_appealable"
    reviewer = _token(sessions, accounts["reviewer"].email)
    item = app_client.post("/v1/review/claim", headers=reviewer).json()
    app_client.post(
        f"/v1/review/items/{item['id']}/decision",
        headers=reviewer,
        json={"lease_token": item["lease_token"], "decision": "approve"},
    )
    with sessions() as session, session.begin():
        other_key = issue_api_key(session, make_tenant(session, settings))
    stranger = app_client.post(
        f"/v1/submissions/{submission_id}/appeal", headers={"Authorization": f"Bearer {other_key}"}
    )
    assert stranger.status_code == 404
    appealed = app_client.post(
        f"/v1/submissions/{submission_id}/appeal", headers=tenant_headers, json={"reason": "这不是广告"}
    )
    assert appealed.status_code == 202, appealed.text
    assert appealed.json()["status"] == "in_review" and appealed.json()["review"]["state"] == "open"
    # The reviewer who decided it is not offered the appeal.
    assert app_client.post("/v1/review/claim", headers=reviewer).status_code == 204
    lead = _token(sessions, accounts["lead"].email)
    appeal_item = app_client.post("/v1/review/claim", headers=lead).json()
    assert appeal_item["kind"] == "appeal" and appeal_item["submission_id"] == submission_id


def test_a_blind_qa_review_hides_the_first_decision_from_all_but_leads(
    app_client: TestClient,
    sessions: sessionmaker[Session],
    settings: Settings,
    blobs: LocalBlobStore,
    accounts: dict[str, Account],
    dispatched: RecordingDispatcher,
) -> None:
    _, (submission_id,) = _seed(sessions, settings, blobs, n=1)
    lead = _token(sessions, accounts["lead"].email)
    reviewer = _token(sessions, accounts["reviewer"].email)
    first = app_client.post("/v1/review/claim", headers=lead, json={}).json()
    decision = {
        "lease_token": first["lease_token"],
        "decision": "reject",
        "categories": ["spam"],
        "note": "秘密备注",
    }
    assert (
        app_client.post(f"/v1/review/items/{first['id']}/decision", headers=lead, json=decision).status_code
        == 200
    )
    assert app_client.post("/v1/review/qa/sample", headers=lead, json={"count": 5}).status_code == 200
    qa = app_client.post("/v1/review/claim", headers=reviewer, json={}).json()
    assert qa["kind"] == "qa" and qa["submission_id"] == submission_id

    def leaks(text: str) -> list[str]:
        return [
            secret for secret in ("lead@example.com", "秘密备注", '"block"', '"reject"') if secret in text
        ]

    # Whatever the reviewer reads, through the API or the UI, shows nothing of the first decision.
    api_reads = [
        app_client.get(f"/v1/review/items/{qa['id']}", headers=reviewer),
        app_client.get(f"/v1/review/items/{first['id']}", headers=reviewer),
        app_client.get("/v1/review/items?state=decided", headers=reviewer),
        app_client.get("/v1/review/items", headers=reviewer),
    ]
    for response in api_reads:
        assert response.status_code == 200 and leaks(response.text) == [], response.text
    assert app_client.get(f"/v1/review/items/{qa['id']}", headers=reviewer).json()["origin_id"] is None
    login(app_client, accounts["reviewer"])
    for page in (
        f"/review/items/{qa['id']}",
        f"/review/items/{first['id']}",
        f"/review/search?q={submission_id[:8]}",
    ):
        html = app_client.get(page).text
        assert "lead@example.com" not in html and "秘密备注" not in html and "rejected" not in html, page
        assert "Only leads see the audit trail" in html or "search" in page
    # A lead sees all of it.
    lead_view = app_client.get(f"/v1/review/items/{first['id']}", headers=lead).json()
    assert (lead_view["decided_by"], lead_view["note"]) == ("lead@example.com", "秘密备注")
    assert app_client.get(f"/v1/review/items/{qa['id']}", headers=lead).json()["origin_id"] == first["id"]
    # Once the QA review is decided, the first decision is visible again.
    done = {"lease_token": qa["lease_token"], "decision": "approve"}
    assert (
        app_client.post(f"/v1/review/items/{qa['id']}/decision", headers=reviewer, json=done).status_code
        == 200
    )
    after = app_client.get(f"/v1/review/items/{first['id']}", headers=reviewer).json()
    assert after["decision"] == "reject" and after["decided_by"] == "lead@example.com"


def test_review_items_come_a_page_at_a_time_open_ones_first(
    app_client: TestClient,
    sessions: sessionmaker[Session],
    settings: Settings,
    blobs: LocalBlobStore,
    accounts: dict[str, Account],
    dispatched: RecordingDispatcher,
) -> None:
    _seed(sessions, settings, blobs, n=5)
    lead = _token(sessions, accounts["lead"].email)
    first = app_client.post("/v1/review/claim", headers=lead, json={}).json()
    decision = {"lease_token": first["lease_token"], "decision": "reject", "categories": ["spam"]}
    assert (
        app_client.post(f"/v1/review/items/{first['id']}/decision", headers=lead, json=decision).status_code
        == 200
    )
    everything = app_client.get("/v1/review/items?limit=500", headers=lead).json()
    assert everything["next_cursor"] is None and len(everything["data"]) == 5
    assert [i["state"] for i in everything["data"]] == ["pending"] * 4 + ["decided"]
    paged: list[str] = []
    cursor = None
    while True:
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = app_client.get("/v1/review/items", params=params, headers=lead).json()
        paged += [i["id"] for i in page["data"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert paged == [i["id"] for i in everything["data"]]  # every item once, in the same order
    bad = app_client.get("/v1/review/items", params={"cursor": "not-a-cursor"}, headers=lead)
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_cursor"
