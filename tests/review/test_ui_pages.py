"""The server-rendered review UI: pages per role, the review screen's round trips, admin changes."""

from __future__ import annotations

import re

from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from moderation.audit.models import AuditEntry
from moderation.blobs import LocalBlobStore
from moderation.config import Settings
from moderation.tenants.models import Tenant
from tests.review.conftest import Account, login
from tests.review.helpers import add_review_item, make_tenant


def _seed(sessions: sessionmaker[Session], settings: Settings, blobs: LocalBlobStore) -> Tenant:
    with sessions() as session, session.begin():
        tenant = make_tenant(session, settings, "acme-social", hook="https://hooks.example/x")
        add_review_item(
            session,
            tenant,
            blobs,
            settings,
            caption="Genuine Nike Air Jordans, only $25! 限时特价",
            conflict=0.74,
            scores={"scam_fraud": 0.81, "violence": 0.66},
            external_id="post-42",
            description="A plain white sneaker without a logo on a wooden floor.",
            explanation="The caption claims a branded product the photo does not show.",
            seed=1,
        )
        add_review_item(session, tenant, blobs, settings, caption="我家的猫", conflict=0.45, seed=2)
        session.expunge(tenant)
    return tenant


def test_pages_need_a_login_and_respect_roles(
    app_client: TestClient,
    sessions: sessionmaker[Session],
    settings: Settings,
    blobs: LocalBlobStore,
    accounts: dict[str, Account],
) -> None:
    _seed(sessions, settings, blobs)
    response = app_client.get("/review/reports", follow_redirects=False)
    assert (
        response.status_code == 303 and response.headers["location"] == "/review/login?next=/review/reports"
    )
    login(app_client, accounts["reviewer"])
    home = app_client.get("/review")
    assert home.status_code == 200 and "Genuine Nike Air Jordans" in home.text and "我家的猫" in home.text
    assert "default-src 'self'" in home.headers["content-security-policy"]
    assert home.headers["cache-control"] == "no-store" and home.headers["x-frame-options"] == "DENY"
    assert "Reports" not in home.text and "Escalations" not in home.text
    assert app_client.get("/review/reports").status_code == 403
    assert app_client.get("/review/audit").status_code == 403
    assert app_client.get("/review/admin/tenants").status_code == 403
    assert app_client.get("/review/work?queue=escalations").status_code == 403
    assert app_client.get("/review/history").status_code == 200
    found = app_client.get("/review/search?q=post-42", follow_redirects=False)
    assert found.status_code == 303 and found.headers["location"].startswith("/review/items/")
    item_page = app_client.get(found.headers["location"])
    assert item_page.status_code == 200 and "A plain white sneaker" in item_page.text
    assert 'class="media-frame is-blurred"' in item_page.text and "violence 0.66" in item_page.text
    assert "Reassign" not in item_page.text
    static = app_client.get("/review/static/review.css")
    assert static.status_code == 200 and static.headers["content-type"].startswith("text/css")
    assert app_client.get("/review/static/../routes.py").status_code == 404


def test_the_review_screen_decides_and_returns_the_next_item_in_one_round_trip(
    app_client: TestClient,
    sessions: sessionmaker[Session],
    settings: Settings,
    blobs: LocalBlobStore,
    accounts: dict[str, Account],
) -> None:
    _seed(sessions, settings, blobs)
    csrf = login(app_client, accounts["reviewer"])
    headers = {"X-CSRF-Token": csrf, "X-Requested-With": "fetch"}
    shell = app_client.get("/review/work")
    assert shell.status_code == 200 and 'id="stage"' in shell.text and 'id="item"' not in shell.text
    first = app_client.post("/review/work/next", json={"queue": "review"}, headers=headers).json()
    assert "Genuine Nike Air Jordans" in first["html"] and "<kbd>A</kbd> Approve" in first["html"]
    lease = re.search(r'data-lease-token="([^"]+)"', first["html"])
    assert lease is not None
    # The held item is shown again on reload, without claiming another.
    assert "Genuine Nike Air Jordans" in app_client.get("/review/work").text
    # Suggested categories are preselected in the reject picker.
    assert re.search(r'class="chip is-on" data-category="scam_fraud"', first["html"])
    no_csrf = app_client.post(
        f"/review/work/{first['item_id']}/decide", json={"lease_token": lease.group(1), "decision": "approve"}
    )
    assert no_csrf.status_code == 403
    decided = app_client.post(
        f"/review/work/{first['item_id']}/decide",
        json={
            "lease_token": lease.group(1),
            "decision": "reject",
            "categories": ["scam_fraud"],
            "queue": "review",
        },
        headers=headers,
    ).json()
    assert decided["toast"] == "Rejected · scam fraud"
    assert "我家的猫" in decided["html"] and decided["item_id"] != first["item_id"]
    lease = re.search(r'data-lease-token="([^"]+)"', decided["html"])
    assert lease is not None
    skipped = app_client.post(
        f"/review/work/{decided['item_id']}/skip", json={"lease_token": lease.group(1)}, headers=headers
    ).json()
    assert skipped["toast"] == "Skipped" and skipped["item_id"] is None and "All clear" in skipped["html"]
    lost = app_client.post(
        f"/review/work/{decided['item_id']}/decide",
        json={"lease_token": lease.group(1), "decision": "approve"},
        headers=headers,
    )
    assert lost.status_code == 409 and lost.json()["error"]["code"] == "review_lease_lost"
    history = app_client.get("/review/history")
    assert "Genuine Nike Air Jordans" in history.text and "scam fraud" in history.text


