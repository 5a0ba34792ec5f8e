"""Group commit for intake: submissions that arrive together are stored in one pass and one transaction."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import queue
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import TypeAlias

from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from moderation import metrics
from moderation.blobs import BlobStore
from moderation.config import Settings
from moderation.db import make_engine
from moderation.errors import ServiceUnavailable
from moderation.jobs import dispatch_all
from moderation.submissions.service import (
    IntakeResult,
    Outcome,
    PreparedSubmission,
    process_job,
    store_batch,
)
from moderation.threads import name_current_thread

logger = logging.getLogger(__name__)

#: Longest an intake writer keeps one session and its connection (a pool recycles its connections as often).
KEEP_SESSION_SECONDS = 1800.0
#: Key of ``Session.info`` that says the session's statements commit by themselves (no transaction to end).
AUTOCOMMIT = "moderation.autocommit"

_Answer: TypeAlias = "Future[IntakeResult] | asyncio.Future[IntakeResult]"
_Pending: TypeAlias = tuple[PreparedSubmission, _Answer]


class _LoopAnswers:
    """The intake answers awaited on one event loop: each delivered there, each failed once it is overdue.

    One timer, armed for the earliest deadline, serves every wait (a timer per request costs the loop more
    than the rest of the waiting). A deadline holds its future weakly, and waits that ended are dropped from
    the front as new ones come: an answered request leaves nothing behind (a failed one's error holds its
    image), and the heap holds about as many entries as there are requests in flight.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._deadlines: list[tuple[float, int, float, weakref.ref[asyncio.Future[IntakeResult]]]] = []
        self._count = itertools.count()  # keeps equal deadlines from comparing their futures
        # The timer and the deadline it was armed for (uvloop's handle of a due timer has no ``when``).
        self._timer: asyncio.Handle | None = None
        self._armed_for = 0.0

    def wait(self, future: asyncio.Future[IntakeResult], timeout: float) -> None:
        """Fail ``future`` with ServiceUnavailable if it has no answer within ``timeout`` seconds."""
        deadlines = self._deadlines
        while deadlines and _ended(deadlines[0][3]):
            heapq.heappop(deadlines)
        deadline = self.loop.time() + timeout
        heapq.heappush(deadlines, (deadline, next(self._count), timeout, weakref.ref(future)))
        if self._timer is None or deadline < self._armed_for:
            if self._timer is not None:
                self._timer.cancel()
            self._arm(deadline)

    def _arm(self, deadline: float) -> None:
        self._timer, self._armed_for = self.loop.call_at(deadline, self._expire), deadline

    def _expire(self) -> None:
        now = self.loop.time()
        deadlines = self._deadlines
        while deadlines and (deadlines[0][0] <= now or _ended(deadlines[0][3])):
            _, _, timeout, reference = heapq.heappop(deadlines)
            future = reference()
            if future is not None and not future.done():
                future.set_exception(
                    ServiceUnavailable(
                        f"the submission could not be stored within {timeout:g} s; it may still be: retry "
                        "with the same Idempotency-Key",
                        code="intake_timeout",
                    )
                )
        self._timer = None
        if deadlines:
            self._arm(deadlines[0][0])

    @staticmethod
    def deliver(answers: list[tuple[asyncio.Future[IntakeResult], Outcome]]) -> None:
        """Resolve each future with its outcome, unless it was failed or cancelled meanwhile (on the loop)."""
        for future, outcome in answers:
            if future.done():
                continue
            if isinstance(outcome, BaseException):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)


def intake_sessionmaker(settings: Settings) -> sessionmaker[Session]:
    """Sessions for an API process's intake writer, on a connection of its own.

    A batch's rows go in one INSERT, atomic by itself, so the connection runs in autocommit without a
    pre-ping: a batch costs one database round trip instead of four (ping, BEGIN, INSERT, COMMIT). A dead
    connection fails its batch's INSERT and is replaced; the writer then writes the batch again.
    """
    engine = make_engine(
        settings.database_url,
        pool_size=1,
        statement_timeout_seconds=settings.intake_timeout_seconds,
        autocommit=True,
        pre_ping=False,
    )
    return sessionmaker(bind=engine, expire_on_commit=False, info={AUTOCOMMIT: True})


