"""Per-tenant request rate limiting in Redis (GCRA: a smooth rate with a burst allowance)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import redis
import redis.asyncio

from moderation.errors import RateLimited

logger = logging.getLogger(__name__)

# Generic cell rate algorithm for ``count`` requests at once, atomic in Redis. Request i (0-based) passes
# when now >= tat + i * interval - burst * interval; the first ``allowed`` pass and move the theoretical
# arrival time on. Returns {allowed, retry_after_ms for the first refused one}.
_GCRA = """
redis.replicate_commands()  -- TIME before a write (a no-op on Redis 7, needed on older servers)
local key = KEYS[1]
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local count = tonumber(ARGV[3])
-- Redis's own clock: API hosts whose clocks disagree would otherwise push each other's limits around.
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + tonumber(clock[2]) / 1000
local tat = tonumber(redis.call('GET', key) or now)
if tat < now then tat = now end
-- The epsilon keeps float rounding (b * T / T landing just under b) from refusing a request that fits.
local allowed = math.floor((now - tat + burst * interval) / interval + 1e-9) + 1
if allowed > count then allowed = count end
if allowed < 0 then allowed = 0 end
if allowed > 0 then
  local new_tat = tat + allowed * interval
  redis.call('SET', key, new_tat, 'PX', math.ceil(new_tat - now + interval))
end
local retry = 0
if allowed < count then retry = tat + allowed * interval - burst * interval - now end
return {allowed, retry}
"""


@dataclass(frozen=True)
class RateDecision:
    """Whether a request may pass and, if not, when to retry."""

    allowed: bool
    retry_after: float


_PASS = RateDecision(True, 0.0)


@dataclass
class _Round:
    """Checks of one key that arrived while a check of that key was with Redis; they go next, together."""

    waiters: list[asyncio.Future[RateDecision]] = field(default_factory=list)


@dataclass
class _Lease:
    """Passes of one key that Redis granted this process ahead of need, and this process's recent demand."""

    tokens: int = 0
    expires: float = 0.0
    window_start: float = 0.0
    checks: int = 0  # checks of the key since window_start
    demand: int = 0  # checks of the key in the window before

    def note_check(self, now: float, window: float) -> None:
        """Count a check in the current demand window."""
        if now - self.window_start >= window:
            # A window with no checks at all in between means no recent demand.
            self.demand = self.checks if now - self.window_start < 2 * window else 0
            self.checks = 0
            self.window_start = now
        self.checks += 1

    def take(self, now: float) -> bool:
        """Use one granted pass, if one is left and not expired."""
        if self.tokens > 0 and now < self.expires:
            self.tokens -= 1
            return True
        self.tokens = 0
        return False


