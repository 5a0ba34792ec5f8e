"""``moderation known-images add|list|remove`` on the test database."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from moderation import cli, db
from moderation.blobs import LocalBlobStore
from moderation.config import Settings, get_settings
from moderation.submissions.models import Decision, Submission, SubmissionStatus
from moderation.submissions.service import submit
from moderation.tenants.service import create_tenant
from tests.conftest import make_jpeg


@pytest.fixture
def cli_env(
    sessions: sessionmaker[Session], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[LocalBlobStore]:
    monkeypatch.setattr(db, "get_sessionmaker", lambda: sessions)
    monkeypatch.setenv("MODERATION_BLOB_DIR", str(tmp_path / "blobs"))
    get_settings.cache_clear()
    yield LocalBlobStore(tmp_path / "blobs", fsync=False)
    get_settings.cache_clear()


def test_known_images_commands(
    cli_env: LocalBlobStore,
    sessions: sessionmaker[Session],
    settings: Settings,
    capsys: pytest.CaptureFixture[str],
) -> None:
    with sessions() as session, session.begin():
        tenant = create_tenant(session, "acme", settings).tenant
        sid = submit(
            session,
            tenant,
            image=make_jpeg(120, 90, seed=4),
            caption="x",
            blob_store=cli_env,
            settings=settings,
        ).submission.id
    assert cli.main(["known-images", "add", "acme", str(sid), "--label", "leaked"]) == 2
    assert "submission_not_reviewed" in capsys.readouterr().err
    with sessions() as session, session.begin():
        session.execute(
            update(Submission)
            .where(Submission.id == sid)
            .values(status=SubmissionStatus.reviewed, final_decision=Decision.block)
        )
    assert cli.main(["known-images", "add", "acme", str(sid), "--label", "leaked", "--json"]) == 0
    added = json.loads(capsys.readouterr().out)
    assert added["label"] == "leaked" and added["created_by"].startswith("cli:")
    assert cli.main(["known-images", "list", "acme"]) == 0
    listed = capsys.readouterr().out
    assert added["id"] in listed and "leaked" in listed and added["phash"] in listed
    assert cli.main(["known-images", "remove", "acme", added["id"]]) == 0
    capsys.readouterr()
    assert cli.main(["known-images", "list", "acme", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []
    assert cli.main(["known-images", "list", "nobody"]) == 2


def test_tenants_set_changes_the_retention_period(
    cli_env: LocalBlobStore,
    sessions: sessionmaker[Session],
    settings: Settings,
    capsys: pytest.CaptureFixture[str],
) -> None:
    with sessions() as session, session.begin():
        create_tenant(session, "acme", settings)
    assert cli.main(["tenants", "set", "acme", "--retention-days", "7"]) == 0
    assert json.loads(capsys.readouterr().out)["retention_days"] == 7
    assert cli.main(["tenants", "set", "acme", "--default-retention"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["retention_days"] is None and shown["block_threshold"] == settings.default_block_threshold
    assert cli.main(["tenants", "set", "acme", "--retention-days", "-1"]) == 2
    assert (
        "invalid_setting: --retention-days: Input should be greater than or equal to 0"
        in capsys.readouterr().err
    )
    assert cli.main(["tenants", "set", "acme", "--retention-days", "30"]) == 0
    capsys.readouterr()
    assert cli.main(["tenants", "list"]) == 0
    assert "acme" in (listed := capsys.readouterr().out) and "retention_days=30" in listed
