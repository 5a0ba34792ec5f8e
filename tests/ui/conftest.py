"""The real service for browser tests: uvicorn and Celery workers on their own database, and Chromium.

Chromium is Debian's (``make chromium``); Playwright's own browser download is never used.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import BIN, E2E_DATABASE_URL, ROOT, Stack, running_stack

CHROMIUM = os.environ.get("MODERATION_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
UI_DATABASE_URL = E2E_DATABASE_URL.rsplit("/", 1)[0] + "/" + E2E_DATABASE_URL.rsplit("/", 1)[1] + "_ui"
SCREENSHOTS = ROOT / "docs" / "screenshots"


@pytest.fixture(scope="module")
def ui_stack(tmp_path_factory: pytest.TempPathFactory, fixture_model_dir: Path) -> Iterator[Stack]:
    """API, GPU and CPU workers on a fresh database; the review screen blurs readily."""
    overrides = {
        "MODERATION_BATCH_WAIT_MS": "50",
        # Low enough that the fixture model's scores blur every image, above the demo's 0.02 defaults.
        "MODERATION_REVIEW_BLUR_THRESHOLD": "0.03",
    }
    with running_stack(
        tmp_path_factory.mktemp("ui-stack"),
        UI_DATABASE_URL,
        fixture_model_dir,
        overrides,
        ("api", "gpu", "cpu"),
    ) as stack:
        yield stack


def create_reviewer(stack: Stack, email: str, role: str, password: str) -> None:
    """Create a reviewer with the real CLI."""
    subprocess.run(
        [str(BIN / "moderation"), "reviewers", "create", email, "--role", role, "--password-stdin"],
        input=password + "\n",
        env=stack.env,
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    )


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Debian Chromium driven by Playwright."""
    sync_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: run `make chromium` (apt-get install chromium)")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def screenshot_dir(tmp_path: Path) -> Path:
    """Where screenshots go: docs/screenshots with MODERATION_UPDATE_SCREENSHOTS=1, else a temp folder."""
    if os.environ.get("MODERATION_UPDATE_SCREENSHOTS") == "1":
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        return SCREENSHOTS
    return tmp_path
