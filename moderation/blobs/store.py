"""Content-addressed image blob store: blobs are keyed by the SHA-256 of their bytes, on disk or in S3."""

from __future__ import annotations

import abc
import contextlib
import hashlib
import logging
import os
import re
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from moderation.errors import InvalidInput, ModerationError, NotFound

if TYPE_CHECKING:
    from moderation.config import Settings

logger = logging.getLogger(__name__)

# Files of one batch synced at once by the local store.
_SYNC_THREADS = 8
T = TypeVar("T")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_MISSING_OBJECT = frozenset({"404", "NoSuchKey", "NotFound"})
_MISSING_BUCKET = frozenset({"404", "NoSuchBucket", "NotFound"})


class BlobStoreError(ModerationError):
    """The blob store cannot be reached or used (missing bucket, permissions, full disk, network)."""

    code = "blob_store_unavailable"
    status_code = 503


def _checked(data: bytes, sha256: str) -> bytes:
    """``data`` if its SHA-256 is ``sha256``; BlobStoreError otherwise (a blob is never handed out altered)."""
    if hashlib.sha256(data).hexdigest() != normalize_sha256(sha256):
        raise BlobStoreError(f"blob {normalize_sha256(sha256)} is corrupt: its bytes do not match its digest")
    return data


def normalize_sha256(sha256: str) -> str:
    """Lower-case form of a SHA-256 hex digest; InvalidInput for anything else (no paths, no traversal)."""
    if isinstance(sha256, str):
        key = sha256.lower()
        if _SHA256_RE.fullmatch(key):
            return key
    raise InvalidInput("blob key must be a SHA-256 hex digest (64 hexadecimal characters)")


class BlobStore(abc.ABC):
    """Stores immutable blobs under the SHA-256 hex digest of their content."""

    @abc.abstractmethod
    def put(self, data: bytes) -> str:
        """Store ``data`` unless already present and return its SHA-256 hex digest."""

    def put_many(self, blobs: Sequence[bytes]) -> list[str | BlobStoreError]:
        """Store several blobs; each entry is that blob's digest, or the error it met (the others are stored)."""
        return [self._put_or_error(data) for data in blobs]

    def _put_through_many(self, data: bytes) -> str:
        """``put`` for stores whose ``put_many`` does the work."""
        result = self.put_many([data])[0]
        if isinstance(result, BlobStoreError):
            raise result
        return result

    def _put_or_error(self, data: bytes) -> str | BlobStoreError:
        try:
            return self.put(data)
        except BlobStoreError as exc:
            return exc

    @abc.abstractmethod
    def get(self, sha256: str) -> bytes:
        """The blob with this digest; NotFound when absent."""

    @abc.abstractmethod
    def exists(self, sha256: str) -> bool:
        """Whether a blob with this digest is stored."""

    @abc.abstractmethod
    def delete(self, sha256: str) -> None:
        """Remove the blob with this digest; does nothing when absent."""

    @abc.abstractmethod
    def check(self) -> None:
        """Raise BlobStoreError when the store cannot be used."""

    def close(self) -> None:  # noqa: B027 - most stores hold nothing that needs closing
        """Finish and release what the store holds open."""


