"""The tenants admin page's blocklist and known-image forms: admins only, CSRF, inline errors, audited."""

from __future__ import annotations

import html
import re
import uuid

from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from moderation.audit.models import AuditEntry
from moderation.blobs import LocalBlobStore
from moderation.config import Settings
from moderation.policy.models import KnownImage
from moderation.submissions.models import Submission, SubmissionStatus
from moderation.tenants.models import Tenant
from tests.review.conftest import Account, login
from tests.review.helpers import add_review_item, make_tenant


def _seed(
    sessions: sessionmaker[Session], settings: Settings, blobs: LocalBlobStore
) -> tuple[Tenant, uuid.UUID]:
    with sessions() as session, session.begin():
        tenant = make_tenant(session, settings, "acme-social")
        item = add_review_item(
            session, tenant, blobs, settings, caption="Genuine Nike Air Jordans, only $25! 限时特价", seed=1
        )
        submission_id = item.submission_id
        session.expunge(tenant)
    return tenant, submission_id


def _blocklist_of(sessions: sessionmaker[Session], tenant_id: uuid.UUID) -> tuple[dict[str, list[str]], int]:
    with sessions() as session:
        row = session.get(Tenant, tenant_id)
        assert row is not None
        return dict((row.policy or {}).get("blocklist") or {}), row.policy_version


def _audit(sessions: sessionmaker[Session], action: str) -> list[AuditEntry]:
    with sessions() as session:
        return list(
            session.scalars(select(AuditEntry).where(AuditEntry.action == action).order_by(AuditEntry.at))
        )


def _review(client: TestClient, csrf: str) -> str:
    """Claim the next item on the review screen and reject it; the submission is then reviewed."""
    headers = {"X-CSRF-Token": csrf, "X-Requested-With": "fetch"}
    item = client.post("/review/work/next", json={}, headers=headers).json()
    lease = re.search(r'data-lease-token="([^"]+)"', item["html"])
    assert lease is not None
    decided = client.post(
        f"/review/work/{item['item_id']}/decide",
        json={"lease_token": lease.group(1), "decision": "reject", "categories": ["scam_fraud"]},
        headers=headers,
    )
    assert decided.status_code == 200, decided.text
    return str(item["item_id"])


