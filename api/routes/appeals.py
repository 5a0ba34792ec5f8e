"""A tenant appeals a decision (``POST /v1/submissions/{id}/appeal``)."""

from __future__ import annotations

import uuid

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from api.deps import SessionDep, TenantDep
from moderation.errors import NotFound
from moderation.review.schemas import AppealIn
from moderation.review.service import appeal
from moderation.submissions.schemas import SubmissionOut
from moderation.submissions.service import get_submission

router = APIRouter(prefix="/v1/submissions", tags=["submissions"])


@router.post("/{submission_id}/appeal", status_code=202, response_model=SubmissionOut)
def appeal_submission(
    submission_id: str, tenant: TenantDep, session: SessionDep, body: AppealIn | None = None
) -> JSONResponse:
    """Put a decided or reviewed submission back in the review queue, ahead of other items."""
    try:
        parsed = uuid.UUID(submission_id)
    except ValueError as exc:
        raise NotFound("submission not found", code="submission_not_found") from exc
    appeal(session, tenant, parsed, (body or AppealIn()).reason)
    session.commit()
    out = get_submission(session, tenant, parsed)
    return JSONResponse(out.model_dump(mode="json"), status_code=202)
