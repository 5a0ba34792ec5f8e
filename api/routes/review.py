"""The JSON API of human review (``/v1/review``): claim, decide, skip, reassign, QA, reports and audit.

Reviewers authenticate with the UI's session cookie (plus ``X-CSRF-Token`` on writes) or with an API token
(``Authorization: Bearer rvw_…``) from ``moderation reviewers issue-token``.
"""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from pydantic import BaseModel

from api.deps import SessionDep, SettingsDep
from api.ui.auth import Principal, PrincipalDep
from moderation.audit.repository import AuditRepository
from moderation.audit.schemas import AuditEntryOut
from moderation.errors import InvalidInput, NotFound
from moderation.review import queries, reports, service
from moderation.review.models import ReviewDecision, ReviewKind, ReviewState
from moderation.review.schemas import (
    ClaimIn,
    DecisionIn,
    LeaseIn,
    ModelAgreementReport,
    QaReport,
    QaSampleIn,
    QueueOverview,
    ReassignIn,
    ReviewItemOut,
)
from moderation.reviewers.models import Role
from moderation.reviewers.schemas import ReviewerOut

router = APIRouter(prefix="/v1/review", tags=["review"])


class ReviewItemPage(BaseModel):
    """A page of review items; ``next_cursor`` fetches the next page (None on the last)."""

    data: list[ReviewItemOut]
    next_cursor: str | None = None


def _id(raw: str) -> uuid.UUID:
    try:
        return uuid.UUID(raw)
    except ValueError as exc:
        raise NotFound("review item not found", code="review_item_not_found") from exc


def _out(session: SessionDep, item_id: uuid.UUID, principal: Principal, blur: float) -> ReviewItemOut:
    context = queries.item_context(session, item_id, blur_threshold=blur, viewer=principal.ref)
    return context.out(principal.reviewer.email)


@router.get("/me", response_model=ReviewerOut)
def me(principal: PrincipalDep) -> ReviewerOut:
    """The signed-in reviewer."""
    return ReviewerOut.from_model(principal.reviewer)


@router.post("/claim", response_model=ReviewItemOut, responses={204: {"description": "The queue is empty."}})
def claim(
    principal: PrincipalDep, session: SessionDep, settings: SettingsDep, body: ClaimIn | None = None
) -> ReviewItemOut | Response:
    """Lease the next item (or the one you already hold) with its submission; 204 when nothing waits."""
    queue = (body or ClaimIn()).queue
    item = service.claim_next(
        session, principal.ref, settings.review_lease_seconds, escalated=queue == "escalations"
    )
    if item is None:
        session.commit()
        return Response(status_code=204)
    session.commit()
    return _out(session, item.id, principal, settings.review_blur_threshold)


@router.get("/items", response_model=ReviewItemPage)
def list_items(
    principal: PrincipalDep,
    session: SessionDep,
    state: str | None = None,
    kind: str | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    cursor: str | None = None,
) -> ReviewItemPage:
    """Review items by state (``pending``, ``claimed``, ``escalated``, ``decided``, or ``open``) and kind.

    Open items first (by priority and age), then decided ones (newest first), a page at a time.
    """
    try:
        state_value = None if state in (None, "", "open") else ReviewState(state)
        kind_value = ReviewKind(kind) if kind else None
    except ValueError as exc:
        raise InvalidInput(f"unknown state or kind: {exc}", code="invalid_filter") from exc
    items, next_cursor = queries.items_page(
        session, limit=limit, cursor=cursor, state=state_value, kind=kind_value, open_only=state == "open"
    )
    rows = queries.items_with_submissions(session, items)
    hidden = queries.hidden_decisions(session, principal.ref, [i.submission_id for i in items])
    return ReviewItemPage(
        data=[
            ReviewItemOut.from_model(
                i, viewer=principal.reviewer.email, tenant=name, redact=i.submission_id in hidden
            )
            for i, _, name in rows
        ],
        next_cursor=next_cursor,
    )


@router.get("/items/{item_id}", response_model=ReviewItemOut)
def get_item(
    item_id: str, principal: PrincipalDep, session: SessionDep, settings: SettingsDep
) -> ReviewItemOut:
    """One item with its submission and verdict."""
    return _out(session, _id(item_id), principal, settings.review_blur_threshold)


@router.post("/items/{item_id}/decision", response_model=ReviewItemOut)
def decide(
    item_id: str, body: DecisionIn, principal: PrincipalDep, session: SessionDep, settings: SettingsDep
) -> ReviewItemOut:
    """Approve, reject (with categories) or escalate an item you hold; 409 if your lease was taken over."""
    item = service.decide(
        session,
        _id(item_id),
        reviewer=principal.ref,
        lease_token=body.lease_token,
        decision=ReviewDecision(body.decision),
        categories=body.categories,
        note=body.note,
    )
    session.commit()
    return _out(session, item.id, principal, settings.review_blur_threshold)