def test_admins_edit_the_blocklist_and_bad_entries_are_shown_inline(
    app_client: TestClient,
    sessions: sessionmaker[Session],
    settings: Settings,
    blobs: LocalBlobStore,
    accounts: dict[str, Account],
) -> None:
    tenant, _ = _seed(sessions, settings, blobs)
    csrf = login(app_client, accounts["admin"])
    page = app_client.get("/review/admin/tenants")
    assert page.status_code == 200 and f'action="/review/admin/tenants/{tenant.id}/blocklist"' in page.text
    url = f"/review/admin/tenants/{tenant.id}/blocklist"
    _, version = _blocklist_of(sessions, tenant.id)

    saved = app_client.post(
        url,
        data={
            "csrf_token": csrf,
            "terms": "fake sneakers\n\n  假货  \nreplica watches\nfake sneakers\n",
            "patterns": r"only \$\d+ today" + "\n",
        },
        follow_redirects=False,
    )
    assert saved.status_code == 303, saved.text
    assert (
        saved.headers["location"].endswith(f"#bl-{tenant.id}")
        and "toast=Blocklist" in saved.headers["location"]
    )
    stored, new_version = _blocklist_of(sessions, tenant.id)
    assert stored == {
        "terms": ["fake sneakers", "假货", "replica watches"],
        "patterns": [r"only \$\d+ today"],
    }
    assert new_version == version + 1
    shown = app_client.get("/review/admin/tenants").text
    assert "假货\nreplica watches" in shown and html.escape(r"only \$\d+ today") in shown
    [entry] = _audit(sessions, "tenant.blocklist")
    assert entry.actor == "admin@example.com" and entry.subject_type == "tenant"
    assert entry.subject_id == "acme-social" and entry.tenant_id == tenant.id
    assert entry.before == {"terms": [], "patterns": [], "policy_version": version}
    assert entry.after == {
        "terms": ["fake sneakers", "假货", "replica watches"],
        "patterns": [r"only \$\d+ today"],
        "policy_version": version + 1,
    }

    # An invalid regex is shown on the page with the submitted text kept; nothing changes.
    bad = app_client.post(
        url, data={"csrf_token": csrf, "terms": "new term\n盗版", "patterns": "(unclosed\n"}
    )
    assert bad.status_code == 422 and "text/html" in bad.headers["content-type"]
    assert 'class="alert" role="alert"' in bad.text and "does not compile" in bad.text
    assert "new term\n盗版" in bad.text and "(unclosed" in bad.text
    unsafe = app_client.post(url, data={"csrf_token": csrf, "terms": "", "patterns": "(a+)+b"})
    assert unsafe.status_code == 422 and "nested quantifiers" in unsafe.text
    too_many = "\n".join(f"term {i}" for i in range(settings.blocklist_max_terms + 1))
    crowded = app_client.post(url, data={"csrf_token": csrf, "terms": too_many, "patterns": ""})
    assert (
        crowded.status_code == 422
        and f"at most {settings.blocklist_max_terms} blocklist terms" in crowded.text
    )
    assert _blocklist_of(sessions, tenant.id) == (stored, new_version)
    assert len(_audit(sessions, "tenant.blocklist")) == 1

    # Without the CSRF token nothing changes either.
    forged = app_client.post(url, data={"terms": "x", "patterns": ""})
    assert forged.status_code == 403
    # Clearing both lists empties the blocklist (and is audited).
    cleared = app_client.post(
        url, data={"csrf_token": csrf, "terms": "", "patterns": ""}, follow_redirects=False
    )
    assert cleared.status_code == 303
    assert _blocklist_of(sessions, tenant.id)[0] == {"terms": [], "patterns": []}
    assert len(_audit(sessions, "tenant.blocklist")) == 2


def test_reviewers_and_leads_may_not_change_blocklists_or_known_images(
    app_client: TestClient,
    sessions: sessionmaker[Session],
    settings: Settings,
    blobs: LocalBlobStore,
    accounts: dict[str, Account],
) -> None:
    tenant, submission_id = _seed(sessions, settings, blobs)
    for role in ("reviewer", "lead"):
        app_client.cookies.clear()
        csrf = login(app_client, accounts[role])
        blocklist = app_client.post(
            f"/review/admin/tenants/{tenant.id}/blocklist",
            data={"csrf_token": csrf, "terms": "fake sneakers", "patterns": "(bad"},
        )
        assert blocklist.status_code == 403, role
        added = app_client.post(
            f"/review/admin/tenants/{tenant.id}/known-images",
            data={"csrf_token": csrf, "submission_id": str(submission_id), "label": "x"},
        )
        assert added.status_code == 403, role
        removed = app_client.post(
            f"/review/admin/tenants/{tenant.id}/known-images/{uuid.uuid4()}/remove", data={"csrf_token": csrf}
        )
        assert removed.status_code == 403, role
    assert _blocklist_of(sessions, tenant.id)[0] == {}
    with sessions() as session:
        assert session.scalars(select(KnownImage)).all() == []
        assert session.scalars(select(AuditEntry).where(AuditEntry.action.like("tenant.%"))).all() == []


