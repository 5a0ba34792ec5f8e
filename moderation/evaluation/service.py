"""Per-tenant calibration: fit P(block) on reviewer decisions and find thresholds for a target error rate."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy.orm import Session

from moderation.db import utcnow
from moderation.errors import InvalidInput
from moderation.evaluation.calibration import (
    Calibration,
    Method,
    RoutingSample,
    ThresholdChoice,
    best_thresholds,
    decisions,
    evaluate_thresholds,
    fit_isotonic,
    fit_platt,
)
from moderation.evaluation.metrics import expected_calibration_error
from moderation.evaluation.repository import CalibrationRepository
from moderation.submissions.models import Decision, Verdict
from moderation.tenants.models import Tenant
from moderation.tenants.schemas import TenantSettingsUpdate
from moderation.tenants.service import update_settings


@dataclass(frozen=True)
class CalibrationResult:
    """What calibrating a tenant found: the fit, current and proposed thresholds and their review rates."""

    tenant: str
    method: Method
    target_error: float
    labelled: int
    blocked_by_reviewers: int
    verdicts: int
    calibration: Calibration
    ece_raw: float | None
    ece_calibrated: float | None
    current: ThresholdChoice
    proposed: ThresholdChoice | None
    review_rate_current: float
    review_rate_proposed: float | None
    probability_at_allow: float | None
    probability_at_block: float | None

    @property
    def fewer_reviews(self) -> int | None:
        """How many fewer of the window's verdicts would have gone to review with the proposed thresholds."""
        if self.review_rate_proposed is None:
            return None
        return round((self.review_rate_current - self.review_rate_proposed) * self.verdicts)


def routing_sample(verdict: Verdict, tenant: Tenant, label: bool) -> RoutingSample:
    """A verdict reduced to what the conflict thresholds cannot change (categories, confidence, policy)."""
    scores = [float(c.get("score", 0.0)) for c in verdict.categories]
    reasons = list(verdict.reasons or [])
    blocked_by_list = any(r.startswith("blocklist:") for r in reasons)
    injection = any(r.startswith("prompt injection detected") for r in reasons)
    return RoutingSample(
        conflict_score=verdict.conflict_score,
        label=label,
        category_block=blocked_by_list or any(s >= tenant.category_block_threshold for s in scores),
        category_review=injection
        or any(tenant.category_review_threshold <= s < tenant.category_block_threshold for s in scores),
        low_confidence=verdict.confidence < tenant.min_confidence,
    )


def calibrate_tenant(
    session: Session,
    tenant: Tenant,
    *,
    target_error: float,
    method: Method = "isotonic",
    since_days: int = 90,
    min_labels: int = 30,
) -> CalibrationResult:
    """Fit the conflict score's calibration on reviewer decisions and propose allow/block thresholds."""
    # Only items that went to review carry a label, so the error rate is measured on those (the hard
    # cases), while review rates are measured over every verdict of the window.
    if not 0.0 <= target_error < 1.0:
        raise InvalidInput("target error must lie in [0, 1)", code="invalid_target_error")
    rows = CalibrationRepository(session).engine_verdicts(tenant.id, utcnow() - timedelta(days=since_days))
    labelled = [
        (v, label == Decision.block) for v, label in rows if label in (Decision.allow, Decision.block)
    ]
    if len(labelled) < max(min_labels, 1):
        raise InvalidInput(
            f"tenant {tenant.name!r} has {len(labelled)} reviewer decisions in the last {since_days} days; "
            f"calibration needs at least {max(min_labels, 1)}",
            code="not_enough_labels",
        )
    scores = [v.conflict_score for v, _ in labelled]
    labels = [y for _, y in labelled]
    calibration = fit_platt(scores, labels) if method == "platt" else fit_isotonic(scores, labels)
    samples = [routing_sample(v, tenant, y) for v, y in labelled]
    everything = [routing_sample(v, tenant, False) for v, _ in rows]
    current = evaluate_thresholds(samples, tenant.allow_threshold, tenant.block_threshold)
    proposed = best_thresholds(samples, target_error)

    def review_rate(allow: float, block: float) -> float:
        return decisions(everything, allow, block).count("review") / max(len(everything), 1)

    return CalibrationResult(
        tenant=tenant.name,
        method=method,
        target_error=target_error,
        labelled=len(labelled),
        blocked_by_reviewers=sum(labels),
        verdicts=len(rows),
        calibration=calibration,
        ece_raw=expected_calibration_error(labels, scores),
        ece_calibrated=expected_calibration_error(labels, calibration.predict(scores)),
        current=current,
        proposed=proposed,
        review_rate_current=review_rate(tenant.allow_threshold, tenant.block_threshold),
        review_rate_proposed=(
            review_rate(proposed.allow_threshold, proposed.block_threshold) if proposed is not None else None
        ),
        probability_at_allow=calibration.predict([proposed.allow_threshold])[0] if proposed else None,
        probability_at_block=calibration.predict([proposed.block_threshold])[0] if proposed else None,
    )


def apply_calibration(tenant: Tenant, result: CalibrationResult) -> Tenant:
    """Set the proposed thresholds (bumping the policy version) and keep the fit in the tenant's policy."""
    if result.proposed is None:
        raise InvalidInput("no thresholds meet the target error rate; nothing to apply", code="no_thresholds")
    update_settings(
        tenant,
        TenantSettingsUpdate(
            allow_threshold=result.proposed.allow_threshold, block_threshold=result.proposed.block_threshold
        ),
    )
    tenant.policy = {
        **(tenant.policy or {}),
        "calibration": {
            **result.calibration.as_dict(),
            "target_error": result.target_error,
            "labelled": result.labelled,
            "fitted_at": utcnow().isoformat(),
        },
    }
    return tenant


def report_lines(result: CalibrationResult, tenant: Tenant) -> list[str]:
    """Human-readable summary of a calibration."""
    pct = "{:.1%}".format
    lines = [
        f"tenant {result.tenant}: {result.labelled} reviewer decisions ({result.blocked_by_reviewers} blocked) "
        f"among {result.verdicts} model verdicts",
        f"calibration ({result.method}) of the conflict score: ECE {result.ece_raw:.3f} raw -> "
        f"{result.ece_calibrated:.3f} calibrated (in-sample)",
        f"current thresholds: allow <= {result.current.allow_threshold:.3f}, block >= "
        f"{result.current.block_threshold:.3f}; review rate {pct(result.review_rate_current)}; error on "
        f"reviewed items {pct(result.current.error_rate)}",
    ]
    if result.proposed is None or result.review_rate_proposed is None:
        lines.append(f"no thresholds reach an error rate of {pct(result.target_error)} on the reviewed items")
        return lines
    lines += [
        f"proposed for target error {pct(result.target_error)}: allow <= {result.proposed.allow_threshold:.3f} "
        f"(P(block) {result.probability_at_allow:.2f}), block >= {result.proposed.block_threshold:.3f} "
        f"(P(block) {result.probability_at_block:.2f})",
        f"review rate {pct(result.review_rate_current)} -> {pct(result.review_rate_proposed)}: "
        f"{result.fewer_reviews} fewer of {result.verdicts} items to review; error on reviewed items "
        f"{pct(result.proposed.error_rate)} ({result.proposed.errors} of {result.labelled})",
    ]
    return lines
