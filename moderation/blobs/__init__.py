"""Content-addressed storage of submitted images."""

from moderation.blobs.segments import SegmentBlobStore
from moderation.blobs.store import (
    BlobStore,
    BlobStoreError,
    LocalBlobStore,
    S3BlobStore,
    blob_store_from_settings,
    normalize_sha256,
)

__all__ = [
    "BlobStore",
    "BlobStoreError",
    "LocalBlobStore",
    "S3BlobStore",
    "SegmentBlobStore",
    "blob_store_from_settings",
    "normalize_sha256",
]