class RateLimiter:
    """Limits each key to ``per_minute`` requests with a burst of ``burst``; runs on the event loop.

    Checks of one key that arrive while an earlier one is with Redis are counted together in the next
    round trip, so a busy tenant costs Redis one script call per round trip, not one per request. A key
    that this process checks often also asks Redis for the passes it will likely need within
    ``lease_seconds`` (its demand of the last such window, at most a tenth of the burst and what the rate
    earns in that time); those passes are spent locally, without a round trip, and lapse unused after
    ``lease_seconds``. Every pass is granted by Redis first, so the limit holds across processes; a pass that
    lapses unused was counted all the same, so a tenant right at its limit may be refused a little early.
    """

    def __init__(
        self,
        client: redis.asyncio.Redis,
        *,
        fail_open: bool = True,
        lease_seconds: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.clock = clock
        self.fail_open = fail_open
        self.lease_seconds = lease_seconds
        self._script = client.register_script(_GCRA)
        self._next_round: dict[tuple[str, int, int], _Round] = {}
        self._rounds: set[asyncio.Task[None]] = set()  # strong references until they finish
        self._leases: dict[tuple[str, int, int], _Lease] = {}
        self._sweep_at = 4096  # size of _leases at which keys not checked lately are dropped

    async def check(self, key: str, per_minute: int, burst: int) -> RateDecision:
        """Count one request against ``key``; Redis trouble lets requests through (logged)."""
        if per_minute <= 0:
            return _PASS
        slot = (key, per_minute, burst)
        now = self.clock()
        lease = self._lease(slot, now)
        lease.note_check(now, self.lease_seconds)
        if lease.take(now):
            return _PASS
        waiting = self._next_round.get(slot)
        if waiting is not None:
            future: asyncio.Future[RateDecision] = asyncio.get_running_loop().create_future()
            waiting.waiters.append(future)
            return await future
        self._next_round[slot] = _Round()
        try:
            (decision,) = await self._count_for(slot, 1)
        finally:
            self._hand_over(slot)
        return decision

    def _lease(self, slot: tuple[str, int, int], now: float) -> _Lease:
        lease = self._leases.get(slot)
        if lease is None:
            if len(self._leases) >= self._sweep_at:  # forget keys not checked lately
                stale = now - 2 * self.lease_seconds
                self._leases = {s: v for s, v in self._leases.items() if v.window_start >= stale}
                self._sweep_at = max(4096, 2 * len(self._leases))
            lease = self._leases[slot] = _Lease(window_start=now)
        return lease

    def _prefetch(self, slot: tuple[str, int, int]) -> int:
        """How many passes to ask for beyond those needed now: the recent demand, within bounds."""
        _, per_minute, burst = slot
        lease = self._leases.get(slot)
        if lease is None:
            return 0
        bound = min(burst // 10, int(per_minute / 60 * self.lease_seconds))
        return max(0, min(lease.demand, bound))

    async def _count_for(self, slot: tuple[str, int, int], count: int) -> list[RateDecision]:
        """Decisions for ``count`` checks of ``slot``; passes granted beyond them are kept as its lease."""
        key, per_minute, burst = slot
        extra = self._prefetch(slot)
        # Passes lapse lease_seconds after they were asked for, not after the answer came.
        asked_at = self.clock()
        try:
            decisions = await self._count(key, per_minute, burst, count + extra)
        except redis.RedisError:
            if not self.fail_open:
                raise
            logger.warning("rate limiter unavailable; letting %d request(s) through", count, exc_info=True)
            return [_PASS] * count
        granted = sum(1 for d in decisions[count:] if d.allowed)
        if granted:
            lease = self._leases.get(slot)
            if lease is not None:
                lease.tokens = granted
                lease.expires = asked_at + self.lease_seconds
        return decisions[:count]

    def _hand_over(self, slot: tuple[str, int, int]) -> None:
        """Start the round of the checks that queued behind this one, or close the slot."""
        waiting = self._next_round[slot]
        lease = self._leases.get(slot)
        if lease is not None and waiting.waiters:
            # Passes just granted ahead of need serve those that queued meanwhile, without a round trip.
            now = self.clock()
            served = 0
            for waiter in waiting.waiters:
                if waiter.done():  # its request was cancelled meanwhile: it needs no pass
                    served += 1
                    continue
                if not lease.take(now):
                    break
                waiter.set_result(_PASS)
                served += 1
            del waiting.waiters[:served]
        if not waiting.waiters:
            del self._next_round[slot]
            return
        self._next_round[slot] = _Round()
        task = asyncio.get_running_loop().create_task(self._run_round(slot, waiting.waiters))
        self._rounds.add(task)
        task.add_done_callback(self._rounds.discard)

    async def _run_round(
        self, slot: tuple[str, int, int], waiters: list[asyncio.Future[RateDecision]]
    ) -> None:
        try:
            decisions = await self._count_for(slot, len(waiters))
        except asyncio.CancelledError:  # the loop is shutting down: so are the waiters' requests
            for waiter in waiters:
                waiter.cancel()
            raise
        except Exception as exc:  # the waiters' requests hear of it, as a lone check's would
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_exception(exc)
            return
        finally:
            self._hand_over(slot)
        for waiter, decision in zip(waiters, decisions, strict=True):
            if not waiter.done():  # its request may have been cancelled meanwhile
                waiter.set_result(decision)

    async def _count(self, key: str, per_minute: int, burst: int, count: int) -> list[RateDecision]:
        interval_ms = 60_000.0 / per_minute
        allowed, retry_ms = await self._script(
            keys=[f"ratelimit:{key}"], args=[interval_ms, max(0, burst - 1), count]
        )
        allowed = int(allowed)
        refused = RateDecision(False, float(retry_ms) / 1000)
        return [_PASS] * allowed + [refused] * (count - allowed)

    async def enforce(self, key: str, per_minute: int, burst: int) -> None:
        """Raise RateLimited when ``key`` is over its rate."""
        decision = await self.check(key, per_minute, burst)
        if not decision.allowed:
            raise RateLimited(
                f"rate limit of {per_minute} requests per minute exceeded",
                retry_after=max(decision.retry_after, 0.001),
            )
