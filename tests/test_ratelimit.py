"""The per-tenant rate limiter (asynchronous, on the event loop) against the test Redis."""

from __future__ import annotations

import asyncio

import pytest
import redis
import redis.asyncio
from redis.backoff import NoBackoff
from redis.retry import Retry

from moderation.errors import RateLimited
from moderation.ratelimit import RateLimiter
from tests.conftest import TEST_REDIS_URL


def test_burst_then_limited_with_retry_after(redis_client: redis.Redis) -> None:
    async def run() -> list[bool]:
        client = redis.asyncio.Redis.from_url(TEST_REDIS_URL)
        limiter = RateLimiter(client)
        try:
            decisions = [(await limiter.check("t1", 60, 3)).allowed for _ in range(5)]
            with pytest.raises(RateLimited) as err:
                await limiter.enforce("t1", 60, 3)
            assert 0 < err.value.retry_after <= 1.0
            assert (await limiter.check("t2", 60, 3)).allowed
            assert (await limiter.check("t1", 0, 3)).allowed  # 0 per minute = no limit
            return decisions
        finally:
            await client.aclose()

    assert asyncio.run(run()) == [True, True, True, False, False]


def test_unreachable_redis_lets_requests_through_unless_fail_closed() -> None:
    async def run() -> None:
        client = redis.asyncio.Redis(host="127.0.0.1", port=1, retry=Retry(NoBackoff(), 0))
        try:
            assert (await RateLimiter(client).check("t", 60, 3)).allowed
            with pytest.raises(redis.RedisError):
                await RateLimiter(client, fail_open=False).check("t", 60, 3)
        finally:
            await client.aclose()

    asyncio.run(run())
