"""What the queue looks like, and what reviewers' decisions say about the model and about each other.

Reviewer decisions are labels: approve means the content should have been allowed, reject that it should
have been blocked. The model "leans to block" when its risk — the highest of the conflict score and the
category scores — is at least 0.5.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from datetime import timedelta

from sqlalchemy.orm import Session

from moderation.db import utcnow
from moderation.errors import InvalidInput
from moderation.review.models import ReviewDecision
from moderation.review.repository import LabeledVerdict, ReviewRepository
from moderation.review.schemas import (
    CategoryAgreement,
    Confusion,
    ModelAgreementReport,
    QaReport,
    QueueOverview,
    ReviewerAgreement,
    ThresholdPoint,
    ThresholdSuggestion,
)
from moderation.reviewers.models import Role
from moderation.reviewers.schemas import ReviewerRef

MODEL_BLOCK_RISK = 0.5
MAX_LABELS = 50_000
MIN_LABELS_FOR_SUGGESTION = 30
GRID = [i / 100 for i in range(101)]


def overview(session: Session) -> QueueOverview:
    """Counts per state, kind and category, decisions of the last day and the oldest item's age."""
    repo = ReviewRepository(session)
    counts = repo.count_open_by()
    now = utcnow()

    def total(state: str | None = None, kind: str | None = None, escalated: bool | None = None) -> int:
        return sum(
            n
            for (s, k, e), n in counts.items()
            if (state is None or s == state)
            and (kind is None or k == kind)
            and (escalated is None or e == escalated)
        )

    oldest = repo.oldest_open()
    decided = repo.count_decided_since(now - timedelta(hours=24))
    return QueueOverview(
        pending=total("pending"),
        claimed=total("claimed"),
        escalated=total(escalated=True),
        appeals=total(kind="appeal"),
        qa=total(kind="qa"),
        open_total=total(),
        decided_24h=sum(decided.values()),
        decided_24h_by_decision=decided,
        oldest_age_seconds=(now - oldest).total_seconds() if oldest else None,
        by_category=repo.count_open_by_top_category(),
    )


def _confusion(pairs: list[tuple[bool, bool]]) -> Confusion:
    matrix = Confusion()
    for a_block, b_block in pairs:
        if a_block and b_block:
            matrix.both_block += 1
        elif a_block:
            matrix.a_block_b_allow += 1
        elif b_block:
            matrix.a_allow_b_block += 1
        else:
            matrix.both_allow += 1
    return matrix


def _ratio(numerator: int, denominator: int) -> float | None:
    return numerator / denominator if denominator else None


def _risk(row: LabeledVerdict) -> float:
    return max([row.conflict_score, *row.category_scores.values()])


def _category_agreement(rows: list[LabeledVerdict]) -> list[CategoryAgreement]:
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    for row in rows:
        flagged_by_reviewer = set(row.categories) if row.decision == ReviewDecision.reject else set()
        for name in set(row.category_scores) | flagged_by_reviewer:
            model = row.category_scores.get(name, 0.0) >= row.category_review_threshold
            human = name in flagged_by_reviewer
            counts[name][(0 if human else 1) if model else (2 if human else 3)] += 1
    result = []
    for name, (tp, fp, fn, tn) in sorted(counts.items(), key=lambda kv: (-(kv[1][0] + kv[1][2]), kv[0])):
        result.append(
            CategoryAgreement(
                name=name,
                true_positive=tp,
                false_positive=fp,
                false_negative=fn,
                true_negative=tn,
                precision=_ratio(tp, tp + fp),
                recall=_ratio(tp, tp + fn),
                agreement=_ratio(tp + tn, tp + fp + fn + tn),
            )
        )
    return result


def _point(scores: list[tuple[float, bool]], allow: float, block: float) -> ThresholdPoint:
    # As in routing: block wins when the thresholds meet.
    errors = sum(1 for s, reject in scores if (s >= block and not reject) or (allow >= s < block and reject))
    review = sum(1 for s, _ in scores if allow < s < block)
    n = len(scores)
    return ThresholdPoint(
        allow_threshold=allow,
        block_threshold=block,
        review_share=review / n if n else 0.0,
        error_rate=errors / n if n else 0.0,
        errors=errors,
    )