def test_admins_add_a_known_image_from_a_reviewed_submission_and_remove_it(
    app_client: TestClient,
    sessions: sessionmaker[Session],
    settings: Settings,
    blobs: LocalBlobStore,
    accounts: dict[str, Account],
) -> None:
    tenant, submission_id = _seed(sessions, settings, blobs)
    csrf = login(app_client, accounts["admin"])
    url = f"/review/admin/tenants/{tenant.id}/known-images"

    # Not reviewed yet: refused on the page, with what was typed kept.
    early = app_client.post(
        url, data={"csrf_token": csrf, "submission_id": str(submission_id), "label": "Fake Jordans"}
    )
    assert early.status_code == 409 and "only a reviewed submission" in early.text
    assert f'value="{submission_id}"' in early.text and 'value="Fake Jordans"' in early.text
    garbled = app_client.post(url, data={"csrf_token": csrf, "submission_id": "not-an-id", "label": "x"})
    assert garbled.status_code == 422 and "enter the id of a reviewed submission" in garbled.text
    unknown = app_client.post(
        url, data={"csrf_token": csrf, "submission_id": str(uuid.uuid4()), "label": "x"}
    )
    assert unknown.status_code == 404 and "submission not found" in unknown.text
    assert app_client.post(url, data={"submission_id": str(submission_id), "label": "x"}).status_code == 403

    _review(app_client, csrf)
    with sessions() as session:
        submission = session.get(Submission, submission_id)
        assert submission is not None and submission.status == SubmissionStatus.reviewed
    added = app_client.post(
        url,
        data={"csrf_token": csrf, "submission_id": f" {submission_id} ", "label": "Fake Jordans 假鞋"},
        follow_redirects=False,
    )
    assert added.status_code == 303, added.text
    assert added.headers["location"].endswith(f"#ki-{tenant.id}")
    with sessions() as session:
        [known] = session.scalars(select(KnownImage)).all()
        session.expunge(known)
    assert known.label == "Fake Jordans 假鞋" and known.created_by == "admin@example.com"
    assert known.source_submission_id == submission_id and known.tenant_id == tenant.id

    page = app_client.get("/review/admin/tenants")
    assert "Fake Jordans 假鞋" in page.text and f'href="/review/search?q={submission_id}"' in page.text
    remove_url = f"/review/admin/tenants/{tenant.id}/known-images/{known.id}/remove"
    assert remove_url in page.text and "admin@example.com" in page.text
    again = app_client.post(
        url, data={"csrf_token": csrf, "submission_id": str(submission_id), "label": "again"}
    )
    assert again.status_code == 409 and "already a known image" in again.text

    [add_entry] = _audit(sessions, "tenant.known_image_add")
    assert add_entry.actor == "admin@example.com" and add_entry.before is None and add_entry.after is not None
    assert (add_entry.subject_type, add_entry.subject_id) == ("known_image", str(known.id))
    assert add_entry.submission_id == submission_id and add_entry.tenant_id == tenant.id
    assert add_entry.after["label"] == "Fake Jordans 假鞋" and add_entry.after["tenant"] == "acme-social"
    assert add_entry.after["source_submission_id"] == str(submission_id)

    assert app_client.post(remove_url, data={}).status_code == 403
    removed = app_client.post(remove_url, data={"csrf_token": csrf}, follow_redirects=False)
    assert removed.status_code == 303 and "toast=Removed" in removed.headers["location"]
    with sessions() as session:
        assert session.scalars(select(KnownImage)).all() == []
    assert "No known images yet." in app_client.get("/review/admin/tenants").text
    [remove_entry] = _audit(sessions, "tenant.known_image_remove")
    assert remove_entry.actor == "admin@example.com" and remove_entry.after is None
    assert remove_entry.before is not None and remove_entry.before["label"] == "Fake Jordans 假鞋"
    assert (remove_entry.subject_type, remove_entry.subject_id) == ("known_image", str(known.id))
    assert remove_entry.submission_id == submission_id
    # Removing it twice is a 404 page, and the audit log shows both changes to leads and admins.
    assert app_client.post(remove_url, data={"csrf_token": csrf}).status_code == 404
    audit_page = app_client.get("/review/audit?action=tenant.known_image")
    assert "tenant.known_image_add" in audit_page.text and "tenant.known_image_remove" in audit_page.text
