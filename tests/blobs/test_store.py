"""Content-addressed blob stores: the local filesystem one, and S3 against a real moto server over HTTP."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError

import moderation.blobs.store as store_module
from moderation.blobs import (
    BlobStore,
    BlobStoreError,
    LocalBlobStore,
    S3BlobStore,
    SegmentBlobStore,
    blob_store_from_settings,
)
from moderation.config import Settings
from moderation.errors import InvalidInput, NotFound

BAD_KEYS = [
    "../../etc/passwd",
    "../" + "a" * 61,
    "a" * 63,
    "a" * 65,
    "g" * 64,
    "a" * 32 + "/" + "a" * 31,
    "",
    " " + "a" * 63,
    "a" * 63 + "\n",
]


def all_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


# Local store ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fsync", [True, False])
def test_local_round_trip_and_layout(tmp_path: Path, fsync: bool) -> None:
    store = LocalBlobStore(tmp_path / "blobs", fsync=fsync)
    data = b"\x89PNG\r\n\x1a\n" + os.urandom(1000)
    key = store.put(data)
    assert key == hashlib.sha256(data).hexdigest()
    assert store.get(key) == data
    assert store.exists(key)
    assert all_files(tmp_path / "blobs") == [tmp_path / "blobs" / key[:2] / key]
    assert store.get(key.upper()) == data
    store.delete(key)
    assert not store.exists(key)
    store.delete(key)


def test_local_reads_blobs_of_the_older_two_level_layout(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path)
    data = b"stored before the one-level layout"
    key = hashlib.sha256(data).hexdigest()
    legacy = tmp_path / key[:2] / key[2:4] / key
    legacy.parent.mkdir(parents=True)
    legacy.write_bytes(data)
    assert store.legacy_path_for(key) == legacy
    assert store.exists(key) and store.get(key) == data
    # Storing the same bytes again finds the old copy instead of writing a second one.
    assert store.put(data) == key
    assert all_files(tmp_path) == [legacy]
    store.delete(key)
    assert not store.exists(key) and all_files(tmp_path) == []
    with pytest.raises(NotFound):
        store.get(key)


def _blobs_in_folder(prefix: str, count: int) -> list[bytes]:
    """``count`` different blobs whose digests start with ``prefix``."""
    found = (str(i).encode() for i in range(100_000))
    return [data for data in found if hashlib.sha256(data).hexdigest().startswith(prefix)][:count]


def test_local_put_syncs_each_new_fan_out_folder_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[Path] = []
    real_fsync_dir = store_module.fsync_directory
    monkeypatch.setattr(
        store_module, "fsync_directory", lambda path: (synced.append(path), real_fsync_dir(path))
    )
    root = tmp_path / "blobs"
    store = LocalBlobStore(root)
    first, second, third = _blobs_in_folder("ab", 3)
    store.put(first)
    # The fan-out folder's entry in the new root, the root's entry in tmp_path, then the blob's entry.
    assert synced == [root, tmp_path, root / "ab"]
    synced.clear()
    store.put(second)
    assert synced == [root / "ab"]
    # Another process may have just made the folder without syncing it yet: its entry is synced once more.
    synced.clear()
    LocalBlobStore(root).put(third)
    assert synced == [root, root / "ab"]


def test_local_put_is_idempotent(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path)
    key = store.put(b"same bytes")
    path = store.path_for(key)
    before = path.stat()
    assert store.put(b"same bytes") == key
    after = path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert store.put(b"other bytes") != key
    assert len(all_files(tmp_path)) == 2


def test_local_put_repairs_truncated_blob(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path)
    key = store.put(b"complete content")
    store.path_for(key).write_bytes(b"compl")
    assert store.put(b"complete content") == key
    assert store.get(key) == b"complete content"


def test_local_empty_blob(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path)
    key = store.put(b"")
    assert key == hashlib.sha256(b"").hexdigest()
    assert store.get(key) == b""


def test_local_missing_blob_is_not_found(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path)
    missing = hashlib.sha256(b"never stored").hexdigest()
    assert not store.exists(missing)
    with pytest.raises(NotFound):
        store.get(missing)


@pytest.mark.parametrize("bad", BAD_KEYS)
def test_local_rejects_non_digest_keys(tmp_path: Path, bad: str) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    secret = tmp_path / "secret"
    secret.write_bytes(b"do not touch")
    for operation in (store.get, store.exists, store.delete, store.path_for):
        with pytest.raises(InvalidInput):
            operation(bad)
    assert secret.read_bytes() == b"do not touch"


def test_local_concurrent_put_of_same_data(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    data = os.urandom(256 * 1024)
    threads_count = 16
    barrier = threading.Barrier(threads_count)
    keys: list[str] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            barrier.wait()
            for _ in range(5):
                keys.append(store.put(data))
                assert store.get(hashlib.sha256(data).hexdigest()) == data
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(threads_count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert set(keys) == {hashlib.sha256(data).hexdigest()}
    assert len(keys) == threads_count * 5
    # No temp files left behind, only the blob itself.
    assert all_files(tmp_path / "blobs") == [store.path_for(keys[0])]


def test_local_check(tmp_path: Path) -> None:
    LocalBlobStore(tmp_path / "new" / "root").check()
    assert (tmp_path / "new" / "root").is_dir()
    assert all_files(tmp_path) == []
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"")
    with pytest.raises(BlobStoreError):
        LocalBlobStore(blocker / "blobs").check()
    with pytest.raises(BlobStoreError):
        LocalBlobStore(blocker).put(b"x")


def test_blob_store_from_settings(tmp_path: Path) -> None:
    local = blob_store_from_settings(
        Settings(blob_backend="local", blob_local_layout="files", blob_dir=tmp_path, blob_fsync=False)
    )
    assert isinstance(local, LocalBlobStore)
    assert (local.root, local.fsync) == (tmp_path, False)
    segments = blob_store_from_settings(
        Settings(blob_backend="local", blob_dir=tmp_path, blob_segment_max_bytes=1 << 20)
    )
    assert isinstance(segments, SegmentBlobStore)
    assert (segments.root, segments.fsync, segments.segment_max_bytes) == (tmp_path, True, 1 << 20)
    default_dir = blob_store_from_settings(Settings(blob_backend="local", blob_dir=None, data_dir=tmp_path))
    assert isinstance(default_dir, SegmentBlobStore)
    assert default_dir.root == tmp_path / "blobs"
    s3 = blob_store_from_settings(
        Settings(
            blob_backend="s3",
            s3_bucket="b",
            s3_prefix="p/",
            s3_endpoint_url="http://127.0.0.1:1",
            s3_access_key_id="k",
            s3_secret_access_key="s",
        )
    )
    assert isinstance(s3, S3BlobStore)
    assert (s3.bucket, s3.prefix) == ("b", "p/")
    assert isinstance(s3, BlobStore)


# S3 store against moto's server ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    with pytest.MonkeyPatch.context() as patch:
        # Keep botocore away from the instance metadata service and any developer profile.
        patch.setenv("AWS_EC2_METADATA_DISABLED", "true")
        patch.setenv("AWS_CONFIG_FILE", os.devnull)
        patch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
        for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "HTTP_PROXY", "HTTPS_PROXY"):
            patch.delenv(name, raising=False)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        try:
            yield f"http://{host}:{port}"
        finally:
            server.stop()


def make_s3(endpoint: str, bucket: str, prefix: str = "images/", region: str = "us-east-1") -> S3BlobStore:
    return S3BlobStore(
        bucket=bucket,
        prefix=prefix,
        endpoint_url=endpoint,
        region=region,
        access_key_id="testing",
        secret_access_key="testing",
    )


def raw_client(endpoint: str) -> Any:
    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


@pytest.fixture
def s3_store(moto_endpoint: str) -> S3BlobStore:
    store = make_s3(moto_endpoint, f"blobs-{uuid.uuid4().hex[:12]}")
    store.ensure_bucket()
    return store


def test_s3_ensure_bucket_and_check(moto_endpoint: str) -> None:
    for region in ("us-east-1", "eu-west-1"):
        store = make_s3(moto_endpoint, f"fresh-{uuid.uuid4().hex[:12]}", region=region)
        with pytest.raises(BlobStoreError):
            store.check()
        store.ensure_bucket()
        store.ensure_bucket()
        store.check()


def test_s3_round_trip_and_key_layout(s3_store: S3BlobStore, moto_endpoint: str) -> None:
    data = os.urandom(2048)
    key = s3_store.put(data)
    assert key == hashlib.sha256(data).hexdigest()
    assert s3_store.get(key) == data
    assert s3_store.exists(key)
    listing = raw_client(moto_endpoint).list_objects_v2(Bucket=s3_store.bucket)
    assert [obj["Key"] for obj in listing["Contents"]] == [f"images/{key}"]
    s3_store.delete(key)
    assert not s3_store.exists(key)
    s3_store.delete(key)
    with pytest.raises(NotFound):
        s3_store.get(key)


def test_s3_put_skips_upload_when_object_exists(s3_store: S3BlobStore, moto_endpoint: str) -> None:
    key = s3_store.put(b"original")
    # Overwrite behind the store's back: a second put must not upload again.
    raw_client(moto_endpoint).put_object(Bucket=s3_store.bucket, Key=f"images/{key}", Body=b"marker")
    assert s3_store.put(b"original") == key
    stored = raw_client(moto_endpoint).get_object(Bucket=s3_store.bucket, Key=f"images/{key}")
    assert stored["Body"].read() == b"marker"


def test_s3_rejects_non_digest_keys(s3_store: S3BlobStore) -> None:
    for bad in BAD_KEYS:
        for operation in (s3_store.get, s3_store.exists, s3_store.delete):
            with pytest.raises(InvalidInput):
                operation(bad)


def test_s3_missing_bucket_and_unreachable_endpoint(moto_endpoint: str) -> None:
    missing = make_s3(moto_endpoint, f"absent-{uuid.uuid4().hex[:12]}")
    with pytest.raises(BlobStoreError):
        missing.put(b"data")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dead = make_s3(f"http://127.0.0.1:{port}", "whatever")
    with pytest.raises(BlobStoreError, match="unreachable"):
        dead.check()


def test_local_put_remakes_a_fan_out_folder_removed_while_running(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path)
    first = store.put(b"first blob")
    folder = store.path_for(first).parent
    shutil.rmtree(folder)
    data = b"another blob"
    while hashlib.sha256(data).hexdigest()[:2] != first[:2]:  # one that lands in the same folder
        data += b"."
    key = store.put(data)
    assert store.get(key) == data and store.path_for(key).parent == folder


def test_local_put_many_syncs_every_blob_before_its_name_appears_and_each_folder_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    in_ab = _blobs_in_folder("ab", 3)
    in_cd = _blobs_in_folder("cd", 2)
    already = store.put(_blobs_in_folder("ef", 1)[0])
    # Blobs already in both folders, so the batch makes no folder (that path is tested above).
    store.put(in_ab[2])
    store.put(in_cd[1])
    events: list[tuple[str, str]] = []
    real_fsync, real_replace, real_fsync_dir = os.fsync, os.replace, store_module.fsync_directory

    def fsync(fd: int) -> None:
        target = os.readlink(f"/proc/self/fd/{fd}")
        if not Path(target).is_dir():  # folders are recorded by fsync_dir
            events.append(("fsync", target))
        real_fsync(fd)

    def replace(source: str, target: Path) -> None:
        events.append(("rename", str(target)))
        real_replace(source, target)

    def fsync_dir(path: Path) -> None:
        events.append(("sync folder", str(path)))
        real_fsync_dir(path)

    monkeypatch.setattr(store_module.os, "fsync", fsync)
    monkeypatch.setattr(store_module.os, "replace", replace)
    monkeypatch.setattr(store_module, "fsync_directory", fsync_dir)
    batch = [in_ab[0], in_cd[0], in_ab[1], in_ab[0], _blobs_in_folder("ef", 1)[0]]
    keys = store.put_many(batch)
    assert keys == [hashlib.sha256(data).hexdigest() for data in batch] and keys[4] == already
    for data in batch:
        assert store.get(hashlib.sha256(data).hexdigest()) == data
    # Three new blobs (the repeat is written once, the stored one not at all): every temp file is synced
    # before any is renamed, and every rename comes before the one sync of each folder it went into. The
    # folder of the blob found stored is synced too: its writer may not have synced it yet.
    kinds = [kind for kind, _ in events]
    assert kinds == ["fsync"] * 3 + ["rename"] * 3 + ["sync folder"] * 3
    temps = sorted(Path(path).name.split(".")[1] for _, path in events[:3])
    assert temps == sorted(Path(path).name for _, path in events[3:6])
    assert sorted(path for _, path in events[6:]) == [str(store.root / d) for d in ("ab", "cd", "ef")]
    assert not [p for p in all_files(store.root) if p.name.endswith(".tmp")]


def test_local_put_many_fails_only_the_blob_that_cannot_be_written(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    good, blocked = _blobs_in_folder("ab", 1)[0], _blobs_in_folder("cd", 1)[0]
    store.root.mkdir()
    (store.root / "cd").write_bytes(b"a file where the fan-out folder should be")
    results = store.put_many([good, blocked, blocked])
    assert results[0] == hashlib.sha256(good).hexdigest() and store.get(results[0]) == good
    assert isinstance(results[1], BlobStoreError) and isinstance(results[2], BlobStoreError)
    assert "could not write blob" in str(results[1])
    with pytest.raises(BlobStoreError):
        store.put(blocked)


def test_s3_put_many_uploads_in_parallel_and_reports_each_blob(
    s3_store: S3BlobStore, moto_endpoint: str
) -> None:
    s3_store.upload_concurrency = 4
    batch = [os.urandom(1000) for _ in range(6)]
    stored_first = s3_store.put(batch[0])
    keys = s3_store.put_many([*batch, batch[1]])
    assert (
        keys == [hashlib.sha256(data).hexdigest() for data in [*batch, batch[1]]] and keys[0] == stored_first
    )
    for data, key in zip(batch, keys, strict=False):
        assert s3_store.get(str(key)) == data
    missing = make_s3(moto_endpoint, f"absent-{uuid.uuid4().hex[:12]}")
    missing.upload_concurrency = 4
    assert all(isinstance(result, BlobStoreError) for result in missing.put_many(batch[:3]))


def test_local_put_many_fails_a_blob_whose_sync_fails_and_leaves_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    store = LocalBlobStore(tmp_path / "blobs")
    good, bad = _blobs_in_folder("ab", 2)
    bad_key = hashlib.sha256(bad).hexdigest()
    real_fsync = os.fsync

    def failing_fsync(fd: int) -> None:
        if bad_key in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(store_module.os, "fsync", failing_fsync)
    results = store.put_many([good, bad])
    assert results[0] == hashlib.sha256(good).hexdigest() and store.get(results[0]) == good
    assert isinstance(results[1], BlobStoreError) and "Input/output error" in str(results[1])
    assert not store.exists(bad_key)
    assert all_files(store.root) == [store.path_for(results[0])]


def test_s3_without_list_permission_still_stores_new_images(s3_store: S3BlobStore) -> None:
    # Without s3:ListBucket, S3 answers a HEAD of a missing key with 403, not 404.
    def forbidden(**_: Any) -> Any:
        raise ClientError({"Error": {"Code": "403", "Message": "Forbidden"}}, "HeadObject")

    s3_store._client.head_object = forbidden  # type: ignore[method-assign]
    data = os.urandom(1024)
    key = s3_store.put(data)
    assert s3_store.get(key) == data and s3_store.exists(key)
    assert not s3_store.exists(hashlib.sha256(b"never stored").hexdigest())


def test_a_blob_whose_bytes_no_longer_match_its_digest_is_never_handed_out(
    s3_store: S3BlobStore, moto_endpoint: str, tmp_path: Path
) -> None:
    key = s3_store.put(b"the original bytes")
    raw_client(moto_endpoint).put_object(Bucket=s3_store.bucket, Key=s3_store.key_for(key), Body=b"altered")
    with pytest.raises(BlobStoreError, match="corrupt"):
        s3_store.get(key)
    local = LocalBlobStore(tmp_path / "blobs", fsync=False)
    local_key = local.put(b"the original bytes")
    local.path_for(local_key).write_bytes(b"altered")
    with pytest.raises(BlobStoreError, match="corrupt"):
        local.get(local_key)


def test_s3_delete_removes_every_version_in_a_versioned_bucket(
    s3_store: S3BlobStore, moto_endpoint: str
) -> None:
    client = raw_client(moto_endpoint)
    client.put_bucket_versioning(Bucket=s3_store.bucket, VersioningConfiguration={"Status": "Enabled"})
    data = os.urandom(4096)
    key = s3_store.put(data)
    client.put_object(Bucket=s3_store.bucket, Key=f"images/{key}", Body=data)  # a second version
    s3_store.delete(key)
    versions = client.list_object_versions(Bucket=s3_store.bucket, Prefix=f"images/{key}")
    assert versions.get("Versions", []) == [] and versions.get("DeleteMarkers", []) == []
    assert not s3_store.exists(key)


def test_s3_delete_removes_the_version_stored_before_versioning_was_turned_on(
    s3_store: S3BlobStore, moto_endpoint: str
) -> None:
    client = raw_client(moto_endpoint)
    key = s3_store.put(os.urandom(4096))  # the "null" version
    client.put_bucket_versioning(Bucket=s3_store.bucket, VersioningConfiguration={"Status": "Enabled"})
    s3_store.delete(key)
    versions = client.list_object_versions(Bucket=s3_store.bucket, Prefix=f"images/{key}")
    assert versions.get("Versions", []) == [] and versions.get("DeleteMarkers", []) == []