def test_leads_see_reports_audit_and_sample_for_qa_and_admins_change_tenants(
    app_client: TestClient,
    sessions: sessionmaker[Session],
    settings: Settings,
    blobs: LocalBlobStore,
    accounts: dict[str, Account],
) -> None:
    tenant = _seed(sessions, settings, blobs)
    csrf = login(app_client, accounts["lead"])
    headers = {"X-CSRF-Token": csrf, "X-Requested-With": "fetch"}
    item = app_client.post("/review/work/next", json={}, headers=headers).json()
    lease = re.search(r'data-lease-token="([^"]+)"', item["html"])
    assert lease is not None
    app_client.post(
        f"/review/work/{item['item_id']}/decide",
        json={"lease_token": lease.group(1), "decision": "approve"},
        headers=headers,
    )
    reports = app_client.get("/review/reports")
    assert (
        reports.status_code == 200
        and "Model versus reviewers" in reports.text
        and "acme-social" in reports.text
    )
    sampled = app_client.post(
        "/review/qa/sample", data={"csrf_token": csrf, "count": 5, "days": 30}, follow_redirects=False
    )
    assert sampled.status_code == 303 and "1+items+sent+to+QA" in sampled.headers["location"]
    assert app_client.post("/review/qa/sample", data={"count": 5}).status_code == 403
    audit = app_client.get("/review/audit?action=review.")
    assert "review.qa_sample" in audit.text and "review.decide" in audit.text
    assert app_client.get("/review/admin/tenants").status_code == 403
    app_client.cookies.clear()
    csrf = login(app_client, accounts["admin"])
    page = app_client.get("/review/admin/tenants")
    assert page.status_code == 200 and "acme-social" in page.text
    saved = app_client.post(
        f"/review/admin/tenants/{tenant.id}",
        data={
            "csrf_token": csrf,
            "allow_threshold": "0.25",
            "block_threshold": "0.85",
            "min_confidence": "0.6",
            "category_review_threshold": "0.6",
            "category_block_threshold": "0.95",
            "categories": "counterfeit: selling fake branded goods as genuine",
        },
        follow_redirects=False,
    )
    assert saved.status_code == 303, saved.text
    with sessions() as session:
        entry = session.scalars(select(AuditEntry).where(AuditEntry.action == "tenant.settings")).one()
        row = session.get(Tenant, tenant.id)
    assert entry.actor == "admin@example.com" and entry.before is not None and entry.after is not None
    assert entry.before["allow_threshold"] == 0.3 and entry.after["allow_threshold"] == 0.25
    assert entry.after["categories"] == [
        {"name": "counterfeit", "definition": "selling fake branded goods as genuine"}
    ]
    assert row is not None and row.block_threshold == 0.85


def test_the_dashboard_pages_through_every_open_item(
    app_client: TestClient,
    sessions: sessionmaker[Session],
    settings: Settings,
    blobs: LocalBlobStore,
    accounts: dict[str, Account],
) -> None:
    from api.ui.routes import DASHBOARD_PAGE_ITEMS

    total = DASHBOARD_PAGE_ITEMS + 7
    with sessions() as session, session.begin():
        tenant = make_tenant(session, settings)
        for n in range(total):
            add_review_item(session, tenant, blobs, settings, caption=f"open item number {n:03d}", seed=n)
    login(app_client, accounts["reviewer"])
    seen: list[str] = []
    url: str | None = "/review"
    while url is not None:
        page = app_client.get(url)
        assert page.status_code == 200
        seen += re.findall(r"open item number (\d{3})", page.text)
        following = re.search(r'href="(/review\?after=[^"]+)" id="next-page"', page.text)
        url = following.group(1).replace("&amp;", "&") if following else None
    assert sorted(seen) == [f"{n:03d}" for n in range(total)] and len(seen) == total
    assert "Most urgent" in page.text  # the last page links back to the first


def test_an_erased_submission_shows_no_image_and_no_content(
    app_client: TestClient,
    sessions: sessionmaker[Session],
    settings: Settings,
    blobs: LocalBlobStore,
    accounts: dict[str, Account],
) -> None:
    from moderation.review.models import ReviewDecision, ReviewState
    from moderation.submissions.erasure import erase_submission
    from moderation.submissions.models import Submission, SubmissionStatus

    with sessions() as session, session.begin():
        tenant = make_tenant(session, settings)
        item = add_review_item(session, tenant, blobs, settings, caption="Ana's flat, 12 Rua Augusta", seed=5)
        session.get_one(Submission, item.submission_id).status = SubmissionStatus.reviewed
        item.state, item.decision = ReviewState.decided, ReviewDecision.approve
        session.flush()
        erase_submission(session, tenant, item.submission_id)
        item_id = item.id
    login(app_client, accounts["lead"])
    page = app_client.get(f"/review/items/{item_id}")
    assert page.status_code == 200
    assert 'id="media-erased"' in page.text and 'id="media-img"' not in page.text
    assert "Rua Augusta" not in page.text
