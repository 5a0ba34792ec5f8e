"""The segment blob store: blobs appended to per-process segment files, read back by any process."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import mmap
import multiprocessing
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import moderation.blobs.segments as segments_module
from moderation.blobs import BlobStoreError, LocalBlobStore, SegmentBlobStore
from moderation.errors import InvalidInput, NotFound


@pytest.fixture(autouse=True, params=["direct", "buffered"])
def io_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    """Every test runs twice: stores that append with direct I/O, and through the page cache (the fallback).

    Tests marked ``direct_io_only`` run with direct I/O alone.
    """
    if request.param == "direct" and not _has_direct_io(tmp_path):
        pytest.skip("the test folder's filesystem has no direct I/O")
    if request.param == "buffered" and request.node.get_closest_marker("direct_io_only"):
        pytest.skip("a direct I/O test")
    if request.param == "buffered":
        real_init = SegmentBlobStore.__init__

        def buffered_init(self: SegmentBlobStore, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("direct_io", False)
            real_init(self, *args, **kwargs)

        monkeypatch.setattr(SegmentBlobStore, "__init__", buffered_init)
    return str(request.param)


def _has_direct_io(folder: Path) -> bool:
    """Whether a 4 KiB direct write succeeds in ``folder``."""
    block = mmap.mmap(-1, 4096, flags=mmap.MAP_PRIVATE)
    fd = os.open(folder / ".direct-io-probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT)
    try:
        os.pwrite(fd, block, 0)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
        os.unlink(folder / ".direct-io-probe")


def segment_size(io_mode: str, *appends: list[bytes]) -> int:
    """The size of a segment after these appends (one list of blobs per ``put_many``)."""
    size = 4096 if io_mode == "direct" else 0  # a direct segment starts with a block of padding
    for blobs in appends:
        written = sum(44 + len(data) for data in blobs)
        if io_mode == "direct":
            written = -(-written // 4096) * 4096 + (4096 if 0 < -written % 4096 < 44 else 0)
        size += written
    return size


def blob(seed: int, size: int = 5000) -> bytes:
    """Distinct bytes for each seed."""
    return (hashlib.sha256(str(seed).encode()).digest() * (size // 32 + 1))[:size]


def files(store: SegmentBlobStore, suffix: str) -> list[Path]:
    return sorted(store.directory.glob(f"*{suffix}"))


def test_round_trip_appends_to_one_segment_and_seals_it_on_close(tmp_path: Path, io_mode: str) -> None:
    store = SegmentBlobStore(tmp_path)
    data = [blob(i) for i in range(3)]
    keys = [store.put(d) for d in data]
    assert keys == [hashlib.sha256(d).hexdigest() for d in data]
    assert [store.get(k) for k in keys] == data
    assert store.get(keys[0].upper()) == data[0] and store.exists(keys[1])
    [segment] = files(store, ".seg")
    assert files(store, ".idx") == []
    # Three records (a 44-byte header each), padding for direct I/O and nothing else: no file per blob,
    # nothing loose in the root.
    assert segment.stat().st_size == segment_size(io_mode, *([d] for d in data))
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == [segment]
    store.close()
    assert [p.stem for p in files(store, ".idx")] == [segment.stem]
    assert [store.get(k) for k in keys] == data
    assert [SegmentBlobStore(tmp_path).get(k) for k in keys] == data


def test_a_blob_already_stored_is_not_appended_again(tmp_path: Path, io_mode: str) -> None:
    store = SegmentBlobStore(tmp_path)
    results = store.put_many([blob(1), blob(2), blob(1)])
    assert results == [hashlib.sha256(d).hexdigest() for d in (blob(1), blob(2), blob(1))]
    [segment] = files(store, ".seg")
    size = segment.stat().st_size
    assert size == segment_size(io_mode, [blob(1), blob(2)])
    assert store.put(blob(2)) == results[1]
    assert segment.stat().st_size == size


def test_missing_and_invalid_keys(tmp_path: Path) -> None:
    store = SegmentBlobStore(tmp_path)
    store.put(blob(1))
    with pytest.raises(NotFound):
        store.get("0" * 64)
    assert not store.exists("0" * 64)
    for bad in ("../../etc/passwd", "a" * 63, "g" * 64, ""):
        with pytest.raises(InvalidInput):
            store.get(bad)


def test_one_batch_costs_one_data_sync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    syncs: list[int] = []
    real = os.fdatasync
    monkeypatch.setattr(segments_module.os, "fdatasync", lambda fd: (syncs.append(fd), real(fd))[1])
    store = SegmentBlobStore(tmp_path)
    store.put_many([blob(i) for i in range(10)])
    assert len(syncs) == 1
    store.put_many([blob(i) for i in range(10)])  # all known: nothing to write, nothing to sync
    assert len(syncs) == 1


def test_concurrent_puts_share_syncs_and_each_returns_only_once_durable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced_sizes: list[int] = []
    real = os.fdatasync

    def slow_sync(fd: int) -> None:
        size = os.fstat(fd).st_size  # everything appended before the sync starts is made durable by it
        time.sleep(0.05)
        real(fd)
        synced_sizes.append(size)

    monkeypatch.setattr(segments_module.os, "fdatasync", slow_sync)
    store = SegmentBlobStore(tmp_path)
    start = threading.Barrier(16)
    violations: list[str] = []

    def put(seed: int) -> None:
        start.wait()
        key = store.put(blob(seed))
        location = store._unsealed[bytes.fromhex(key)]
        if max(synced_sizes, default=0) < location.offset + 44 + location.length:
            violations.append(key)

    threads = [threading.Thread(target=put, args=(seed,)) for seed in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert violations == []
    assert 1 <= len(synced_sizes) <= 4  # 16 appends, a few shared syncs (one alone would be 16)
    reader = SegmentBlobStore(tmp_path)
    assert all(reader.get(hashlib.sha256(blob(seed)).hexdigest()) == blob(seed) for seed in range(16))


def test_another_process_reads_an_unsealed_segment_as_it_grows(tmp_path: Path, io_mode: str) -> None:
    writer, reader = SegmentBlobStore(tmp_path), SegmentBlobStore(tmp_path)
    first = writer.put(blob(1))
    assert reader.get(first) == blob(1)
    later = writer.put(blob(2))  # appended after the reader scanned the segment
    assert reader.get(later) == blob(2)
    # Read up to the end of the last record (not the padding after it).
    assert reader._scanned[files(writer, ".seg")[0].stem] == segment_size(io_mode, [blob(1)]) + 44 + 5000


def test_full_segments_are_sealed_and_found_through_their_index(tmp_path: Path) -> None:
    store = SegmentBlobStore(tmp_path, segment_max_bytes=1 << 20)
    data = [blob(i, 40_000) for i in range(60)]
    keys = [store.put(d) for d in data]
    sealed = files(store, ".idx")
    # 24 to 27 blobs of 40 KB fill 1 MiB (fewer with direct I/O's padding).
    assert len(sealed) == 2 and len(files(store, ".seg")) == 3
    reader = SegmentBlobStore(tmp_path)
    assert all(reader.get(k) == d for k, d in zip(keys, data, strict=True))
    assert len(reader._sealed) == 2
    assert store._active is not None
    assert sum(index.count for index in reader._sealed.values()) == 60 - len(store._active.records)
    with pytest.raises(NotFound):
        reader.get(hashlib.sha256(b"absent").hexdigest())


def test_a_read_searches_only_the_sealed_indexes_whose_filter_may_hold_the_digest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = SegmentBlobStore(tmp_path, segment_max_bytes=200_000)
    data = [blob(i, 20_000) for i in range(200)]
    keys = [store.put(d) for d in data]
    store.close()
    reader = SegmentBlobStore(tmp_path)
    with pytest.raises(NotFound):
        reader.get(hashlib.sha256(b"absent").hexdigest())  # learns of every sealed segment
    indexes = list(reader._sealed.values())
    assert len(indexes) >= 20 and all(index.filter for index in indexes)
    searched: list[str] = []
    real_open = os.open

    def counting_open(path: object, *args: object, **kwargs: object) -> int:
        if str(path).endswith(".idx"):
            searched.append(str(path))
        return real_open(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(segments_module.os, "open", counting_open)
    for key, expected in zip(keys, data, strict=True):
        assert reader.get(key) == expected
    # Each blob lies in one segment: about one index searched per read, not one per segment.
    assert len(searched) < len(keys) * 1.2
    searched.clear()
    absent = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(-100, 0)]
    assert not any(reader.exists(key) for key in absent)
    assert len(searched) < len(absent) * len(indexes) * 0.1  # false positives only


def test_indexes_sealed_before_the_filter_existed_are_still_read(tmp_path: Path) -> None:
    store = SegmentBlobStore(tmp_path)
    data = [blob(i) for i in range(5)]
    keys = [store.put(d) for d in data]
    store.close()
    [index] = files(store, ".idx")
    raw = index.read_bytes()
    count = int.from_bytes(raw[4:12], "big")
    index.write_bytes(b"MBI1" + raw[4 : 12 + count * 48])  # the first format: entries only
    reader = SegmentBlobStore(tmp_path)
    assert [reader.get(k) for k in keys] == data
    [adopted] = reader._sealed.values()
    assert adopted.filter is None


def test_a_writer_that_died_leaves_a_segment_the_next_writer_seals(tmp_path: Path) -> None:
    script = (
        "import os, signal, sys\n"
        "from moderation.blobs import SegmentBlobStore\n"
        "store = SegmentBlobStore(sys.argv[1])\n"
        "for seed in range(5):\n"
        "    store.put(str(seed).encode() * 1000)\n"
        "segment = os.listdir(store.directory)[0]\n"
        "with open(store.directory / segment, 'ab') as f:\n"
        "    f.write(b'MBR1' + (10**6).to_bytes(8, 'big') + bytes(32) + b'torn')  # a record cut short\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=False, timeout=60)
    assert result.returncode == -9
    keys = [hashlib.sha256(str(seed).encode() * 1000).hexdigest() for seed in range(5)]
    reader = SegmentBlobStore(tmp_path)
    assert [reader.get(k) for k in keys] == [str(seed).encode() * 1000 for seed in range(5)]
    assert files(reader, ".idx") == []
    writer = SegmentBlobStore(tmp_path)
    writer.put(b"new")
    [orphan_index] = files(writer, ".idx")
    assert len(files(writer, ".seg")) == 2
    assert [SegmentBlobStore(tmp_path).get(k) for k in keys] == [str(s).encode() * 1000 for s in range(5)]
    assert int.from_bytes(orphan_index.read_bytes()[4:12], "big") == 5  # the torn record is not indexed


def test_a_live_writers_segment_is_not_sealed_by_another_writer(tmp_path: Path) -> None:
    first, second = SegmentBlobStore(tmp_path), SegmentBlobStore(tmp_path)
    key = first.put(blob(1))
    second.put(blob(2))
    assert files(first, ".idx") == []  # the first writer holds its segment's lock
    assert len(files(first, ".seg")) == 2
    assert first.put(blob(3)) and second.get(key) == blob(1)


def test_an_empty_orphan_segment_is_removed(tmp_path: Path) -> None:
    (tmp_path / "segments").mkdir()
    (tmp_path / "segments" / "00000000000000000001-1-deadbeef.seg").write_bytes(b"MBR1\x00")
    store = SegmentBlobStore(tmp_path)
    store.put(blob(1))
    assert [p.name for p in files(store, ".seg")] != ["00000000000000000001-1-deadbeef.seg"]
    assert len(files(store, ".seg")) == 1 and files(store, ".idx") == []


def test_a_failed_append_fails_its_batch_and_hides_nothing_written_later(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = SegmentBlobStore(tmp_path)
    kept = store.put(blob(1))
    early_reader = SegmentBlobStore(tmp_path)
    assert early_reader.get(kept) == blob(1)  # it has read the segment up to here
    real_pwritev, real_pwrite = os.pwritev, os.pwrite

    # A whole record, part of the next, then the disk is full.
    def disk_full_buffered(fd: int, buffers: list[memoryview], offset: int) -> int:
        real_pwritev(fd, [*buffers[:2], buffers[2][:20]], offset)
        raise OSError(errno.ENOSPC, "No space left on device")

    def disk_full_direct(fd: int, data: memoryview, offset: int) -> int:
        real_pwrite(fd, data[:8192], offset)  # whole blocks, as direct I/O writes them
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(segments_module.os, "pwritev", disk_full_buffered)
    monkeypatch.setattr(segments_module.os, "pwrite", disk_full_direct)
    results = store.put_many([blob(2), blob(3)])
    assert all(isinstance(r, BlobStoreError) and "No space left" in str(r) for r in results)
    monkeypatch.setattr(segments_module.os, "pwritev", real_pwritev)
    monkeypatch.setattr(segments_module.os, "pwrite", real_pwrite)
    assert early_reader.get(hashlib.sha256(blob(2)).hexdigest()) == blob(
        2
    )  # complete, though not acknowledged
    # Nothing is appended behind the partial record: later blobs go to a new segment, and offsets a reader
    # has seen are never written again.
    after = store.put(blob(4))
    again = store.put(blob(2))
    assert len(files(store, ".seg")) == 2
    for reader in (early_reader, SegmentBlobStore(tmp_path)):
        assert reader.get(kept) == blob(1) and reader.get(after) == blob(4) and reader.get(again) == blob(2)
    with pytest.raises(NotFound):
        SegmentBlobStore(tmp_path).get(hashlib.sha256(blob(3)).hexdigest())


def test_a_failed_sync_fails_the_put(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(segments_module.os, "fdatasync", broken)
    with pytest.raises(BlobStoreError, match="Input/output error"):
        SegmentBlobStore(tmp_path).put(blob(1))


def test_delete_erases_every_copy_and_loose_files(tmp_path: Path) -> None:
    data = blob(7)
    key = hashlib.sha256(data).hexdigest()
    first = SegmentBlobStore(tmp_path, segment_max_bytes=1 << 20)
    first.put(data)
    first.close()  # one copy in a sealed segment
    second = SegmentBlobStore(tmp_path)
    second._unsealed.clear()
    second.put_many([data])  # and another in an unsealed one (a concurrent writer would do this)
    assert len(files(second, ".seg")) == 2
    LocalBlobStore(tmp_path).put(data)  # and a loose file of the older layout
    second.delete(key)
    assert not second.exists(key) and not SegmentBlobStore(tmp_path).exists(key)
    for segment in files(second, ".seg"):
        assert data[:64] not in segment.read_bytes()
    assert not LocalBlobStore(tmp_path).exists(key)
    assert second.put(data) == key and second.get(key) == data  # stored again after a delete


def test_a_corrupt_record_is_never_returned(tmp_path: Path) -> None:
    store = SegmentBlobStore(tmp_path)
    key = store.put(blob(1))
    [segment] = files(store, ".seg")
    raw = bytearray(segment.read_bytes())
    raw[store._unsealed[bytes.fromhex(key)].offset + 44 + 100] ^= 0xFF  # a byte of the blob
    segment.write_bytes(bytes(raw))
    with pytest.raises(NotFound):
        SegmentBlobStore(tmp_path).get(key)


def test_reads_blobs_of_the_file_per_blob_layout(tmp_path: Path) -> None:
    key = LocalBlobStore(tmp_path).put(blob(1))
    assert SegmentBlobStore(tmp_path).get(key) == blob(1)


def _put_in_child(store: SegmentBlobStore, seed: int) -> None:
    store.put(blob(seed))


def test_a_forked_child_writes_its_own_segment(tmp_path: Path) -> None:
    store = SegmentBlobStore(tmp_path)
    store.put(blob(1))
    child = multiprocessing.get_context("fork").Process(target=_put_in_child, args=(store, 2))
    child.start()
    child.join(60)
    assert child.exitcode == 0
    store.put(blob(3))
    assert len(files(store, ".seg")) == 2
    reader = SegmentBlobStore(tmp_path)
    assert [reader.get(hashlib.sha256(blob(s)).hexdigest()) for s in (1, 2, 3)] == [blob(1), blob(2), blob(3)]


def test_check(tmp_path: Path) -> None:
    SegmentBlobStore(tmp_path / "new").check()
    assert (tmp_path / "new" / "segments").is_dir()
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"")
    with pytest.raises(BlobStoreError):
        SegmentBlobStore(blocker).check()
    assert isinstance(SegmentBlobStore(blocker).put_many([b"x"])[0], BlobStoreError)


def test_after_a_failed_sync_the_segment_is_given_up_and_its_copies_written_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = SegmentBlobStore(tmp_path)
    real = os.fdatasync
    failing = [True]

    def flaky(fd: int) -> None:
        if failing and failing.pop():
            raise OSError(errno.EIO, "Input/output error")  # the kernel may have dropped the pages
        real(fd)

    monkeypatch.setattr(segments_module.os, "fdatasync", flaky)
    with pytest.raises(BlobStoreError, match="Input/output error"):
        store.put(blob(1))
    # The retry must not trust the copy whose sync failed (a second sync would "succeed"): it is written
    # again, to a new segment.
    key = store.put(blob(1))
    assert len(files(store, ".seg")) == 2
    location = store._unsealed[bytes.fromhex(key)]
    assert location.writer is not None and not location.writer.broken
    assert SegmentBlobStore(tmp_path).get(key) == blob(1)


def test_a_failed_seal_does_not_make_later_puts_of_its_blobs_fail(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = SegmentBlobStore(tmp_path)
    key = store.put(blob(1))

    def no_index(*args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store, "_write_index", no_index)
    store.close()
    assert files(store, ".idx") == []
    assert store.put_many([blob(1), blob(2)]) == [key, hashlib.sha256(blob(2)).hexdigest()]
    assert SegmentBlobStore(tmp_path).get(key) == blob(1)


def test_a_segment_whose_index_is_unusable_is_read_record_by_record(tmp_path: Path) -> None:
    store = SegmentBlobStore(tmp_path)
    keys = [store.put(blob(i)) for i in range(3)]
    store.close()
    [index] = files(store, ".idx")
    index.write_bytes(b"garbage")
    reader = SegmentBlobStore(tmp_path)
    assert [reader.get(k) for k in keys] == [blob(i) for i in range(3)]


def test_segments_appear_only_locked_and_dead_writers_temporary_files_are_removed(tmp_path: Path) -> None:
    directory = tmp_path / "segments"
    directory.mkdir()
    stale = directory / ".00000000000000000001-1-deadbeef.seg.tmp"
    stale.write_bytes(b"")
    an_hour_ago = time.time() - 3600
    os.utime(stale, (an_hour_ago, an_hour_ago))
    # A live writer's index being written: not locked, but fresh.
    in_progress = directory / ".00000000000000000002-2-cafebabe.idx.0123abcd.tmp"
    in_progress.write_bytes(b"")
    live = SegmentBlobStore(tmp_path)
    live.put(blob(1))  # its segment is created under a temporary name, locked, then renamed
    assert not stale.exists() and in_progress.exists()
    in_progress.unlink()
    assert [p.name for p in directory.iterdir() if p.name.startswith(".")] == []
    assert SegmentBlobStore(tmp_path).put(blob(2))
    assert files(live, ".idx") == [] and len(files(live, ".seg")) == 2  # the live writer's was left alone


def test_an_orphan_that_cannot_be_sealed_does_not_stop_writes(tmp_path: Path) -> None:
    script = (
        "import os, signal, sys\n"
        "from moderation.blobs import SegmentBlobStore\n"
        "SegmentBlobStore(sys.argv[1]).put(b'orphaned')\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=False, timeout=60)
    [orphan] = files(SegmentBlobStore(tmp_path), ".seg")
    orphan.with_suffix(".idx").mkdir()  # its index cannot be written
    store = SegmentBlobStore(tmp_path)
    key = store.put(blob(1))
    assert store.get(key) == blob(1) and store.get(hashlib.sha256(b"orphaned").hexdigest()) == b"orphaned"


def test_delete_erases_copies_in_several_unsealed_segments_and_a_later_put_stores_again(
    tmp_path: Path,
) -> None:
    data = blob(9)
    key = hashlib.sha256(data).hexdigest()
    first, second = SegmentBlobStore(tmp_path), SegmentBlobStore(tmp_path)
    first.put(data)
    second.put(data)  # two processes, two unsealed copies
    SegmentBlobStore(tmp_path).delete(key)  # a third process deletes
    for segment in files(first, ".seg"):
        assert data[:64] not in segment.read_bytes()
    assert not SegmentBlobStore(tmp_path).exists(key)
    assert first.put(data) == key  # its own copy is gone: written again, not trusted
    assert SegmentBlobStore(tmp_path).get(key) == data


def _close_in_child(store: SegmentBlobStore) -> None:
    store.close()


def test_a_forked_child_does_not_seal_its_parents_segment(tmp_path: Path) -> None:
    store = SegmentBlobStore(tmp_path)
    store.put(blob(1))
    child = multiprocessing.get_context("fork").Process(target=_close_in_child, args=(store,))
    child.start()
    child.join(60)
    assert child.exitcode == 0
    assert files(store, ".idx") == []
    later = store.put(blob(2))
    assert SegmentBlobStore(tmp_path).get(later) == blob(2)


@pytest.mark.direct_io_only
def test_direct_appends_are_block_aligned_and_padded_with_records_every_reader_skips(
    tmp_path: Path, io_mode: str
) -> None:
    store = SegmentBlobStore(tmp_path)
    sizes = [[blob(1)], [blob(2, 4096 - 88), blob(3, 10)], [blob(4, 70_000)]]
    keys = [store.put_many(batch) for batch in sizes]
    assert store._active is not None and store._active.direct
    assert fcntl.fcntl(store._active.fd, fcntl.F_GETFL) & os.O_DIRECT
    [segment] = files(store, ".seg")
    assert segment.stat().st_size % 4096 == 0
    assert segment.stat().st_size == segment_size(io_mode, *sizes)
    # The records a reader walks (the same walk as older versions'): the blobs, in order, no padding.
    with open(segment, "rb") as handle:
        walked = [digest.hex() for digest, _, _, _ in segments_module._read_records(handle.fileno(), 0)]
    assert walked == [key for batch in keys for key in batch]
    reader = SegmentBlobStore(tmp_path)
    assert [reader.get(str(k)) for batch in keys for k in batch] == [d for batch in sizes for d in batch]


@pytest.mark.direct_io_only
def test_an_append_larger_than_the_staging_buffer_is_written_in_steps(tmp_path: Path) -> None:
    store = SegmentBlobStore(tmp_path)
    store._direct = segments_module._DirectWriter(capacity=8192)
    data = [blob(1, 50_000), blob(2, 8192), blob(3, 1)]
    keys = store.put_many(data)
    store.close()
    assert [SegmentBlobStore(tmp_path).get(str(k)) for k in keys] == data


@pytest.mark.direct_io_only
def test_a_filesystem_without_direct_io_is_written_through_the_page_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = fcntl.fcntl

    def no_direct_io(fd: int, command: int, arg: int = 0) -> int:
        if command == fcntl.F_SETFL and arg & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")  # as tmpfs answers
        return real(fd, command, arg)

    monkeypatch.setattr(segments_module.fcntl, "fcntl", no_direct_io)
    store = SegmentBlobStore(tmp_path)
    key = store.put(blob(1))
    assert store.direct_io is False and store._active is not None and not store._active.direct
    assert files(store, ".seg")[0].stat().st_size == 44 + 5000
    assert SegmentBlobStore(tmp_path).get(key) == blob(1)


@pytest.mark.direct_io_only
@pytest.mark.parametrize(
    ("short_by", "padded_size"),
    [
        (0, 8192),  # the record ends on a block boundary: no padding
        (1, 12288),  # too little room for a padding header: padding runs to the boundary after
        (43, 12288),
        (44, 8192),  # room for a padding header and no bytes
        (45, 8192),
    ],
)
def test_a_direct_append_is_padded_to_the_next_block_boundary(
    tmp_path: Path, short_by: int, padded_size: int
) -> None:
    store = SegmentBlobStore(tmp_path)
    first = blob(1, 4096 - 44 - short_by)  # after the first block, its record ends short_by bytes short
    second = blob(2, 100)
    keys = store.put_many([first]) + store.put_many([second])
    [segment] = files(store, ".seg")
    assert segment.stat().st_size == padded_size + 4096
    with open(segment, "rb") as handle:
        walked = [digest.hex() for digest, _, _, _ in segments_module._read_records(handle.fileno(), 0)]
    assert walked == keys
    assert [SegmentBlobStore(tmp_path).get(str(k)) for k in keys] == [first, second]


@pytest.mark.direct_io_only
def test_short_direct_writes_are_continued(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = SegmentBlobStore(tmp_path)
    store.put(blob(0))
    real = os.pwrite
    monkeypatch.setattr(segments_module.os, "pwrite", lambda fd, data, offset: real(fd, data[:4096], offset))
    data = [blob(1, 30_000), blob(2, 5)]
    keys = store.put_many(data)
    assert [SegmentBlobStore(tmp_path).get(str(k)) for k in keys] == data


@pytest.mark.direct_io_only
def test_a_failure_in_a_later_step_of_a_large_direct_append_fails_the_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = SegmentBlobStore(tmp_path)
    kept = store.put(blob(0))
    store._direct = segments_module._DirectWriter(capacity=8192)
    real = os.pwrite
    calls: list[int] = []

    def failing_second_step(fd: int, data: memoryview, offset: int) -> int:
        calls.append(offset)
        if len(calls) == 2:
            raise OSError(errno.EIO, "Input/output error")
        return real(fd, data, offset)

    monkeypatch.setattr(segments_module.os, "pwrite", failing_second_step)
    results = store.put_many([blob(1, 20_000)])
    assert len(calls) == 2 and isinstance(results[0], BlobStoreError)
    monkeypatch.setattr(segments_module.os, "pwrite", real)
    after = store.put(blob(2))
    assert len(files(store, ".seg")) == 2  # nothing more goes behind the failed append
    reader = SegmentBlobStore(tmp_path)
    assert reader.get(kept) == blob(0) and reader.get(after) == blob(2)
    with pytest.raises(NotFound):
        reader.get(hashlib.sha256(blob(1, 20_000)).hexdigest())


def test_after_a_failed_sync_the_process_reads_its_durable_blobs_and_leaks_no_descriptor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = SegmentBlobStore(tmp_path)
    durable = store.put(blob(1))  # synced and answered before the failure
    real = os.fdatasync
    failing = [True]

    def flaky(fd: int) -> None:
        if failing and failing.pop():
            raise OSError(errno.EIO, "Input/output error")
        real(fd)

    monkeypatch.setattr(segments_module.os, "fdatasync", flaky)
    broken = store._active
    assert broken is not None
    with pytest.raises(BlobStoreError):
        store.put(blob(2))
    assert broken.closed  # its descriptor and lock are released: a later writer can seal it
    with pytest.raises(OSError):
        os.fstat(broken.fd)
    # This process reads the durable blob back from the segment it gave up (as another process would).
    assert store.get(durable) == blob(1)
    store.close()


def test_a_reader_finds_a_blob_stored_again_after_it_was_deleted(tmp_path: Path) -> None:
    data = blob(7)
    key = hashlib.sha256(data).hexdigest()
    writer, reader = SegmentBlobStore(tmp_path), SegmentBlobStore(tmp_path)
    writer.put(data)
    assert reader.get(key) == data  # the reader now knows where the copy lies
    SegmentBlobStore(tmp_path).delete(key)
    other = SegmentBlobStore(tmp_path)
    other.put(data)  # stored again, in another process's segment
    assert reader.get(key) == data


def test_the_first_segment_makes_the_new_folders_entries_durable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[Path] = []
    real = segments_module.fsync_directory

    def recording(path: Path) -> None:
        synced.append(Path(path))
        real(path)

    monkeypatch.setattr(segments_module, "fsync_directory", recording)
    monkeypatch.setattr("moderation.blobs.store.fsync_directory", recording)
    root = tmp_path / "new" / "blobs"
    SegmentBlobStore(root).put(blob(1))
    # blobs/ is created in new/, new/ in tmp_path, segments/ in blobs/: each parent is synced.
    assert {tmp_path, tmp_path / "new", root} <= set(synced)


def _can_punch_holes(folder: Path) -> bool:
    """Whether this filesystem frees punched blocks, asked of util-linux's fallocate (not our own binding)."""
    tool = shutil.which("fallocate")
    if tool is None:
        return False
    probe = folder / "probe"
    probe.write_bytes(os.urandom(1 << 20))
    try:
        os.sync()
        before = probe.stat().st_blocks
        done = subprocess.run([tool, "--punch-hole", "--offset", "0", "--length", str(1 << 20), str(probe)])
        return done.returncode == 0 and probe.stat().st_blocks < before
    finally:
        probe.unlink()


