"""SQL for calibration: a tenant's engine verdicts and the reviewers' final decisions on them."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from moderation.policy.decision import POLICY_MODEL_NAME
from moderation.submissions.models import Decision, Submission, SubmissionStatus, Verdict


class CalibrationRepository:
    """Reads verdicts and labels for calibrating a tenant's thresholds."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def engine_verdicts(self, tenant_id: uuid.UUID, since: datetime) -> list[tuple[Verdict, Decision | None]]:
        """The tenant's model-made verdicts since ``since``, each with the reviewer's final decision if any."""
        label = Submission.final_decision
        stmt = (
            select(Verdict, label, Submission.status)
            .join(Submission, Submission.id == Verdict.submission_id)
            .where(
                Submission.tenant_id == tenant_id,
                Verdict.model_name != POLICY_MODEL_NAME,
                Verdict.decided_at >= since,
            )
            .order_by(Verdict.decided_at)
        )
        return [
            (verdict, final if status == SubmissionStatus.reviewed else None)
            for verdict, final, status in self.session.execute(stmt)
        ]
