"""Queue overview, model-versus-reviewer agreement and threshold suggestions."""

from __future__ import annotations

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from moderation.blobs import LocalBlobStore
from moderation.config import Settings
from moderation.review import reports, service
from moderation.review.models import ReviewDecision
from moderation.reviewers.models import Role
from moderation.reviewers.schemas import Forbidden, ReviewerRef
from moderation.submissions.models import Verdict
from moderation.tenants.models import Tenant
from tests.conftest import RecordingDispatcher
from tests.review.helpers import add_review_item

ANN = ReviewerRef("ann@example.com", Role.reviewer)
LEA = ReviewerRef("lea@example.com", Role.lead)


def test_suggested_thresholds_review_less_at_the_same_error_rate() -> None:
    # Rejections all score >= 0.55 and approvals <= 0.45: the band between can shrink a lot.
    scores = [(0.35, False), (0.4, False), (0.45, False), (0.55, True), (0.6, True), (0.7, True)]
    current, suggested = reports.suggest_thresholds(scores, allow=0.3, block=0.8)
    assert current.review_share == 1.0 and current.errors == 0
    assert suggested is not None and suggested.errors == 0 and suggested.review_share == 0.0
    assert 0.45 <= suggested.allow_threshold < 0.55 <= suggested.block_threshold <= 0.55
    # When labels overlap completely nothing beats the current thresholds without more errors.
    mixed = [(0.5, True), (0.5, False)]
    assert reports.suggest_thresholds(mixed, allow=0.3, block=0.8)[1] is None
    # Errors already made by the current thresholds are the budget.
    budget = [(0.2, True), (0.4, False), (0.6, True)]
    current, suggested = reports.suggest_thresholds(budget, allow=0.3, block=0.8)
    assert current.errors == 1 and suggested is not None and suggested.errors <= 1
    assert suggested.review_share < current.review_share


def test_overview_and_model_agreement(
    session: Session,
    settings: Settings,
    tenant: Tenant,
    blobs: LocalBlobStore,
    dispatched: RecordingDispatcher,
) -> None:
    specs = [
        (0.9, {"scam_fraud": 0.8}, ReviewDecision.reject, ["scam_fraud"]),
        (0.7, {"spam": 0.7}, ReviewDecision.reject, ["spam"]),
        (0.6, {}, ReviewDecision.approve, []),
        (0.35, {}, ReviewDecision.approve, []),
        (0.4, {"violence": 0.65}, ReviewDecision.reject, ["violence"]),
    ]
    for seed, (conflict, scores, _, _) in enumerate(specs):
        add_review_item(session, tenant, blobs, settings, conflict=conflict, scores=scores, seed=seed)
    overview = reports.overview(session)
    assert overview.pending >= 5 and overview.open_total >= 5
    assert overview.oldest_age_seconds is not None and overview.oldest_age_seconds >= 0
    assert overview.by_category.get("scam_fraud", 0) >= 1
    by_conflict = {conflict: (decision, cats) for conflict, _, decision, cats in specs}
    while (item := service.claim_next(session, ANN, 600)) is not None:
        assert item.lease_token is not None
        verdict = session.scalars(select(Verdict).where(Verdict.submission_id == item.submission_id)).one()
        decision, cats = by_conflict[verdict.conflict_score]
        service.decide(
            session, item.id, reviewer=ANN, lease_token=item.lease_token, decision=decision, categories=cats
        )
    after = reports.overview(session)
    assert after.decided_24h >= 5 and after.decided_24h_by_decision.get("reject", 0) >= 3
    with pytest.raises(Forbidden):
        reports.model_agreement(session, ANN)
    report = reports.model_agreement(session, LEA)
    assert report.labeled == 5
    # Model risk >= 0.5 leans block: 0.9, 0.7, 0.6 (approved: a false block), 0.65 via violence; 0.35 allows.
    assert report.confusion.both_block == 3 and report.confusion.a_block_b_allow == 1
    assert report.confusion.both_allow == 1 and report.confusion.a_allow_b_block == 0
    assert report.agreement == pytest.approx(4 / 5)
    violence = next(c for c in report.categories if c.name == "violence")
    assert violence.true_positive == 1 and violence.false_negative == 0
    (suggestion,) = report.thresholds
    assert suggestion.tenant == tenant.name and suggestion.labeled == 5
    assert suggestion.current.allow_threshold == tenant.allow_threshold
    assert "only 5 labelled items" in suggestion.note