def fsync_directory(path: Path) -> None:
    """Make a folder's entries (files created, renamed or removed in it) durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs(directory: Path, *, fsync: bool) -> None:
    """Create ``directory`` and its missing parents; with ``fsync``, make their entries durable.

    A new directory's entry lives in its parent: parents are synced so that the path survives a crash. The
    parent of a folder that already existed is synced too, since another writer may have created it and
    not synced it yet (callers do this once per folder and process).
    """
    missing: list[Path] = []
    current = directory
    while not current.is_dir():
        missing.append(current)
        current = current.parent
    directory.mkdir(parents=True, exist_ok=True)
    if fsync:
        for created in missing or [directory]:
            fsync_directory(created.parent)


def _fail(results: list[str | BlobStoreError], key: str, error: BlobStoreError) -> None:
    """Mark every entry of a batch that stands for ``key`` as failed with ``error``."""
    for index, value in enumerate(results):
        if value == key:
            results[index] = error


class LocalBlobStore(BlobStore):
    """Blobs as files at ``root/ab/<sha256>``, written atomically (temp file, fsync, rename, fsync dir).

    Stores written before the one-level layout hold blobs at ``root/ab/cd/<sha256>``; those are still
    read, found by ``put`` and deleted, and new blobs go to the one-level path.
    """

    def __init__(self, root: Path, fsync: bool = True, sync_concurrency: int = _SYNC_THREADS) -> None:
        self.root = Path(root)
        self.fsync = fsync
        # Fan-out folders this process has made sure of (created, and their entry synced to disk).
        self._ready_dirs: set[Path] = set()
        self._sync_pool = ThreadPoolExecutor(sync_concurrency, thread_name_prefix="blob-sync")

    def path_for(self, sha256: str) -> Path:
        """Where a new blob with this digest is written."""
        key = normalize_sha256(sha256)
        return self.root / key[:2] / key

    def legacy_path_for(self, sha256: str) -> Path:
        """Where the two-level layout of older stores kept the blob with this digest."""
        key = normalize_sha256(sha256)
        return self.root / key[:2] / key[2:4] / key

    def _make_dirs(self, directory: Path) -> None:
        if directory in self._ready_dirs:
            return
        make_dirs(directory, fsync=self.fsync)
        self._ready_dirs.add(directory)

    def _stored_at(self, key: str, size: int) -> Path | None:
        for existing in (self.path_for(key), self.legacy_path_for(key)):
            with contextlib.suppress(FileNotFoundError):
                if existing.stat().st_size == size:
                    return existing
        return None

    def _open_temp(self, key: str, directory: Path) -> tuple[int, str]:
        self._make_dirs(directory)
        try:
            return tempfile.mkstemp(prefix=f".{key}.", suffix=".tmp", dir=directory)
        except FileNotFoundError:
            # The fan-out folder went away since this process made it (an operator cleaned up).
            self._ready_dirs.discard(directory)
            self._make_dirs(directory)
            return tempfile.mkstemp(prefix=f".{key}.", suffix=".tmp", dir=directory)

    def _in_parallel(self, sync: Callable[[T], None], targets: Sequence[T]) -> list[OSError | None]:
        """Run ``sync`` on every target, several at once; the error each met, or None."""

        def attempt(target: T) -> OSError | None:
            try:
                sync(target)
            except OSError as exc:
                return exc
            return None

        if len(targets) <= 1:
            return [attempt(target) for target in targets]
        return list(self._sync_pool.map(attempt, targets))

    def put(self, data: bytes) -> str:
        """Store ``data`` atomically unless an intact copy exists; concurrent writers of one blob are safe."""
        return self._put_through_many(data)

    def put_many(self, blobs: Sequence[bytes]) -> list[str | BlobStoreError]:
        """Store several blobs atomically with one durability pass: write all, sync all, rename all.

        Each blob is complete on disk before its name appears and its folder entry is synced once for the
        whole batch, so a batch costs one fsync per blob plus one per fan-out folder it touched.
        """
        results: list[str | BlobStoreError] = []
        staged: list[tuple[int, str, int, str]] = []  # (result index, key, open fd, temp file)
        staged_keys: set[str] = set()
        present: list[tuple[int, str, Path]] = []  # found already stored: (result index, key, folder)
        for data in blobs:
            key = hashlib.sha256(data).hexdigest()
            results.append(key)
            try:
                if key in staged_keys:
                    continue
                found = self._stored_at(key, len(data))
                if found is not None:
                    # Another writer may have renamed it there and not synced its folder yet.
                    present.append((len(results) - 1, key, found.parent))
                    continue
                fd, tmp_name = self._open_temp(key, self.path_for(key).parent)
                staged.append((len(results) - 1, key, fd, tmp_name))
                staged_keys.add(key)
                with os.fdopen(fd, "wb", closefd=False) as tmp:
                    tmp.write(data)
            except OSError as exc:
                results[-1] = BlobStoreError(f"could not write blob {key}: {exc.strerror or exc}")
        # Syncs of different files overlap (the filesystem's journal commits them together), so a batch is
        # synced in parallel: well under the time and CPU of syncing its files one after another.
        sync_errors = self._in_parallel(os.fsync, [fd for _, _, fd, _ in staged]) if self.fsync else None
        renamed: list[tuple[int, str]] = []
        for position, (index, key, fd, tmp_name) in enumerate(staged):
            written = results[index]
            error = written if isinstance(written, BlobStoreError) else None
            sync_error = sync_errors[position] if sync_errors else None
            try:
                if error is None and sync_error is not None:
                    raise sync_error
                if error is None:
                    # Concurrent writers each rename their own complete temp file; the last rename wins,
                    # and every candidate holds the same bytes, so readers never see a partial blob.
                    os.replace(tmp_name, self.path_for(key))
                    tmp_name = ""
                    renamed.append((index, key))
            except OSError as exc:
                error = BlobStoreError(f"could not write blob {key}: {exc.strerror or exc}")
            finally:
                os.close(fd)
                if tmp_name:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(tmp_name)
            if error is not None:
                _fail(results, key, error)
        if self.fsync and (renamed or present):
            # Folder entries are synced after every rename into them, once per folder.
            in_folder = [(key, self.path_for(key).parent) for _, key in renamed]
            in_folder += [(key, folder) for _, key, folder in present]
            directories = sorted({folder for _, folder in in_folder})
            outcomes = self._in_parallel(fsync_directory, directories)
            for directory, failure in zip(directories, outcomes, strict=True):
                if failure is None:
                    continue
                for key, folder in in_folder:
                    if folder == directory:
                        _fail(results, key, BlobStoreError(f"could not sync blob {key}: {failure}"))
        return results

    def get(self, sha256: str) -> bytes:
        """The blob's bytes; NotFound when absent."""
        path = self.path_for(sha256)
        try:
            return _checked(path.read_bytes(), sha256)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise BlobStoreError(f"could not read blob {path.name}: {exc.strerror or exc}") from exc
        legacy = self.legacy_path_for(sha256)
        try:
            return _checked(legacy.read_bytes(), sha256)
        except FileNotFoundError:
            raise NotFound(f"blob {path.name} not found") from None
        except OSError as exc:
            raise BlobStoreError(f"could not read blob {path.name}: {exc.strerror or exc}") from exc

    def exists(self, sha256: str) -> bool:
        """Whether the blob's file exists."""
        return self.path_for(sha256).is_file() or self.legacy_path_for(sha256).is_file()

    def delete(self, sha256: str) -> None:
        """Remove the blob's file, if any; the removal is durable when the store syncs."""
        try:
            for path in (self.path_for(sha256), self.legacy_path_for(sha256)):
                if path.exists():
                    path.unlink(missing_ok=True)
                    if self.fsync:  # else a crash could bring back an image recorded as deleted
                        fsync_directory(path.parent)
        except OSError as exc:
            raise BlobStoreError(f"could not delete blob {sha256}: {exc.strerror or exc}") from exc

    def check(self) -> None:
        """Create the root if needed and prove it is writable with a probe file."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.root, prefix=".probe.", delete=True) as probe:
                probe.write(b"ok")
                probe.flush()
        except OSError as exc:
            raise BlobStoreError(f"blob directory {self.root} is not usable: {exc}") from exc


_ACCESS_DENIED = frozenset({"403", "AccessDenied", "Forbidden"})


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


class S3BlobStore(BlobStore):
    """Blobs as objects ``<prefix><sha256>`` in a bucket of any S3-compatible service (AWS, MinIO, …)."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str = "us-east-1",
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        upload_concurrency: int = 32,
    ) -> None:
        self.bucket = bucket
        self.upload_concurrency = upload_concurrency
        self._uploads = ThreadPoolExecutor(upload_concurrency, thread_name_prefix="s3-upload")
        self.prefix = prefix
        self.region = region
        config = Config(
            signature_version="s3v4",
            # Custom endpoints (MinIO and friends) rarely have wildcard DNS for virtual-hosted buckets.
            s3={"addressing_style": "path" if endpoint_url else "auto"},
            retries={"max_attempts": 3, "mode": "standard"},
            connect_timeout=5,
            read_timeout=30,
        )
        self._client = boto3.session.Session().client(
            "s3",
            endpoint_url=endpoint_url,
            region_name=region,
            aws_access_key_id=access_key_id,
            aws_secret_access_key=secret_access_key,
            config=config,
        )

    def key_for(self, sha256: str) -> str:
        """The object key of the blob with this digest."""
        return f"{self.prefix}{normalize_sha256(sha256)}"

    def _head(self, key: str) -> bool | None:
        """Whether the object exists; None when S3 will not say (a 403: no s3:ListBucket permission)."""
        try:
            self._client.head_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if _error_code(exc) in _MISSING_OBJECT:
                return False
            if _error_code(exc) in _ACCESS_DENIED:
                return None
            raise BlobStoreError(f"S3 head_object failed: {_error_code(exc)}") from exc
        except BotoCoreError as exc:
            raise BlobStoreError(f"S3 is unreachable: {exc}") from exc
        return True

    def put(self, data: bytes) -> str:
        """Upload ``data`` unless an object with its digest already exists."""
        sha256 = hashlib.sha256(data).hexdigest()
        key = self.key_for(sha256)
        # Without s3:ListBucket, S3 answers a missing key with 403, not 404 (_head gives None): the key is
        # the content's digest, so uploading it again is harmless, and the upload says whether S3 is usable.
        if self._head(key):
            return sha256
        try:
            self._client.put_object(
                Bucket=self.bucket,
                Key=key,
                Body=data,
                ContentType="application/octet-stream",
                Metadata={"sha256": sha256},
            )
        except ClientError as exc:
            raise BlobStoreError(f"S3 put_object failed: {_error_code(exc)}") from exc
        except BotoCoreError as exc:
            raise BlobStoreError(f"S3 is unreachable: {exc}") from exc
        return sha256

    def put_many(self, blobs: Sequence[bytes]) -> list[str | BlobStoreError]:
        """Upload several blobs, up to ``upload_concurrency`` at once (each is one or two round trips)."""
        if len(blobs) <= 1 or self.upload_concurrency <= 1:
            return super().put_many(blobs)
        return list(self._uploads.map(self._put_or_error, blobs))

    def get(self, sha256: str) -> bytes:
        """The object's bytes; NotFound when absent."""
        key = self.key_for(sha256)
        try:
            response = self._client.get_object(Bucket=self.bucket, Key=key)
            body = response["Body"]
            try:
                data = bytes(body.read())
            finally:
                body.close()
        except ClientError as exc:
            if _error_code(exc) in _MISSING_OBJECT:
                raise NotFound(f"blob {normalize_sha256(sha256)} not found") from None
            raise BlobStoreError(f"S3 get_object failed: {_error_code(exc)}") from exc
        except BotoCoreError as exc:
            raise BlobStoreError(f"S3 is unreachable: {exc}") from exc
        return _checked(data, sha256)

    def exists(self, sha256: str) -> bool:
        """Whether the object exists."""
        found = self._head(self.key_for(sha256))
        if found is not None:
            return found
        try:  # S3 will not answer a HEAD: a GET says it
            self.get(sha256)
        except NotFound:
            return False
        return True

    def delete(self, sha256: str) -> None:
        """Delete the object, and its older versions in a versioned bucket; a missing key is success."""
        key = self.key_for(sha256)
        try:
            self._client.delete_object(Bucket=self.bucket, Key=key)
            self._delete_versions(key)
        except ClientError as exc:
            raise BlobStoreError(f"S3 delete_object failed: {_error_code(exc)}") from exc
        except BotoCoreError as exc:
            raise BlobStoreError(f"S3 is unreachable: {exc}") from exc

    def _delete_versions(self, key: str) -> None:
        """In a versioned bucket a delete only adds a marker and keeps the bytes: delete every version.

        The "null" version (stored before versioning was turned on) holds bytes too. Without permission to
        list or delete versions, the older versions stay: that is logged, and the delete counts as done.
        """
        marker: dict[str, str] = {}
        while True:
            try:
                listing = self._client.list_object_versions(Bucket=self.bucket, Prefix=key, **marker)
                for version in [*listing.get("Versions", []), *listing.get("DeleteMarkers", [])]:
                    if version.get("Key") == key and version.get("VersionId"):
                        self._client.delete_object(
                            Bucket=self.bucket, Key=key, VersionId=version["VersionId"]
                        )
            except ClientError as exc:
                if _error_code(exc) not in ("AccessDenied", "403"):
                    raise
                logger.warning(
                    "no permission to list or delete object versions in bucket %s: if it is versioned, the "
                    "older versions of %s keep the image's bytes",
                    self.bucket,
                    key,
                )
                return
            if not listing.get("IsTruncated"):
                return
            marker = {
                "KeyMarker": listing.get("NextKeyMarker", ""),
                "VersionIdMarker": listing.get("NextVersionIdMarker", ""),
            }

    def check(self) -> None:
        """Raise BlobStoreError unless the bucket exists and is accessible."""
        try:
            self._client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            raise BlobStoreError(
                f"S3 bucket {self.bucket!r} is not usable: {_error_code(exc) or exc}"
            ) from exc
        except BotoCoreError as exc:
            raise BlobStoreError(f"S3 is unreachable: {exc}") from exc

    def ensure_bucket(self) -> None:
        """Create the bucket when it does not exist yet (the only thing this store ever creates)."""
        try:
            self._client.head_bucket(Bucket=self.bucket)
            return
        except ClientError as exc:
            if _error_code(exc) not in _MISSING_BUCKET:
                raise BlobStoreError(f"S3 head_bucket failed: {_error_code(exc)}") from exc
        except BotoCoreError as exc:
            raise BlobStoreError(f"S3 is unreachable: {exc}") from exc
        kwargs: dict[str, Any] = {"Bucket": self.bucket}
        if self.region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
        try:
            self._client.create_bucket(**kwargs)
        except ClientError as exc:
            # Another process of ours may have created it since head_bucket.
            if _error_code(exc) != "BucketAlreadyOwnedByYou":
                raise BlobStoreError(f"S3 create_bucket failed: {_error_code(exc)}") from exc


def blob_store_from_settings(settings: Settings) -> BlobStore:
    """The blob store the settings select (``blob_backend``: local or s3; ``blob_local_layout``)."""
    if settings.blob_backend == "s3":
        return S3BlobStore(
            bucket=settings.s3_bucket,
            prefix=settings.s3_prefix,
            endpoint_url=settings.s3_endpoint_url,
            region=settings.s3_region,
            access_key_id=settings.s3_access_key_id,
            secret_access_key=settings.s3_secret_access_key,
            upload_concurrency=settings.effective_intake_store_concurrency,
        )
    if settings.blob_local_layout == "files":
        return LocalBlobStore(
            settings.effective_blob_dir,
            fsync=settings.blob_fsync,
            sync_concurrency=settings.effective_intake_store_concurrency,
        )
    from moderation.blobs.segments import SegmentBlobStore  # here: that module imports this one

    return SegmentBlobStore(
        settings.effective_blob_dir,
        fsync=settings.blob_fsync,
        segment_max_bytes=settings.blob_segment_max_bytes,
        direct_io=settings.blob_direct_io,
    )
