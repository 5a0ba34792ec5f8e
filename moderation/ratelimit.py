"""Per-tenant request rate limiting in Redis (GCRA: a smooth rate with a burst allowance)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import redis
import redis.asyncio

from moderation.errors import RateLimited

logger = logging.getLogger(__name__)

# Generic cell rate algorithm, atomic in Redis. Returns {allowed, retry_after_ms}.
_GCRA = """
local key = KEYS[1]
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local now = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', key) or now)
if tat < now then tat = now end
local allow_at = tat - burst * interval
if now < allow_at then
  return {0, allow_at - now}
end
local new_tat = tat + interval
redis.call('SET', key, new_tat, 'PX', math.ceil(new_tat - now + interval))
return {1, 0}
"""


@dataclass(frozen=True)
class RateDecision:
    """Whether a request may pass and, if not, when to retry."""

    allowed: bool
    retry_after: float


class RateLimiter:
    """Limits each key to ``per_minute`` requests with a burst of ``burst``; runs on the event loop."""

    def __init__(self, client: redis.asyncio.Redis, *, fail_open: bool = True) -> None:
        self.client = client
        self.fail_open = fail_open
        self._script = client.register_script(_GCRA)

    async def check(self, key: str, per_minute: int, burst: int) -> RateDecision:
        """Count one request against ``key``; Redis trouble lets requests through (logged)."""
        if per_minute <= 0:
            return RateDecision(True, 0.0)
        interval_ms = 60_000.0 / per_minute
        now_ms = time.time() * 1000
        try:
            allowed, retry_ms = await self._script(
                keys=[f"ratelimit:{key}"], args=[interval_ms, max(0, burst - 1), now_ms]
            )
        except redis.RedisError:
            if not self.fail_open:
                raise
            logger.warning("rate limiter unavailable; letting the request through", exc_info=True)
            return RateDecision(True, 0.0)
        return RateDecision(bool(int(allowed)), float(retry_ms) / 1000)

    async def enforce(self, key: str, per_minute: int, burst: int) -> None:
        """Raise RateLimited when ``key`` is over its rate."""
        decision = await self.check(key, per_minute, burst)
        if not decision.allowed:
            raise RateLimited(
                f"rate limit of {per_minute} requests per minute exceeded",
                retry_after=max(decision.retry_after, 0.001),
            )
