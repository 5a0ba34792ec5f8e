"""Every table of the service, imported in one place for Alembic and the ORM registry."""

from moderation.audit.models import AuditEntry as AuditEntry
from moderation.db import Base
from moderation.policy.models import KnownImage as KnownImage
from moderation.processing.models import VerdictCacheEntry as VerdictCacheEntry
from moderation.review.models import ReviewDecision, ReviewItem, ReviewState
from moderation.reviewers.models import Reviewer as Reviewer
from moderation.submissions.models import Decision, ProcessingAttempt, Submission, SubmissionStatus, Verdict
from moderation.tenants.models import ApiKey, Tenant
from moderation.webhooks.models import (
    DeliveryStatus,
    WebhookAttempt,
    WebhookDelivery,
    WebhookEndpoint,
    WebhookEvent,
)

__all__ = [
    "ApiKey",
    "Base",
    "Decision",
    "DeliveryStatus",
    "ProcessingAttempt",
    "ReviewDecision",
    "ReviewItem",
    "ReviewState",
    "Submission",
    "SubmissionStatus",
    "Tenant",
    "Verdict",
    "WebhookAttempt",
    "WebhookDelivery",
    "WebhookEndpoint",
    "WebhookEvent",
]