@router.post("/items/{item_id}/release", response_model=ReviewItemOut)
def release(
    item_id: str, body: LeaseIn, principal: PrincipalDep, session: SessionDep, settings: SettingsDep
) -> ReviewItemOut:
    """Give an item back to the queue."""
    item = service.release(session, _id(item_id), reviewer=principal.ref, lease_token=body.lease_token)
    session.commit()
    return _out(session, item.id, principal, settings.review_blur_threshold)


@router.post("/items/{item_id}/skip", response_model=ReviewItemOut)
def skip(
    item_id: str, body: LeaseIn, principal: PrincipalDep, session: SessionDep, settings: SettingsDep
) -> ReviewItemOut:
    """Give an item back for someone else; it is not offered to you again."""
    item = service.release(
        session, _id(item_id), reviewer=principal.ref, lease_token=body.lease_token, skip=True
    )
    session.commit()
    return _out(session, item.id, principal, settings.review_blur_threshold)


@router.post("/items/{item_id}/renew", response_model=ReviewItemOut)
def renew(
    item_id: str, body: LeaseIn, principal: PrincipalDep, session: SessionDep, settings: SettingsDep
) -> ReviewItemOut:
    """Extend the lease of an item you hold."""
    item = service.renew(
        session,
        _id(item_id),
        reviewer=principal.ref,
        lease_token=body.lease_token,
        lease_seconds=settings.review_lease_seconds,
        max_hold_seconds=settings.review_max_hold_seconds,
    )
    session.commit()
    return _out(session, item.id, principal, settings.review_blur_threshold)


@router.post("/items/{item_id}/reassign", response_model=ReviewItemOut)
def reassign(
    item_id: str, body: ReassignIn, principal: PrincipalDep, session: SessionDep, settings: SettingsDep
) -> ReviewItemOut:
    """Hand an open item to another reviewer (leads)."""
    item = service.reassign(session, _id(item_id), actor=principal.ref, to=body.to, note=body.note)
    session.commit()
    return _out(session, item.id, principal, settings.review_blur_threshold)


@router.get("/submissions/{submission_id}/image")
def image(submission_id: str, request: Request, principal: PrincipalDep, session: SessionDep) -> Response:
    """A submission's image, for reviewers only (never cached by shared caches); each fetch is audited."""
    try:
        parsed = uuid.UUID(submission_id)
    except ValueError as exc:
        raise NotFound("submission not found", code="submission_not_found") from exc
    data, content_type = service.view_image(session, request.app.state.blob_store, parsed, principal.ref)
    session.commit()
    return Response(
        data,
        media_type=content_type,
        headers={
            "Cache-Control": "private, max-age=600",
            "X-Content-Type-Options": "nosniff",
            "Content-Security-Policy": "default-src 'none'; sandbox",
        },
    )


@router.get("/overview", response_model=QueueOverview)
def overview(principal: PrincipalDep, session: SessionDep) -> QueueOverview:
    """Counts per state and category, decisions of the last day, the oldest item's age."""
    return reports.overview(session)


@router.get("/reports/model", response_model=ModelAgreementReport)
def model_report(
    principal: PrincipalDep, session: SessionDep, days: Annotated[int, Query(ge=1, le=365)] = 30
) -> ModelAgreementReport:
    """Model versus reviewers: confusion matrix, per category, threshold suggestions (leads)."""
    return reports.model_agreement(session, principal.ref, days=days)


@router.get("/reports/qa", response_model=QaReport)
def qa_report(
    principal: PrincipalDep, session: SessionDep, days: Annotated[int, Query(ge=1, le=365)] = 30
) -> QaReport:
    """Agreement between reviewers on QA second reviews (leads)."""
    return reports.qa_agreement(session, principal.ref, days=days)


@router.post("/qa/sample", response_model=ReviewItemPage)
def qa_sample(body: QaSampleIn, principal: PrincipalDep, session: SessionDep) -> ReviewItemPage:
    """Send a random sample of recent decisions for a blind second review (leads)."""
    items = service.sample_for_qa(
        session, principal.ref, body.count, days=body.days, tenant_id=body.tenant_id
    )
    session.commit()
    return ReviewItemPage(data=[ReviewItemOut.from_model(i) for i in items])


@router.get("/audit", response_model=list[AuditEntryOut])
def audit_log(
    principal: PrincipalDep,
    session: SessionDep,
    actor: str | None = None,
    action: str | None = None,
    subject: str | None = None,
    submission_id: uuid.UUID | None = None,
    older_than: uuid.UUID | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[AuditEntryOut]:
    """The audit log, newest first (leads); ``older_than`` (an entry's id) gives the entries after it."""
    principal.ref.require(Role.lead, "read the audit log")
    subject_type, _, subject_id = (subject or "").partition(":")
    entries = AuditRepository(session).search(
        actor=actor,
        action=action,
        subject_type=subject_type or None,
        subject_id=subject_id or None,
        submission_id=submission_id,
        older_than=older_than,
        limit=limit,
    )
    return [AuditEntryOut.from_model(e) for e in entries]
