"""Prometheus metrics shared by the API and the workers (multi-process aware)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

INTAKE_REQUESTS = Counter(
    "moderation_intake_requests_total", "Submission intake requests by outcome", ["outcome"]
)
INTAKE_LATENCY = Histogram(
    "moderation_intake_seconds",
    "Time to accept a submission",
    buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0),
)
INTAKE_BATCH_SIZE = Histogram(
    "moderation_intake_batch_size",
    "Submissions stored per intake transaction (group commit)",
    buckets=(1, 2, 4, 8, 16, 32, 64),
)
BATCH_SIZE = Histogram(
    "moderation_batch_size", "Submissions per inference batch", buckets=(1, 2, 4, 8, 16, 32, 64, 128)
)
INFERENCE_SECONDS = Histogram(
    "moderation_inference_seconds",
    "Engine time per batch",
    buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0),
)
VERDICTS = Counter("moderation_verdicts_total", "Verdicts written, by decision", ["decision"])
PROCESSING_FAILURES = Counter(
    "moderation_processing_failures_total", "Submission processing failures by kind", ["kind"]
)
WEBHOOK_ATTEMPTS = Counter(
    "moderation_webhook_attempts_total", "Webhook delivery attempts by result", ["result"]
)
SWEEPER_RECOVERED = Counter("moderation_sweeper_recovered_total", "Work re-enqueued by the sweeper", ["kind"])
SUBMISSIONS_ERASED = Counter(
    "moderation_submissions_erased_total",
    "Submissions whose content was erased, by cause (api, retention)",
    ["cause"],
)
ERASED_IMAGES_DELETED = Counter(
    "moderation_erased_images_deleted_total", "Images deleted because every submission of them was erased"
)
ERASED_IMAGE_RACES = Counter(
    "moderation_erased_image_races_total",
    "Images posted again while their last copy was being deleted (their new submission fails)",
)
VERDICTS_WITHOUT_INFERENCE = Counter(
    "moderation_verdicts_without_inference_total",
    "Verdicts reached without running the engine, by cause (known_image, blocklist, cache)",
    ["cause"],
)
