"""A local blob store that appends blobs to segment files, so one data sync makes a whole batch durable.

Creating, syncing and renaming a file per image (and syncing its folder) costs this kind of machine 0.6 to
1.5 ms of kernel time per image; appending to an open file and syncing it once for every blob written
meanwhile costs about 0.1 ms. Layout under ``root/segments``:

* ``<name>.seg``: records, each a header (magic, length, SHA-256 digest) followed by the blob's bytes.
  Every writing process appends to its own segment, which it holds an exclusive ``flock`` on, and never
  appends to a segment it did not create.
* ``<name>.idx``: written when a segment is sealed (full, its writer closed, or found orphaned by a later
  writer): the segment's records sorted by digest, looked up by binary search with positioned reads, and a
  Bloom filter of their digests that readers keep in memory, so that only segments that may hold a digest
  are searched.

Readers keep an in-memory index of unsealed segments, read incrementally from their records, and refresh
it (and the list of sealed segments) when a digest is not found. Loose files of the one-file-per-blob
layout (``LocalBlobStore``) in the same root are still read and deleted. Deleting a blob overwrites its
bytes with zeros, then marks its record deleted, in every segment that holds it.

A segment that meets a write or sync error is abandoned: nothing more is appended to it (no offset is ever
reused), and the copies it holds no longer count as stored for later puts.

Appends bypass the page cache (``O_DIRECT``) where the filesystem allows it. Intake writes each image once
and the GPU worker reads it back once, often on another machine. Through the page cache, every append
copies the image into newly allocated cache pages: on the benchmark's virtual machine that copy grew from a
few percent of the CPU to a fifth of it once a few GB had been written, and intake's sustained rate fell by
30%. Direct writes must be aligned to the block size, so each append is staged in an aligned buffer and
ends with a padding record up to the next 4 KiB boundary (a deleted record of zeros, which every reader,
older versions included, already skips): about 2 KiB per append, 0.4% of a batch of four 140 KB images.
On a filesystem without direct I/O appends go through the page cache.

Deleting a blob punches a hole over its bytes where the filesystem can, so the space of erased images goes
back to the filesystem without rewriting segments; elsewhere the bytes are overwritten with zeros.
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import functools
import hashlib
import logging
import mmap
import os
import secrets
import struct
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

from moderation.blobs.store import (
    BlobStore,
    BlobStoreError,
    LocalBlobStore,
    fsync_directory,
    make_dirs,
    normalize_sha256,
)
from moderation.errors import NotFound

logger = logging.getLogger(__name__)

_RECORD = struct.Struct(">4sQ32s")  # magic, length of the blob, SHA-256 digest
_LIVE = b"MBR1"
_DELETED = b"MBRX"
_INDEX_HEADER = struct.Struct(">4sQ")  # magic, number of entries
_INDEX_ENTRY = struct.Struct(">32sQQ")  # digest, offset of the record, length of the blob
_INDEX_MAGIC = b"MBI2"  # entries, then a Bloom filter of their digests
_INDEX_MAGIC_V1 = b"MBI1"  # entries only (indexes sealed before the filter existed)
_FILTER_LENGTH = struct.Struct(">Q")  # bytes of the Bloom filter, after the entries
_FILTER_BITS_PER_ENTRY = 10
_FILTER_PROBES = 7  # ~0.8% false positives at 10 bits per entry
_SEGMENT_SUFFIX = ".seg"
_INDEX_SUFFIX = ".idx"
_TEMP_SUFFIX = ".tmp"
#: Age after which a temporary file nobody holds is taken for one a dead writer left.
_ORPHAN_TEMP_AGE_SECONDS = 600
# writev takes at most IOV_MAX (1024 on Linux) buffers per call.
_MAX_BUFFERS = 1024
_ZEROS = bytes(1024 * 1024)
# Direct I/O offsets, lengths and buffers are multiples of this (the largest logical block size in use).
_ALIGNMENT = 4096
_STAGING_BYTES = 4 * 1024 * 1024  # a direct append larger than this is written in several steps
_PADDING_DIGEST = bytes(32)
# Deleting a blob punches a hole over its bytes (ext4, XFS, btrfs, tmpfs): they read as zeros afterwards and
# their blocks go back to the filesystem, so erased images stop taking disk space.
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_NO_PUNCH_HOLE = frozenset({errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL})


def _load_fallocate() -> Callable[[int, int, int, int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        function = libc.fallocate
    except (OSError, AttributeError):  # not Linux, or no such libc function
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    function.restype = ctypes.c_int
    return cast(Callable[[int, int, int, int], int], function)


_fallocate = _load_fallocate()
# What a filesystem without direct I/O answers (tmpfs before Linux 6.6, some network filesystems).
_NO_DIRECT_IO = frozenset({errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP})


@dataclass
class _Segment:
    """A segment this process appends to, and how much of it is durable."""

    name: str
    fd: int
    pid: int
    size: int = 0
    written: int = 0  # appends so far (a sequence number per append)
    synced: int = 0  # appends made durable
    records: list[tuple[bytes, int, int]] = field(default_factory=list)  # (digest, offset, length)
    sync_lock: threading.Lock = field(default_factory=threading.Lock)
    closed: bool = False
    broken: bool = False  # a write or sync failed: nothing more is appended, its copies do not count
    direct: bool = False  # opened with O_DIRECT: every append is aligned and padded


@dataclass(frozen=True)
class _Location:
    """Where a record lies; ``sequence`` is the append that wrote it, when this process wrote it."""

    segment: str
    offset: int
    length: int
    writer: _Segment | None = None
    sequence: int = 0


def _filter_positions(digest: bytes, bits: int) -> list[int]:
    """The filter's bits for a digest: SHA-256 is uniform, so its own 4-byte slices serve as the hashes."""
    return [int.from_bytes(digest[4 * i : 4 * i + 4], "big") % bits for i in range(_FILTER_PROBES)]


