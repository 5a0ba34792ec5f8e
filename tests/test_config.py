"""Settings derived from other settings."""

from __future__ import annotations

from moderation.config import Settings


def test_intake_store_concurrency_defaults_by_blob_backend() -> None:
    assert Settings(blob_backend="local").effective_intake_store_concurrency == 4
    assert Settings(blob_backend="s3").effective_intake_store_concurrency == 32
    assert Settings(blob_backend="s3", intake_store_concurrency=2).effective_intake_store_concurrency == 2