def suggest_thresholds(
    scores: list[tuple[float, bool]], allow: float, block: float
) -> tuple[ThresholdPoint, ThresholdPoint | None]:
    """The current point and the thresholds that send fewest labelled items to review at no more errors.

    ``scores`` are (conflict score, reviewer rejected) pairs. Routing follows the service: a score at or
    above ``block`` blocks, at or below ``allow`` allows, anything between goes to review. An error is an
    automatic block the reviewer approved, or an automatic allow the reviewer rejected.
    """
    current = _point(scores, allow, block)
    n = len(scores)
    if not n:
        return current, None
    approved = sorted(s for s, reject in scores if not reject)
    rejected = sorted(s for s, reject in scores if reject)
    every = sorted(s for s, _ in scores)

    def at_most(values: list[float], t: float) -> int:
        return bisect.bisect_right(values, t)

    def at_least(values: list[float], t: float) -> int:
        return len(values) - bisect.bisect_left(values, t)

    best: tuple[int, float, float, float] | None = None
    for a in GRID:
        wrong_allows = at_most(rejected, a)
        if wrong_allows > current.errors:
            break
        allowed = at_most(every, a)
        for b in GRID:
            if b <= a:
                continue
            errors = wrong_allows + at_least(approved, b)
            if errors > current.errors:
                continue
            review = n - allowed - at_least(every, b)
            key = (review, abs(a - allow) + abs(b - block), a, b)
            if best is None or key < best:
                best = key
    if best is None or best[0] >= round(current.review_share * n):
        return current, None
    return current, _point(scores, best[2], best[3])


def model_agreement(session: Session, actor: ReviewerRef | str, *, days: int = 30) -> ModelAgreementReport:
    """Model versus reviewers over the last ``days`` days (leads)."""
    ReviewerRef.of(actor).require(Role.lead, "see reports")
    if not 1 <= days <= 365:
        raise InvalidInput("days must be between 1 and 365", code="invalid_days")
    rows = ReviewRepository(session).labeled_verdicts(utcnow() - timedelta(days=days), MAX_LABELS)
    confusion = _confusion(
        [(_risk(r) >= MODEL_BLOCK_RISK, r.decision == ReviewDecision.reject) for r in rows]
    )
    by_tenant: dict[str, list[LabeledVerdict]] = defaultdict(list)
    for row in rows:
        by_tenant[row.tenant_name].append(row)
    suggestions = []
    for tenant, tenant_rows in sorted(by_tenant.items()):
        scores = [(r.conflict_score, r.decision == ReviewDecision.reject) for r in tenant_rows]
        current, suggested = suggest_thresholds(
            scores, tenant_rows[0].allow_threshold, tenant_rows[0].block_threshold
        )
        if len(scores) < MIN_LABELS_FOR_SUGGESTION:
            note = f"only {len(scores)} labelled items; wait for {MIN_LABELS_FOR_SUGGESTION} before acting on this"
        elif suggested is None:
            note = "no thresholds review fewer of these items without more errors"
        else:
            saved = current.review_share - suggested.review_share
            note = f"{saved:.0%} fewer of these items would have needed a reviewer, at the same error rate"
        suggestions.append(
            ThresholdSuggestion(
                tenant=tenant, labeled=len(scores), current=current, suggested=suggested, note=note
            )
        )
    return ModelAgreementReport(
        days=days,
        labeled=len(rows),
        confusion=confusion,
        agreement=confusion.agreement,
        kappa=confusion.kappa,
        categories=_category_agreement(rows),
        thresholds=suggestions,
    )


def qa_agreement(session: Session, actor: ReviewerRef | str, *, days: int = 30) -> QaReport:
    """Agreement between first reviews and their QA second reviews (leads)."""
    ReviewerRef.of(actor).require(Role.lead, "see reports")
    if not 1 <= days <= 365:
        raise InvalidInput("days must be between 1 and 365", code="invalid_days")
    repo = ReviewRepository(session)
    pairs = repo.qa_pairs(utcnow() - timedelta(days=days), MAX_LABELS)
    confusion = _confusion(
        [
            (p.first_decision == ReviewDecision.reject, p.second_decision == ReviewDecision.reject)
            for p in pairs
        ]
    )
    overlaps = [
        len(set(p.first_categories) & set(p.second_categories))
        / max(1, len(set(p.first_categories) | set(p.second_categories)))
        for p in pairs
        if p.first_decision == p.second_decision == ReviewDecision.reject
    ]
    per_reviewer: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for p in pairs:
        per_reviewer[p.first_reviewer][0] += 1
        per_reviewer[p.first_reviewer][1] += int(p.first_decision == p.second_decision)
    counts = repo.count_open_by()
    return QaReport(
        days=days,
        pairs=len(pairs),
        confusion=confusion,
        agreement=confusion.agreement,
        kappa=confusion.kappa,
        category_overlap=sum(overlaps) / len(overlaps) if overlaps else None,
        by_reviewer=[
            ReviewerAgreement(reviewer=name, checked=checked, agreed=agreed)
            for name, (checked, agreed) in sorted(per_reviewer.items())
        ],
        open_qa_items=sum(n for (_, kind, _), n in counts.items() if kind == "qa"),
    )