class IntakeWriter:
    """Stores submissions in shared passes: one data sync for their images, one INSERT for their rows.

    One thread per process takes every submission handed over since its last pass, stores their images with
    one ``put_many`` (one data sync for the local store's segments, parallel uploads for S3) and writes their
    rows in one INSERT, one transaction (group commit). Batches grow with the load, since whatever arrives
    while a pass runs goes in the next one, and no timer waits: a lone submission is written at once. A
    caller's future resolves only after the commit that made its row, so no submission answered 202 can be
    lost.
    """

    def __init__(
        self,
        sessions: Callable[[], Session],
        blob_store: BlobStore,
        *,
        max_batch: int = 64,
        job_interval: float = 0.0,
        job_max_submissions: int = 64,
        name: str = "intake-writer",
    ) -> None:
        self.sessions = sessions
        self._session: Session | None = None  # kept between batches when its statements autocommit
        self._session_since = 0.0
        self.blob_store = blob_store
        self.max_batch = max_batch
        self.job_interval = job_interval
        self.job_max_submissions = job_max_submissions
        self._unsent: list[uuid.UUID] = []  # committed submissions whose GPU job is not sent yet
        self._last_sent = 0.0
        self._queue: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closed = False
        self._busy_since: float | None = None  # when the batch being stored was taken
        self._loop_answers: _LoopAnswers | None = None  # the deadlines of the loop that called last
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    @property
    def waiting(self) -> int:
        """Submissions handed over and waiting for the next pass."""
        return self._queue.qsize()

    @property
    def running(self) -> bool:
        """Whether the writer takes submissions (started, not closed, its thread alive)."""
        return not self._closed and self._thread.is_alive()

    @property
    def died(self) -> bool:
        """Whether the writer's thread ended without being closed (nothing stores submissions any more)."""
        return not self._closed and self._thread.ident is not None and not self._thread.is_alive()

    @property
    def busy_for(self) -> float:
        """Seconds the writer has spent on the batch it is working on now (0 when idle)."""
        since = self._busy_since
        return time.monotonic() - since if since is not None else 0.0

    def start(self) -> None:
        """Start the writer's thread."""
        self._thread.start()

    def submit(self, prepared: PreparedSubmission) -> Future[IntakeResult]:
        """Store a submission; the future holds its answer (after its commit) or its error."""
        future: Future[IntakeResult] = Future()
        self._hand_over(prepared, future)
        return future

    def submit_from_loop(self, prepared: PreparedSubmission, timeout: float) -> asyncio.Future[IntakeResult]:
        """Store a submission from the running event loop; the future resolves there after its commit.

        It fails with ServiceUnavailable (``intake_timeout``) when no answer came within ``timeout`` seconds;
        cancelled or failed before the writer takes the submission, the submission is not stored. A batch's
        answers reach their loop in one hand-over.
        """
        loop = asyncio.get_running_loop()
        answers = self._loop_answers
        if answers is None or answers.loop is not loop:
            # An API process has one loop. Another one (tests) gets deadlines of its own; those of the one
            # before keep their timer, which keeps them, until they end.
            answers = self._loop_answers = _LoopAnswers(loop)
        future: asyncio.Future[IntakeResult] = loop.create_future()
        answers.wait(future, timeout)
        try:
            self._hand_over(prepared, future)
        except BaseException:
            future.cancel()  # never handed over: its deadline must not report an error nobody reads
            raise
        return future

    def _hand_over(self, prepared: PreparedSubmission, answer: _Answer) -> None:
        with self._lock:
            if self._closed:
                raise ServiceUnavailable("the service is shutting down", code="shutting_down")
            self._queue.put((prepared, answer))

    def close(self, timeout: float = 30.0) -> None:
        """Stop taking submissions, finish those already taken and stop the thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout)
        if not self._thread.is_alive():  # also when batches were written without the thread (before start)
            self._close_session()

    def _drain(self, first: _Pending) -> tuple[list[_Pending], bool]:
        """``first`` and whatever else waits, up to the batch size; and whether a stop came."""
        pending = [first]
        while len(pending) < self.max_batch:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                return pending, True
            pending.append(item)
        return pending, False

    def write(self, batch: Sequence[PreparedSubmission]) -> list[Outcome]:
        """Write one batch in its own session; when it fails as a whole, each submission is tried alone.

        A batch whose database connection turns out to be dead is written again once, on a new connection.
        The GPU jobs of the new rows are held for ``send_jobs``, which the writer's thread calls after it has
        answered the batch's callers (at once, or within ``job_interval`` together with later batches). Call
        it on the writer's thread, or before ``start``: it is not safe alongside a running writer.
        """
        try:
            try:
                return self._write_once(batch)
            except DBAPIError as exc:
                if not exc.connection_invalidated:
                    raise
                logger.warning("intake's database connection was lost (%s); writing the batch again", exc)
                return self._write_once(batch)
        except Exception as exc:
            if len(batch) == 1:
                logger.exception("could not store a submission")
                return [exc]
            if isinstance(exc, OperationalError | InterfaceError) or getattr(
                exc, "connection_invalidated", False
            ):
                # The database is unreachable or timing out: writing each row alone would fail the same way.
                logger.error("could not store a batch of %d submissions: %s", len(batch), exc)
                return [exc] * len(batch)
            # One bad row must not fail its neighbours: find it by writing each alone.
            logger.warning("a batch of %d submissions failed (%s); writing them one by one", len(batch), exc)
            return [self.write([prepared])[0] for prepared in batch]

    def _write_once(self, batch: Sequence[PreparedSubmission]) -> list[Outcome]:
        # A session whose every statement commits by itself (intake_sessionmaker's) serves batch after batch
        # on one connection: ending a session and its transaction per batch cost the writer's thread an eighth
        # of its CPU. Any other session commits the batch and is closed.
        session, self._session = self._session, None
        if session is not None and time.monotonic() - self._session_since > KEEP_SESSION_SECONDS:
            session.close()  # as a pool recycles connections: a failover may have left this one behind
            session = None
        if session is None:
            session, self._session_since = self.sessions(), time.monotonic()
        autocommit = bool(session.info.get(AUTOCOMMIT))
        try:
            outcomes = store_batch(session, batch, self.blob_store, enqueue_job=False)
            if not autocommit:
                session.commit()
        except BaseException:
            session.close()  # its connection may be dead, its transaction unusable: the next batch gets another
            raise
        if autocommit:
            session.expunge_all()  # replays load rows: nothing is kept from one batch to the next
            self._session = session
        else:
            session.close()
        # The answers go to other threads: none may reach into a session of this one.
        outcomes = [o.detached() if isinstance(o, IntakeResult) else o for o in outcomes]
        # Only now, after the commit, do the new rows get their GPU job.
        self._unsent += [o.id for o in outcomes if isinstance(o, IntakeResult) and o.created]
        return outcomes

    def _close_session(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            session.close()

    def send_jobs(self) -> None:
        """Send the GPU jobs of every submission committed since the last send (the sweeper covers a failure)."""
        ids, self._unsent = self._unsent, []
        self._last_sent = time.monotonic()
        step = self.job_max_submissions
        if ids:
            dispatch_all([process_job(*ids[i : i + step]) for i in range(0, len(ids), step)])

    def _send_due_jobs(self) -> None:
        if self._unsent and time.monotonic() - self._last_sent >= self.job_interval:
            self.send_jobs()

    def _next(self) -> _Pending | None:
        """The next submission handed over; jobs held for ``job_interval`` are sent while waiting for it."""
        while self._unsent:
            wait = self._last_sent + self.job_interval - time.monotonic()
            try:
                return self._queue.get(timeout=wait) if wait > 0 else self._queue.get_nowait()
            except queue.Empty:
                self.send_jobs()
        return self._queue.get()

    def _run(self) -> None:
        name_current_thread(self._thread.name)
        try:
            self._take_batches()
        finally:
            try:
                self._close_session()
            finally:
                self.send_jobs()

    def _take_batches(self) -> None:
        stopping = False
        while not stopping:
            first = self._next()
            if first is None:
                break
            pending, stopping = self._drain(first)
            self._resolve(pending)
            # Publishing comes after the answers: a caller waits for its commit, not for the broker.
            self._busy_since = time.monotonic()  # a publish that hangs shows as a stuck writer too
            try:
                self._send_due_jobs()
            finally:
                self._busy_since = None

    def _resolve(self, pending: list[_Pending]) -> None:
        # A caller that gave up before its submission was taken (client gone, or its wait timed out) was
        # never answered 202.
        pending = [(prepared, answer) for prepared, answer in pending if _take(answer)]
        if not pending:
            return
        metrics.INTAKE_BATCH_SIZE.observe(len(pending))
        self._busy_since = time.monotonic()
        try:
            outcomes = self.write([prepared for prepared, _ in pending])
        except BaseException as exc:  # the thread must outlive any failure, and every caller must hear back
            logger.exception("intake writer failed a batch")
            outcomes = [exc if isinstance(exc, Exception) else RuntimeError(str(exc))] * len(pending)
        finally:
            self._busy_since = None
        on_loops: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[IntakeResult], Outcome]]] = {}
        for (_, answer), outcome in zip(pending, outcomes, strict=True):
            if isinstance(answer, asyncio.Future):
                on_loops.setdefault(answer.get_loop(), []).append((answer, outcome))
            elif isinstance(outcome, BaseException):
                answer.set_exception(outcome)
            else:
                answer.set_result(outcome)
        for loop, answers in on_loops.items():
            try:
                loop.call_soon_threadsafe(_LoopAnswers.deliver, answers)
            except RuntimeError:  # the loop is closed: nobody waits for these answers any more
                logger.warning("intake answers for %d submission(s) had no event loop to go to", len(answers))


def _ended(reference: weakref.ref[asyncio.Future[IntakeResult]]) -> bool:
    """Whether the wait of a deadline entry is over: its future answered, failed, cancelled or gone."""
    future = reference()
    return future is None or future.done()


def _take(answer: _Answer) -> bool:
    """Mark an answer as being worked on; False when its caller no longer waits for it."""
    if isinstance(answer, asyncio.Future):
        # Read from the writer's thread: a caller that gives up just after this is told its submission may
        # still be stored, which it then is.
        return not answer.done()
    return answer.set_running_or_notify_cancel()
