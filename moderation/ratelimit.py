"""Per-tenant request rate limiting in Redis (GCRA: a smooth rate with a burst allowance)."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import redis
import redis.asyncio

from moderation.errors import RateLimited

logger = logging.getLogger(__name__)

# Generic cell rate algorithm for ``count`` requests at once, atomic in Redis. Request i (0-based) passes
# when now >= tat + i * interval - burst * interval; the first ``allowed`` pass and move the theoretical
# arrival time on. Returns {allowed, retry_after_ms for the first refused one}.
_GCRA = """
local key = KEYS[1]
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local now = tonumber(ARGV[3])
local count = tonumber(ARGV[4])
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


class RateLimiter:
    """Limits each key to ``per_minute`` requests with a burst of ``burst``; runs on the event loop.

    Checks of one key that arrive while an earlier one is with Redis are counted together in the next
    round trip, so a busy tenant costs Redis one script call per round trip, not one per request.
    """

    def __init__(self, client: redis.asyncio.Redis, *, fail_open: bool = True) -> None:
        self.client = client
        self.fail_open = fail_open
        self._script = client.register_script(_GCRA)
        self._next_round: dict[tuple[str, int, int], _Round] = {}
        self._rounds: set[asyncio.Task[None]] = set()  # strong references until they finish

    async def check(self, key: str, per_minute: int, burst: int) -> RateDecision:
        """Count one request against ``key``; Redis trouble lets requests through (logged)."""
        if per_minute <= 0:
            return _PASS
        slot = (key, per_minute, burst)
        waiting = self._next_round.get(slot)
        if waiting is not None:
            future: asyncio.Future[RateDecision] = asyncio.get_running_loop().create_future()
            waiting.waiters.append(future)
            return await future
        self._next_round[slot] = _Round()
        try:
            (decision,) = await self._count(key, per_minute, burst, 1)
        except BaseException:
            self._hand_over(slot)
            raise
        self._hand_over(slot)
        return decision

    def _hand_over(self, slot: tuple[str, int, int]) -> None:
        """Start the round of the checks that queued behind this one, or close the slot."""
        waiting = self._next_round[slot]
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
        key, per_minute, burst = slot
        try:
            decisions = await self._count(key, per_minute, burst, len(waiters))
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
        now_ms = time.time() * 1000
        try:
            allowed, retry_ms = await self._script(
                keys=[f"ratelimit:{key}"], args=[interval_ms, max(0, burst - 1), now_ms, count]
            )
        except redis.RedisError:
            if not self.fail_open:
                raise
            logger.warning("rate limiter unavailable; letting %d request(s) through", count, exc_info=True)
            return [_PASS] * count
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
