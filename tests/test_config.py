"""Settings that other parts derive their behaviour from."""

from __future__ import annotations

from moderation.blobs import S3BlobStore, blob_store_from_settings
from moderation.config import Settings


def test_intake_store_concurrency_defaults_by_blob_backend() -> None:
    assert Settings(blob_backend="local").effective_intake_store_concurrency == 8
    assert Settings(blob_backend="s3").effective_intake_store_concurrency == 32
    assert Settings(blob_backend="s3", intake_store_concurrency=2).effective_intake_store_concurrency == 2


def test_the_s3_store_uploads_as_many_images_at_once_as_the_setting_allows() -> None:
    store = blob_store_from_settings(Settings(blob_backend="s3", s3_bucket="b", intake_store_concurrency=3))
    assert isinstance(store, S3BlobStore) and store.upload_concurrency == 3
