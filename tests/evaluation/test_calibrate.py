"""``moderation calibrate``: thresholds from reviewer decisions, on the test database."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from moderation import cli, db
from moderation.blobs import LocalBlobStore
from moderation.config import Settings
from moderation.db import new_id, utcnow
from moderation.errors import InvalidInput
from moderation.evaluation.service import apply_calibration, calibrate_tenant
from moderation.policy.decision import POLICY_MODEL_NAME
from moderation.submissions.models import Decision, Submission, SubmissionStatus, Verdict
from moderation.submissions.repository import SubmissionRepository
from moderation.submissions.service import submit
from moderation.tenants.models import Tenant
from moderation.tenants.repository import TenantRepository
from moderation.tenants.service import create_tenant
from tests.conftest import make_jpeg

# Review band of the default thresholds (0.3, 0.8): reviewers blocked from 0.56 up, plus one block at 0.44.
REVIEWED = [(round(0.32 + 0.02 * i, 2), round(0.32 + 0.02 * i, 2) >= 0.56) for i in range(24)]
REVIEWED = [(s, label or s == 0.44) for s, label in REVIEWED]
AUTOMATIC = [0.05, 0.1, 0.15, 0.2, 0.25, 0.85, 0.9, 0.95]


def _verdict(
    session: Session, tenant: Tenant, store: LocalBlobStore, settings: Settings, score: float, **kw: object
) -> None:
    sid = submit(
        session,
        tenant,
        image=make_jpeg(32, 32),
        caption=f"post {new_id()}",
        blob_store=store,
        settings=settings,
    ).submission.id
    decision = Decision.block if score >= 0.8 else Decision.allow if score <= 0.3 else Decision.review
    SubmissionRepository(session).add_verdicts(
        [
            Verdict(
                id=new_id(),
                submission_id=sid,
                decision=decision,
                conflict_score=score,
                confidence=0.9,
                categories=[{"name": "violence", "score": 0.01}],
                description="d",
                visible_text="",
                explanation="e",
                reasons=[],
                model_name=str(kw.get("model_name", "qwen")),
                model_revision="r",
                prompt_version="p",
                decided_at=utcnow(),
            )
        ]
    )
    label = kw.get("label")
    values: dict[str, object] = {"status": SubmissionStatus.decided, "final_decision": decision}
    if label is not None:
        values = {
            "status": SubmissionStatus.reviewed,
            "final_decision": Decision.block if label else Decision.allow,
        }
    session.execute(update(Submission).where(Submission.id == sid).values(**values))


@pytest.fixture
def tenant(sessions: sessionmaker[Session], settings: Settings, tmp_path: Path) -> Tenant:
    store = LocalBlobStore(tmp_path / "blobs", fsync=False)
    with sessions() as session, session.begin():
        tenant = create_tenant(session, "acme", settings).tenant
        for score, label in REVIEWED:
            _verdict(session, tenant, store, settings, score, label=label)
        for score in AUTOMATIC:
            _verdict(session, tenant, store, settings, score)
        # Policy verdicts (no model) never count.
        _verdict(session, tenant, store, settings, 1.0, model_name=POLICY_MODEL_NAME, label=False)
        session.expunge(tenant)
    return tenant


def test_calibration_finds_thresholds_with_fewer_reviews(
    sessions: sessionmaker[Session], tenant: Tenant
) -> None:
    with sessions() as session:
        row = session.get(Tenant, tenant.id)
        assert row is not None
        result = calibrate_tenant(session, row, target_error=0.0, min_labels=10)
        assert (result.labelled, result.blocked_by_reviewers, result.verdicts) == (24, 13, 32)
        assert result.current.reviewed == 24 and result.review_rate_current == pytest.approx(24 / 32)
        proposed = result.proposed
        assert proposed is not None
        # No errors allowed: allow up to the last approval below the stray block, block from the first
        # block after the last approval; only 0.44 .. 0.54 stay in review.
        assert (proposed.allow_threshold, proposed.block_threshold) == (0.42, 0.56)
        assert proposed.errors == 0 and proposed.reviewed == 6
        assert result.review_rate_proposed == pytest.approx(6 / 32) and result.fewer_reviews == 18
        assert result.ece_calibrated is not None and result.ece_raw is not None
        assert result.ece_calibrated <= result.ece_raw
        assert result.probability_at_block is not None and result.probability_at_block > 0.5

        looser = calibrate_tenant(session, row, target_error=1 / 24, min_labels=10)
        assert looser.proposed is not None and looser.proposed.errors == 1 and looser.proposed.reviewed == 0

        platt = calibrate_tenant(session, row, target_error=0.0, method="platt", min_labels=10)
        assert platt.calibration.method == "platt" and platt.calibration.params[0] > 0

        with pytest.raises(InvalidInput) as err:
            calibrate_tenant(session, row, target_error=0.0, min_labels=100)
        assert err.value.code == "not_enough_labels"

        version = row.policy_version
        apply_calibration(row, result)
        assert (row.allow_threshold, row.block_threshold) == (0.42, 0.56)
        assert row.policy_version == version + 1
        assert (
            row.policy["calibration"]["method"] == "isotonic" and row.policy["calibration"]["labelled"] == 24
        )


def test_calibrate_command(
    sessions: sessionmaker[Session],
    tenant: Tenant,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(db, "get_sessionmaker", lambda: sessions)
    args = ["calibrate", "--tenant", "acme", "--target-error", "0", "--min-labels", "10"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "review rate 75.0% -> 18.8%: 18 fewer of 32 items to review" in out
    assert "run again with --apply" in out
    assert cli.main([*args, "--apply"]) == 0
    assert "applied: allow <= 0.420, block >= 0.560" in capsys.readouterr().out
    with sessions() as session:
        row = TenantRepository(session).get_by_name("acme")
        assert row is not None and (row.allow_threshold, row.block_threshold) == (0.42, 0.56)
    assert cli.main(["calibrate", "--tenant", "nobody"]) == 2