def _bloom_filter(digests: Sequence[bytes]) -> bytes:
    """A Bloom filter of ``digests`` (at least one byte)."""
    bits = max(8, len(digests) * _FILTER_BITS_PER_ENTRY)
    array = bytearray((bits + 7) // 8)
    bits = len(array) * 8
    for digest in digests:
        for position in _filter_positions(digest, bits):
            array[position >> 3] |= 1 << (position & 7)
    return bytes(array)


class _SealedIndex:
    """The sorted index file of a sealed segment, binary-searched with positioned reads (no file kept open).

    Its Bloom filter is kept in memory (10 bits per blob), so a lookup opens only the indexes that may hold
    the digest: with many sealed segments, a read costs one binary search instead of one per segment.
    """

    def __init__(self, name: str, path: Path) -> None:
        self.name = name
        self.path = path
        self.filter: bytes | None = None
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            header = handle.read(_INDEX_HEADER.size)
            if len(header) < _INDEX_HEADER.size:
                raise ValueError("index file is shorter than its header")
            magic, count = _INDEX_HEADER.unpack(header)
            entries_end = _INDEX_HEADER.size + count * _INDEX_ENTRY.size
            if magic == _INDEX_MAGIC_V1:
                if size != entries_end:
                    raise ValueError("index file is malformed")
            elif magic == _INDEX_MAGIC:
                handle.seek(entries_end)
                raw = handle.read(_FILTER_LENGTH.size)
                (length,) = _FILTER_LENGTH.unpack(raw) if len(raw) == _FILTER_LENGTH.size else (0,)
                if length == 0 or size != entries_end + _FILTER_LENGTH.size + length:
                    raise ValueError("index file is malformed")
                self.filter = handle.read(length)
            else:
                raise ValueError("index file is malformed")
        self.count = count

    def may_hold(self, digest: bytes) -> bool:
        """False only if this segment certainly holds no record of the digest."""
        if self.filter is None:
            return True
        array = self.filter
        return all(array[p >> 3] & (1 << (p & 7)) for p in _filter_positions(digest, len(array) * 8))

    def find(self, digest: bytes) -> list[_Location]:
        """Every record of this segment with this digest."""
        if not self.may_hold(digest):
            return []
        fd = os.open(self.path, os.O_RDONLY)
        try:

            def entry(position: int) -> tuple[bytes, int, int]:
                raw = os.pread(fd, _INDEX_ENTRY.size, _INDEX_HEADER.size + position * _INDEX_ENTRY.size)
                found: tuple[bytes, int, int] = _INDEX_ENTRY.unpack(raw)
                return found

            position = bisect.bisect_left(range(self.count), digest, key=lambda i: entry(i)[0])
            found: list[_Location] = []
            while position < self.count:
                key, offset, length = entry(position)
                if key != digest:
                    break
                found.append(_Location(self.name, offset, length))
                position += 1
            return found
        finally:
            os.close(fd)


def _write_fully_at(fd: int, buffers: Sequence[bytes], offset: int) -> None:
    """Write every buffer at ``offset`` on (short writes continued)."""
    pending = [memoryview(buffer) for buffer in buffers if buffer]
    while pending:
        written = os.pwritev(fd, pending[:_MAX_BUFFERS], offset)
        if written <= 0:
            raise OSError(errno.EIO, "a write made no progress")
        offset += written
        while written and pending:
            if written >= len(pending[0]):
                written -= len(pending[0])
                pending.pop(0)
            else:
                pending[0] = pending[0][written:]
                written = 0


def _padding_record(position: int) -> bytes:
    """A deleted record of zeros from ``position`` to the next block boundary (nothing if it is one)."""
    gap = -position % _ALIGNMENT
    if gap == 0:
        return b""
    if gap < _RECORD.size:  # too short for a record header: pad to the boundary after it
        gap += _ALIGNMENT
    return _RECORD.pack(_DELETED, gap - _RECORD.size, _PADDING_DIGEST) + bytes(gap - _RECORD.size)


class _DirectWriter:
    """Stages appends in an aligned buffer and writes them with direct I/O, block-aligned and padded."""

    def __init__(self, capacity: int = _STAGING_BYTES) -> None:
        self.capacity = capacity
        self._buffer: mmap.mmap | None = None  # anonymous maps are page-aligned

    def write(self, fd: int, buffers: Sequence[bytes], offset: int) -> int:
        """Write the buffers and a padding record at the block-aligned ``offset``; the bytes written."""
        if self._buffer is None:
            self._buffer = mmap.mmap(-1, self.capacity, flags=mmap.MAP_PRIVATE)
        staging = self._buffer
        filled = 0
        start = offset
        size = sum(len(buffer) for buffer in buffers)
        for buffer in [*buffers, _padding_record(offset + size)]:
            source = memoryview(buffer)
            while source:
                count = min(len(source), self.capacity - filled)
                staging[filled : filled + count] = source[:count]
                filled += count
                source = source[count:]
                if filled == self.capacity:
                    offset = self._flush(fd, filled, offset)
                    filled = 0
        if filled:
            offset = self._flush(fd, filled, offset)
        return offset - start

    def _flush(self, fd: int, length: int, offset: int) -> int:
        """Write the first ``length`` bytes of the staging buffer at ``offset``; the offset after them."""
        assert self._buffer is not None
        with memoryview(self._buffer) as view:
            written = 0
            while written < length:
                count = os.pwrite(fd, view[written:length], offset + written)
                if count <= 0 or count % _ALIGNMENT:  # the rest cannot be written aligned: give up on it
                    raise OSError(errno.EIO, "short direct write")
                written += count
        return offset + length

    def close(self) -> None:
        """Drop the staging buffer (it is unmapped once nothing refers to it)."""
        self._buffer = None


def _reset_after_fork(reference: weakref.ref[SegmentBlobStore]) -> None:
    store = reference()
    if store is not None:
        store._after_fork()


class SegmentBlobStore(BlobStore):
    """Blobs appended to per-process segment files; concurrent puts share one data sync (group commit)."""

    def __init__(
        self, root: Path, fsync: bool = True, segment_max_bytes: int = 1 << 30, direct_io: bool = True
    ) -> None:
        self.root = Path(root)
        self.directory = self.root / "segments"
        self.fsync = fsync
        self.segment_max_bytes = segment_max_bytes
        self.direct_io = direct_io and hasattr(os, "O_DIRECT")
        self._direct = _DirectWriter()
        self.loose = LocalBlobStore(self.root, fsync=fsync)
        self._append_lock = threading.Lock()
        self._active: _Segment | None = None
        self._orphans_sealed = False
        self._index_lock = threading.Lock()
        self._unsealed: dict[bytes, _Location] = {}
        self._scanned: dict[str, int] = {}  # unsealed segment (of another process) -> bytes read so far
        self._sealed: dict[str, _SealedIndex] = {}
        os.register_at_fork(after_in_child=functools.partial(_reset_after_fork, weakref.ref(self)))

    def _after_fork(self) -> None:
        """In a forked child: forget the parent's segment (its file and lock stay the parent's) and locks."""
        active = self._active
        if active is not None:
            with contextlib.suppress(OSError):
                os.close(active.fd)  # the parent's flock lives on in its own descriptor
        self._active = None
        self._append_lock = threading.Lock()
        self._index_lock = threading.Lock()
        self._unsealed = {}
        self._scanned = {}
        self._direct = _DirectWriter()

    # -- writing --------------------------------------------------------------------------------------

    def put(self, data: bytes) -> str:
        """Store ``data`` unless this process already holds a durable copy; its SHA-256 hex digest."""
        return self._put_through_many(data)

    def put_many(self, blobs: Sequence[bytes]) -> list[str | BlobStoreError]:
        """Append the blobs not stored yet to this process's segment and make them durable in one sync."""
        digests = [hashlib.sha256(data).digest() for data in blobs]
        results: list[str | BlobStoreError] = [digest.hex() for digest in digests]
        waits: list[_Location] = []
        try:
            with self._append_lock:
                segment, sequence = self._append(blobs, digests, waits)
        except OSError as exc:
            error = BlobStoreError(f"could not write blobs: {exc.strerror or exc}")
            return [error] * len(blobs)
        if segment is not None:
            waits.append(_Location(segment.name, 0, 0, segment, sequence))
        failed: BlobStoreError | None = None
        for location in waits:
            assert location.writer is not None
            try:
                self._sync(location.writer, location.sequence)
            except OSError as exc:
                failed = BlobStoreError(f"could not sync blobs: {exc.strerror or exc}")
                break
        # The appender that filled a segment seals it, even when a sync this put waited for failed.
        if segment is not None and segment.size >= self.segment_max_bytes and not segment.broken:
            self._retire(segment)
        return [failed] * len(blobs) if failed is not None else results

    def _known_copy(self, digest: bytes) -> _Location | None:
        """A copy this process wrote to a segment that is still sound and whose record is still live."""
        known = self._unsealed.get(digest)
        # Another process's copy may not be durable yet, and a broken segment's may never be.
        if known is None or known.writer is None or known.writer.broken:
            return None
        if known.writer.closed or known.writer.synced >= known.sequence:
            # Durable: still count it only if no other process has deleted it since.
            return known if self._is_live(known, digest) else None
        return known

    def _append(
        self, blobs: Sequence[bytes], digests: Sequence[bytes], waits: list[_Location]
    ) -> tuple[_Segment | None, int]:
        """Append the new blobs (under the append lock); the segment and this append's sequence number."""
        new: dict[bytes, bytes] = {}
        for data, digest in zip(blobs, digests, strict=True):
            if digest in new:
                continue
            known = self._known_copy(digest)
            if known is not None:
                waits.append(known)  # maybe not synced yet: this put waits for its sync
            else:
                new[digest] = data
        if not new:
            return None, 0
        segment = self._active
        if segment is None or segment.broken:
            segment = self._open_segment()
        buffers: list[bytes] = []
        records: list[tuple[bytes, int, int]] = []
        offset = segment.size
        for digest, data in new.items():
            buffers += (_RECORD.pack(_LIVE, len(data), digest), data)
            records.append((digest, offset, len(data)))
            offset += _RECORD.size + len(data)
        try:
            if segment.direct:
                offset = segment.size + self._direct.write(segment.fd, buffers, segment.size)
            else:
                _write_fully_at(segment.fd, buffers, segment.size)
        except OSError:
            # Part of the batch may be in the file: nothing more goes behind it, so no offset a reader has
            # seen is ever written again.
            self._active = None
            self._abandon(segment)
            raise
        segment.size = offset
        sequence = segment.written = segment.written + 1
        with self._index_lock:
            segment.records += records
            for digest, start, length in records:
                self._unsealed[digest] = _Location(segment.name, start, length, segment, sequence)
        if segment.size >= self.segment_max_bytes:
            self._active = None  # the appender that filled it seals it once its own sync is done
        return segment, sequence

    def _open_segment(self) -> _Segment:
        """Create this process's next segment (sealing orphans of dead writers first) and make it active.

        The file is created and locked under a temporary name, then renamed: a segment is never visible
        unlocked, so a writer sealing orphans cannot take a new one for a dead writer's.
        """
        if not self._orphans_sealed:
            # This process's first segment: the folders, maybe just created, made durable; orphans sealed.
            make_dirs(self.directory, fsync=self.fsync)
            try:
                self._seal_orphans()
            finally:
                self._orphans_sealed = True
        else:
            self.directory.mkdir(parents=True, exist_ok=True)
        name = f"{time.time_ns():020d}-{os.getpid()}-{secrets.token_hex(4)}"
        temporary = self.directory / f".{name}{_SEGMENT_SUFFIX}{_TEMP_SUFFIX}"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            size = self._start_direct(fd) if self.direct_io else 0
            os.rename(temporary, self.directory / f"{name}{_SEGMENT_SUFFIX}")
            if self.fsync:
                fsync_directory(self.directory)
        except OSError:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
        segment = _Segment(name, fd, os.getpid(), size=size, direct=size > 0)
        self._active = segment
        return segment

    def _start_direct(self, fd: int) -> int:
        """Switch a new segment to direct I/O and write its first block (a padding record); 0 if unsupported."""
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        try:
            fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_DIRECT)
            # The first block, padding, doubles as the probe: some filesystems take the flag, not the write.
            first_block = _RECORD.pack(_DELETED, _ALIGNMENT - _RECORD.size, _PADDING_DIGEST)
            return self._direct.write(fd, [first_block, bytes(_ALIGNMENT - _RECORD.size)], 0)
        except OSError as exc:
            if exc.errno not in _NO_DIRECT_IO:
                raise
        # The filesystem refuses direct I/O: use the page cache.
        fcntl.fcntl(fd, fcntl.F_SETFL, flags)
        logger.info("blob segments in %s are written through the page cache (no direct I/O)", self.directory)
        self.direct_io = False
        return 0

    def _sync(self, segment: _Segment, sequence: int) -> None:
        """Return once the append ``sequence`` of ``segment`` is durable; one sync covers all before it."""
        if segment.synced >= sequence:
            return
        with segment.sync_lock:
            if segment.synced >= sequence:
                return
            if segment.broken or segment.closed:
                raise OSError(f"blob segment {segment.name} failed before this write was made durable")
            target = segment.written
            try:
                if self.fsync:
                    os.fdatasync(segment.fd)
            except OSError:
                # After a failed sync the kernel may have dropped the pages while a later sync succeeds:
                # nothing written to this file since its last good sync can be trusted. The segment takes
                # no more appends; closing it releases its lock, so a later writer seals what it holds,
                # and this process reads it back like another's (every read checks its digest).
                self._give_up(segment)
                raise
            segment.synced = target

    def _forget(self, segment: _Segment) -> None:
        """Mark a segment broken (under its sync lock): no more appends, and its copies no longer count."""
        segment.broken = True
        with self._index_lock:
            for digest, _, _ in segment.records:
                known = self._unsealed.get(digest)
                if known is not None and known.writer is segment:
                    del self._unsealed[digest]

    def _abandon(self, segment: _Segment) -> None:
        """Stop using a segment that failed; a later writer seals what it holds intact."""
        with segment.sync_lock:
            self._give_up(segment)

    def _give_up(self, segment: _Segment) -> None:
        """``_abandon`` for a caller already holding the segment's sync lock."""
        self._forget(segment)
        if not segment.closed:
            segment.closed = True
            os.close(segment.fd)  # releases the flock

    def _retire(self, segment: _Segment) -> None:
        """Seal a full segment: every append durable, its index written, its file closed."""
        with segment.sync_lock:
            if segment.closed:
                return
            try:
                if self.fsync:
                    os.fdatasync(segment.fd)
                segment.synced = segment.written
                self._write_index(segment.name, segment.records)
            except OSError:
                logger.exception("could not seal blob segment %s; a later writer seals it", segment.name)
                self._forget(segment)
                return
            finally:
                segment.closed = True
                os.close(segment.fd)  # releases the flock
        self._adopt_index(segment.name)

    def close(self) -> None:
        """Seal this process's active segment."""
        with self._append_lock:
            segment, self._active = self._active, None
            self._direct.close()
        if segment is not None and not segment.broken:
            self._retire(segment)

    def _write_index(self, name: str, records: Sequence[tuple[bytes, int, int]]) -> None:
        entries = sorted(records)
        path = self.directory / f"{name}{_INDEX_SUFFIX}"
        temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}{_TEMP_SUFFIX}")
        try:
            with open(temporary, "wb") as handle:
                handle.write(_INDEX_HEADER.pack(_INDEX_MAGIC, len(entries)))
                handle.writelines(_INDEX_ENTRY.pack(*entry) for entry in entries)
                bloom = _bloom_filter([digest for digest, _, _ in entries])
                handle.write(_FILTER_LENGTH.pack(len(bloom)))
                handle.write(bloom)
                handle.flush()
                if self.fsync:
                    os.fsync(handle.fileno())
            os.replace(temporary, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
        if self.fsync:
            fsync_directory(self.directory)

    def _seal_orphans(self) -> None:
        """Index the segments whose writers are gone (no lock held on them); drop empty and temporary ones.

        Runs once per process, before its first segment; a segment that cannot be sealed is logged and
        left for the next writer.
        """
        try:
            entries = os.listdir(self.directory)
        except OSError:
            logger.exception("could not list blob segments to seal orphans")
            return
        for entry in entries:
            if entry.startswith(".") and entry.endswith(_TEMP_SUFFIX):
                self._remove_unlocked(self.directory / entry)
        for name in self._names(entries)[1]:
            try:
                self._seal_orphan(name)
            except OSError:
                logger.exception("could not seal orphaned blob segment %s; a later writer tries again", name)

    def _remove_unlocked(self, path: Path) -> None:
        """Remove a temporary file no live process holds (one a writer died with)."""
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return
        try:
            # A live writer's temporary file is not always locked (an index being written never is, a new
            # segment not until just after it is created), and it lives for milliseconds: only an old one
            # is a dead writer's.
            if time.time() - os.fstat(fd).st_mtime < _ORPHAN_TEMP_AGE_SECONDS:
                return
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            path.unlink(missing_ok=True)
        except OSError:
            pass  # held by a live process
        finally:
            os.close(fd)

    def _seal_orphan(self, name: str) -> None:
        path = self.directory / f"{name}{_SEGMENT_SUFFIX}"
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return  # a live writer's
            if (self.directory / f"{name}{_INDEX_SUFFIX}").exists():
                return  # sealed meanwhile by another process
            records = [(digest, offset, length) for digest, offset, length, _ in _read_records(fd, 0)]
            if records:
                if self.fsync:
                    os.fsync(fd)  # its writer may have died between an append and its sync
                self._write_index(name, records)
                logger.info("sealed blob segment %s of a writer that is gone (%d blobs)", name, len(records))
            else:
                path.unlink(missing_ok=True)
        finally:
            os.close(fd)

    # -- reading --------------------------------------------------------------------------------------

    @staticmethod
    def _names(entries: Sequence[str]) -> tuple[list[str], list[str]]:
        """Sealed and unsealed segment names in one listing of the folder, newest first."""
        sealed = {e[: -len(_INDEX_SUFFIX)] for e in entries if e.endswith(_INDEX_SUFFIX) and e[0] != "."}
        segments = {
            e[: -len(_SEGMENT_SUFFIX)] for e in entries if e.endswith(_SEGMENT_SUFFIX) and e[0] != "."
        }
        return sorted(sealed & segments, reverse=True), sorted(segments - sealed, reverse=True)

    def _adopt_index(self, name: str) -> bool:
        """Use a sealed segment's index file instead of its records in memory; False if it is unusable."""
        try:
            index = _SealedIndex(name, self.directory / f"{name}{_INDEX_SUFFIX}")
        except (OSError, ValueError) as exc:
            logger.warning("blob segment index %s is unusable (%s); its records are read instead", name, exc)
            return False
        with self._index_lock:
            self._sealed[name] = index
            self._sealed = dict(sorted(self._sealed.items(), reverse=True))
            self._scanned.pop(name, None)
            for digest in [d for d, location in self._unsealed.items() if location.segment == name]:
                del self._unsealed[digest]
        return True

    def _refresh(self) -> None:
        """Learn of segments sealed since, and of records appended by other processes."""
        try:
            entries = os.listdir(self.directory)
        except FileNotFoundError:
            return
        sealed, unsealed = self._names(entries)
        # A segment whose index cannot be used is read record by record, as an unsealed one.
        unreadable = [name for name in sealed if name not in self._sealed and not self._adopt_index(name)]
        active = self._active
        for name in [*unsealed, *unreadable]:
            if active is not None and active.name == name and not active.broken:
                continue  # this process's own appends are known without reading them back
            self._scan(name)

    def _scan(self, name: str) -> None:
        """Read the records appended to an unsealed segment since it was last read."""
        start = self._scanned.get(name, 0)
        try:
            fd = os.open(self.directory / f"{name}{_SEGMENT_SUFFIX}", os.O_RDONLY)
        except FileNotFoundError:
            return
        try:
            found = list(_read_records(fd, start))
        finally:
            os.close(fd)
        with self._index_lock:
            for digest, offset, length, end in found:
                self._unsealed.setdefault(digest, _Location(name, offset, length))
                self._scanned[name] = end

    def _locations(self, digest: bytes) -> Iterator[_Location]:
        """Where copies of the blob lie: known unsealed ones first, then sealed segments, newest first."""
        with self._index_lock:
            known = self._unsealed.get(digest)
            sealed = list(self._sealed.values())
        if known is not None:
            yield known
        for index in sealed:
            yield from index.find(digest)

    def _is_live(self, location: _Location, digest: bytes) -> bool:
        """Whether the record at ``location`` is still a live copy of the blob (one positioned read)."""
        try:
            fd = os.open(self.directory / f"{location.segment}{_SEGMENT_SUFFIX}", os.O_RDONLY)
        except OSError:
            return False
        try:
            return _live_record_at(fd, location, digest)
        except OSError:
            return False
        finally:
            os.close(fd)

    def _read(self, location: _Location, digest: bytes) -> bytes | None:
        """The blob at ``location`` if its record is live and intact, else None."""
        path = self.directory / f"{location.segment}{_SEGMENT_SUFFIX}"
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            if not _live_record_at(fd, location, digest):
                return None
            data = os.pread(fd, location.length, location.offset + _RECORD.size)
        finally:
            os.close(fd)
        if len(data) != location.length or hashlib.sha256(data).digest() != digest:
            logger.error("blob %s in segment %s is corrupt", digest.hex(), location.segment)
            return None
        return data

    def _find(self, digest: bytes) -> bytes | None:
        for attempt in range(2):
            if attempt:
                self._refresh()
            for location in self._locations(digest):
                data = self._read(location, digest)
                if data is not None:
                    return data
                with self._index_lock:
                    # A copy deleted since it was learnt of: forget it, so that the rescan can learn of a
                    # newer copy stored after the delete (a scan keeps the first location it knows).
                    if self._unsealed.get(digest) is location:
                        del self._unsealed[digest]
        return None

    def get(self, sha256: str) -> bytes:
        """The blob's bytes; NotFound when absent."""
        key = normalize_sha256(sha256)
        try:
            data = self._find(bytes.fromhex(key))
        except OSError as exc:
            raise BlobStoreError(f"could not read blob {key}: {exc.strerror or exc}") from exc
        if data is not None:
            return data
        return self.loose.get(key)

    def exists(self, sha256: str) -> bool:
        """Whether a live copy of the blob is stored."""
        try:
            self.get(sha256)
        except NotFound:
            return False
        return True

    def delete(self, sha256: str) -> None:
        """Erase every copy of the blob: its bytes overwritten with zeros, then its records marked deleted."""
        key = normalize_sha256(sha256)
        digest = bytes.fromhex(key)
        try:
            entries = os.listdir(self.directory)
        except FileNotFoundError:
            entries = []
        sealed, unsealed = self._names(entries)
        try:
            # Every unsealed segment is read whole: the in-memory index knows one copy per blob only.
            copies: list[_Location] = []
            for name in unsealed:
                copies += self._copies_in(name, digest)
            for name in sealed:
                try:
                    copies += _SealedIndex(name, self.directory / f"{name}{_INDEX_SUFFIX}").find(digest)
                except ValueError:
                    copies += self._copies_in(name, digest)
            for location in copies:
                self._erase(location, digest)
        except OSError as exc:
            raise BlobStoreError(f"could not delete blob {key}: {exc.strerror or exc}") from exc
        erased = {(location.segment, location.offset) for location in copies}
        with self._index_lock:
            known = self._unsealed.get(digest)
            if known is not None and (known.segment, known.offset) in erased:
                del self._unsealed[digest]
        self.loose.delete(key)  # raises BlobStoreError itself

    def _copies_in(self, name: str, digest: bytes) -> list[_Location]:
        """Every live record of the blob in segment ``name``, read record by record."""
        with open(self.directory / f"{name}{_SEGMENT_SUFFIX}", "rb") as handle:
            return [
                _Location(name, offset, length)
                for found, offset, length, _ in _read_records(handle.fileno(), 0)
                if found == digest
            ]

    def _erase(self, location: _Location, digest: bytes) -> None:
        # The bytes go first: a crash between the two steps leaves a live record of zeros (which fails its
        # digest check on read, and a later delete finds and marks), never unreachable image bytes.
        with self._append_lock:
            active = self._active
        if active is not None and active.name == location.segment:
            self._sync(active, active.written)
        fd = os.open(self.directory / f"{location.segment}{_SEGMENT_SUFFIX}", os.O_RDWR)
        try:
            header = os.pread(fd, _RECORD.size, location.offset)
            if len(header) < _RECORD.size or _RECORD.unpack(header)[2] != digest:
                return
            start = location.offset + _RECORD.size
            _zero_range(fd, start, start + location.length)
            os.fsync(fd)
            os.pwrite(fd, _RECORD.pack(_DELETED, location.length, digest), location.offset)
            os.fsync(fd)
        finally:
            os.close(fd)

    def check(self) -> None:
        """Create the segment folder if needed and prove it is writable with a probe file."""
        self.loose.check()
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            probe = self.directory / f".probe.{secrets.token_hex(4)}"
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as exc:
            raise BlobStoreError(f"blob segment directory {self.directory} is not usable: {exc}") from exc


def _punch_hole(fd: int, start: int, length: int) -> bool:
    """Deallocate ``[start, start + length)`` of a file, which then reads as zeros; False if unsupported."""
    if _fallocate is None:
        return False
    ctypes.set_errno(0)
    if _fallocate(fd, _FALLOC_FL_KEEP_SIZE | _FALLOC_FL_PUNCH_HOLE, start, length) == 0:
        return True
    code = ctypes.get_errno()
    if code in _NO_PUNCH_HOLE:
        return False
    raise OSError(code, os.strerror(code))


def _zero_range(fd: int, start: int, end: int) -> None:
    """Overwrite ``[start, end)`` with zeros, giving the disk space back where the filesystem can."""
    if _punch_hole(fd, start, end - start):
        return
    while start < end:
        start += os.pwrite(fd, _ZEROS[: min(len(_ZEROS), end - start)], start)


def _live_record_at(fd: int, location: _Location, digest: bytes) -> bool:
    """Whether the header at ``location`` in the open segment is a live record of this blob and length."""
    header = os.pread(fd, _RECORD.size, location.offset)
    return len(header) == _RECORD.size and _RECORD.unpack(header) == (_LIVE, location.length, digest)


def _read_records(fd: int, start: int) -> Iterator[tuple[bytes, int, int, int]]:
    """Complete records from ``start`` on: (digest, offset, length, end); stops at a partial or torn one."""
    size = os.fstat(fd).st_size
    offset = start
    while offset + _RECORD.size <= size:
        header = os.pread(fd, _RECORD.size, offset)
        if len(header) < _RECORD.size:
            return
        magic, length, digest = _RECORD.unpack(header)
        end = offset + _RECORD.size + length
        if magic not in (_LIVE, _DELETED) or end > size:
            return
        if magic == _LIVE:
            yield digest, offset, length, end
        offset = end
