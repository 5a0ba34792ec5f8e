"""The review UI end to end in Chromium: the real API and workers, a real webhook, the keyboard."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy.orm import sessionmaker
from standardwebhooks.webhooks import Webhook

from moderation.blobs import LocalBlobStore
from moderation.config import Settings
from tests.conftest import make_jpeg
from tests.e2e.conftest import Stack
from tests.ui.conftest import create_reviewer
from tests.ui.demo import seed_demo
from tests.webhooks.conftest import start_receiver

VIEWPORT = {"width": 1440, "height": 900}


def _wait_status(
    stack: Stack, key: str, sid: str, statuses: set[str], timeout: float = 180
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body: dict[str, Any] = httpx.get(
            f"{stack.api_url}/v1/submissions/{sid}", headers={"Authorization": f"Bearer {key}"}
        ).json()
        if body["status"] in statuses:
            return body
        time.sleep(0.3)
    raise AssertionError(f"submission {sid} never reached {statuses}:\n{stack.log('gpu')[-3000:]}")


def _login(page: Any, stack: Stack, email: str, password: str) -> None:
    page.goto(stack.api_url + "/review/login")
    page.fill('input[name="email"]', email)
    page.fill('input[name="password"]', password)
    page.click('button[type="submit"]')
    page.wait_for_url(re.compile(r".*/review$"))


def test_a_reviewer_decides_with_the_keyboard_and_the_tenant_hears_of_it(
    ui_stack: Stack, browser: Any, tmp_path: Path
) -> None:
    key = ui_stack.cli("tenants", "create", "acme-ui", "--json").split('"api_key": "')[1].split('"')[0]
    tenant = {"Authorization": f"Bearer {key}"}
    # Everything this tenant posts waits for a person.
    assert (
        httpx.patch(ui_stack.api_url + "/v1/tenant", headers=tenant, json={"min_confidence": 1.0}).status_code
        == 200
    )
    receiver, server = start_receiver()
    try:
        hook = httpx.post(
            ui_stack.api_url + "/v1/webhook-endpoints",
            headers=tenant,
            json={"url": receiver.url, "events": ["submission.reviewed"]},
        )
        assert hook.status_code == 201, hook.text
        secret = hook.json()["secret"]
        posted = httpx.post(
            ui_stack.api_url + "/v1/submissions",
            headers=tenant,
            files={"image": ("photo.jpg", make_jpeg(480, 360, seed=5), "image/jpeg")},
            data={"caption": "周末去海边 A weekend at the beach", "external_id": "beach-1"},
            timeout=30,
        )
        assert posted.status_code == 202, posted.text
        sid = posted.json()["id"]
        assert _wait_status(ui_stack, key, sid, {"in_review"})["verdict"]["decision"] == "review"
        create_reviewer(ui_stack, "ann@example.com", "reviewer", "ann's long password")

        page = browser.new_page(viewport=VIEWPORT)
        page.goto(ui_stack.api_url + "/review")
        page.wait_for_url(re.compile(r".*/review/login\?next=/review$"))
        page.screenshot(path=str(tmp_path / "login.png"))
        _login(page, ui_stack, "ann@example.com", "ann's long password")
        assert page.locator(".stat-value").first.inner_text() == "1"
        assert page.locator("text=周末去海边 A weekend at the beach").count() == 1

        page.keyboard.press("Enter")
        page.wait_for_selector("#item")
        assert "周末去海边" in page.locator(".caption").inner_text()
        assert page.locator("#media.is-blurred").count() == 1
        page.wait_for_function("document.getElementById('media-img').complete")
        assert page.evaluate("document.getElementById('media-img').naturalWidth") == 480
        page.keyboard.press("u")
        assert page.locator("#media.is-blurred").count() == 0
        page.wait_for_timeout(300)
        page.screenshot(path=str(tmp_path / "review.png"))
        page.keyboard.press("a")
        page.wait_for_selector(".toast:has-text('Approved')")
        page.wait_for_selector("#empty")

        body = _wait_status(ui_stack, key, sid, {"reviewed"}, timeout=30)
        assert body["final_decision"] == "allow" and body["review"]["state"] == "decided"
        assert "ann@example.com" not in json.dumps(body)  # who decided stays inside the review tool
        assert receiver.received.wait(60), "webhook never arrived:\n" + ui_stack.log("cpu")[-3000:]
        headers, raw = receiver.requests[0]
        payload = Webhook(secret).verify(raw, headers)
        assert payload["type"] == "submission.reviewed" and payload["data"]["id"] == sid
        assert payload["data"]["review"]["decision"] == "approve"
        assert "ann@example.com" not in raw.decode()
        page.close()
    finally:
        server.shutdown()


def test_screens_of_a_busy_queue(ui_stack: Stack, browser: Any, screenshot_dir: Path) -> None:
    assert ui_stack.db is not None
    settings = Settings(
        database_url=ui_stack.env["MODERATION_DATABASE_URL"],
        blob_dir=Path(ui_stack.env["MODERATION_BLOB_DIR"]),
        blob_fsync=False,
    )
    seed_demo(
        sessionmaker(bind=ui_stack.db, expire_on_commit=False),
        settings,
        LocalBlobStore(Path(ui_stack.env["MODERATION_BLOB_DIR"]), fsync=False),
    )
    create_reviewer(ui_stack, "lena.ortiz@example.com", "lead", "lena's long password")
    page = browser.new_page(viewport=VIEWPORT)
    page.goto(ui_stack.api_url + "/review/login")
    page.screenshot(path=str(screenshot_dir / "login.png"))
    _login(page, ui_stack, "lena.ortiz@example.com", "lena's long password")
    page.screenshot(path=str(screenshot_dir / "queue.png"), full_page=True)

    page.click("#start-reviewing")
    page.wait_for_selector("#item")
    # The appeal comes first, and Ann, who rejected it, is in its history.
    assert "Genuine Nike Air Jordan" in page.locator(".caption").inner_text()
    assert (
        page.locator(".callout-accent").count() == 1
        and "ann.lee@example.com" in page.locator(".timeline").inner_text()
    )
    page.keyboard.press("u")
    page.wait_for_function("document.getElementById('media-img').complete")
    page.wait_for_timeout(300)
    page.screenshot(path=str(screenshot_dir / "review-appeal.png"))
    page.keyboard.press("s")
    page.wait_for_selector(".toast:has-text('Skipped')")
    page.wait_for_function("document.querySelector('.caption').textContent.includes('街上')")
    page.wait_for_selector(".toast", state="detached")
    page.screenshot(path=str(screenshot_dir / "review-blurred.png"))
    page.keyboard.press("r")
    assert page.locator("#reject-picker").is_visible()
    page.screenshot(path=str(screenshot_dir / "review-reject.png"))
    page.keyboard.press("Enter")
    page.wait_for_selector(".toast:has-text('Rejected')")
    page.wait_for_selector("#item")

    page.goto(ui_stack.api_url + "/review/reports")
    assert page.locator("h2:has-text('Model versus reviewers')").count() == 1
    page.screenshot(path=str(screenshot_dir / "reports.png"), full_page=True)
    page.goto(ui_stack.api_url + "/review/audit")
    page.screenshot(path=str(screenshot_dir / "audit.png"))
    page.goto(ui_stack.api_url + "/review/search?q=mk-20417")
    page.wait_for_selector(".timeline")
    page.screenshot(path=str(screenshot_dir / "item.png"), full_page=True)
    page.close()
    for png in screenshot_dir.glob("*.png"):
        assert png.stat().st_size > 10_000, png
