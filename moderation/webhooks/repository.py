"""SQL for webhook endpoints, deliveries and attempts."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta

from sqlalchemy import case, func, or_, select, update
from sqlalchemy.orm import Session, selectinload

from moderation.submissions.models import Submission
from moderation.webhooks.models import DeliveryStatus, WebhookAttempt, WebhookDelivery, WebhookEndpoint


class WebhookRepository:
    """Reads and writes webhook endpoints, deliveries and attempts."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def add(self, obj: WebhookEndpoint | WebhookDelivery | WebhookAttempt) -> None:
        """Insert a row."""
        self.session.add(obj)

    def endpoints_for(self, tenant_id: uuid.UUID, event: str) -> list[WebhookEndpoint]:
        """The tenant's enabled endpoints subscribed to an event."""
        stmt = select(WebhookEndpoint).where(
            WebhookEndpoint.tenant_id == tenant_id,
            WebhookEndpoint.enabled.is_(True),
            WebhookEndpoint.events.any(event),  # type: ignore[arg-type]
        )
        return list(self.session.scalars(stmt))

    def list_endpoints(self, tenant_id: uuid.UUID) -> list[WebhookEndpoint]:
        """All the tenant's endpoints, oldest first."""
        stmt = (
            select(WebhookEndpoint).where(WebhookEndpoint.tenant_id == tenant_id).order_by(WebhookEndpoint.id)
        )
        return list(self.session.scalars(stmt))

    def get_endpoint(self, endpoint_id: uuid.UUID, tenant_id: uuid.UUID) -> WebhookEndpoint | None:
        """One of the tenant's endpoints."""
        stmt = select(WebhookEndpoint).where(
            WebhookEndpoint.id == endpoint_id, WebhookEndpoint.tenant_id == tenant_id
        )
        return self.session.scalar(stmt)

    def claim_delivery(self, delivery_id: uuid.UUID, lease_seconds: float) -> WebhookDelivery | None:
        """Take a due pending delivery for one attempt, pushing its next attempt out by a lease."""
        now = func.now()
        stmt = (
            update(WebhookDelivery)
            .where(
                WebhookDelivery.id == delivery_id,
                WebhookDelivery.status == DeliveryStatus.pending,
                or_(
                    WebhookDelivery.next_attempt_at.is_(None),
                    WebhookDelivery.next_attempt_at <= now + timedelta(seconds=1),
                ),
            )
            .values(
                next_attempt_at=now + timedelta(seconds=lease_seconds),
                attempt_count=WebhookDelivery.attempt_count + 1,
            )
            .returning(WebhookDelivery.id)
        )
        claimed = self.session.scalar(stmt)
        if claimed is None:
            return None
        return self.session.scalar(
            select(WebhookDelivery)
            .options(selectinload(WebhookDelivery.endpoint))
            .where(WebhookDelivery.id == claimed)
            .execution_options(populate_existing=True)
        )

    def get_delivery(self, delivery_id: uuid.UUID, *, for_update: bool = False) -> WebhookDelivery | None:
        """A delivery with its endpoint; ``for_update`` locks its row until the transaction ends."""
        stmt = (
            select(WebhookDelivery)
            .options(selectinload(WebhookDelivery.endpoint))
            .where(WebhookDelivery.id == delivery_id)
        )
        if for_update:
            stmt = stmt.with_for_update(of=WebhookDelivery)
        return self.session.scalar(stmt)

    def finish_attempt(
        self,
        attempt_id: uuid.UUID,
        *,
        status_code: int | None,
        duration_ms: float,
        error: str | None,
        response_excerpt: str | None,
    ) -> None:
        """Record what an attempt (recorded when it started) got back.

        What the receiver answered is not kept when the submission was erased while the attempt ran.
        """
        erased = (
            select(WebhookDelivery.id)
            .join(Submission, Submission.id == WebhookDelivery.submission_id)
            .where(WebhookDelivery.id == WebhookAttempt.delivery_id, Submission.erased_at.is_not(None))
            .exists()
        )
        self.session.execute(
            update(WebhookAttempt)
            .where(WebhookAttempt.id == attempt_id)
            .values(
                status_code=status_code,
                duration_ms=duration_ms,
                error=error,
                response_excerpt=case((erased, ""), else_=response_excerpt),
            )
        )

    def overdue_deliveries(self, older_than: datetime, limit: int) -> list[uuid.UUID]:
        """Pending deliveries whose attempt is overdue: their job was lost or their worker died."""
        stmt = (
            select(WebhookDelivery.id)
            .where(
                WebhookDelivery.status == DeliveryStatus.pending,
                or_(WebhookDelivery.next_attempt_at.is_(None), WebhookDelivery.next_attempt_at < older_than),
            )
            .order_by(WebhookDelivery.next_attempt_at)
            .limit(limit)
        )
        return list(self.session.scalars(stmt))

    def attempts_for(self, delivery_id: uuid.UUID) -> list[WebhookAttempt]:
        """Every attempt at a delivery, in order."""
        stmt = (
            select(WebhookAttempt)
            .where(WebhookAttempt.delivery_id == delivery_id)
            .order_by(WebhookAttempt.attempt)
        )
        return list(self.session.scalars(stmt))

    def deliveries_for_submissions(self, submission_ids: Sequence[uuid.UUID]) -> list[WebhookDelivery]:
        """Every delivery about any of these submissions, rows locked (their payloads are to be rewritten)."""
        if not submission_ids:
            return []
        stmt = (
            select(WebhookDelivery)
            .where(WebhookDelivery.submission_id.in_(submission_ids))
            .order_by(WebhookDelivery.created_at)
            .with_for_update()
        )
        return list(self.session.scalars(stmt))

    def forget_responses(self, delivery_ids: Sequence[uuid.UUID]) -> None:
        """Blank what receivers answered to these deliveries (an answer may echo the payload back)."""
        if delivery_ids:
            self.session.execute(
                update(WebhookAttempt)
                .where(
                    WebhookAttempt.delivery_id.in_(delivery_ids), WebhookAttempt.response_excerpt.is_not(None)
                )
                .values(response_excerpt="")
                .execution_options(synchronize_session=False)
            )

    def deliveries_for_submission(self, submission_id: uuid.UUID) -> list[WebhookDelivery]:
        """Every delivery about a submission."""
        stmt = (
            select(WebhookDelivery)
            .where(WebhookDelivery.submission_id == submission_id)
            .order_by(WebhookDelivery.created_at)
        )
        return list(self.session.scalars(stmt))