def test_delete_gives_the_blobs_disk_space_back(tmp_path: Path) -> None:
    if not _can_punch_holes(tmp_path):
        pytest.skip("this filesystem cannot punch holes; deletes overwrite with zeros there")
    store = SegmentBlobStore(tmp_path)
    kept, erased = os.urandom(300_000), os.urandom(2_000_000)
    keys = store.put_many([kept, erased])
    [segment] = files(store, ".seg")
    before = segment.stat()
    store.delete(str(keys[1]))
    after = segment.stat()
    assert after.st_blocks * 512 <= before.st_blocks * 512 - 1_900_000
    assert after.st_size == before.st_size  # offsets of the other records stay valid
    assert store.get(str(keys[0])) == kept and SegmentBlobStore(tmp_path).get(str(keys[0])) == kept
    assert not store.exists(str(keys[1]))
    assert erased[:64] not in segment.read_bytes()


def test_delete_overwrites_with_zeros_where_holes_cannot_be_punched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(segments_module, "_fallocate", None)
    store = SegmentBlobStore(tmp_path)
    data = os.urandom(100_000)
    key = store.put(data)
    store.delete(key)
    [segment] = files(store, ".seg")
    assert data[:64] not in segment.read_bytes() and data[-64:] not in segment.read_bytes()
    assert not SegmentBlobStore(tmp_path).exists(key)
