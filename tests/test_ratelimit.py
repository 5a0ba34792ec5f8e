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


def test_concurrent_checks_of_one_key_share_round_trips_and_keep_the_limit(redis_client: redis.Redis) -> None:
    async def run() -> tuple[list[bool], list[int]]:
        client = redis.asyncio.Redis.from_url(TEST_REDIS_URL)
        limiter = RateLimiter(client)
        counts: list[int] = []
        script = limiter._script

        async def counting(*, keys: list[str], args: list[float]) -> object:
            counts.append(int(args[3]))
            return await script(keys=keys, args=args)

        limiter._script = counting  # type: ignore[assignment]
        try:
            decisions = await asyncio.gather(*(limiter.check("busy", 60, 5) for _ in range(12)))
            other = await limiter.check("quiet", 60, 5)
            assert other.allowed and limiter._next_round == {}
            refused = [d for d in decisions if not d.allowed]
            assert all(0 < d.retry_after <= 1.0 for d in refused)
            return [d.allowed for d in decisions], counts
        finally:
            await client.aclose()

    allowed, counts = asyncio.run(run())
    # Exactly the burst passes, however the twelve were grouped: the first alone, the rest together.
    assert allowed.count(True) == 5 and allowed[:5] == [True] * 5
    assert counts[:2] == [1, 11] and sum(counts) == 13


def test_a_failing_round_lets_every_waiting_request_through_or_fails_them_all() -> None:
    async def run(fail_open: bool) -> list[object]:
        client = redis.asyncio.Redis(host="127.0.0.1", port=1, retry=Retry(NoBackoff(), 0))
        limiter = RateLimiter(client, fail_open=fail_open)
        try:
            return await asyncio.gather(
                *(limiter.check("t", 60, 3) for _ in range(4)), return_exceptions=True
            )
        finally:
            await client.aclose()

    assert all(getattr(d, "allowed", False) for d in asyncio.run(run(True)))
    assert all(isinstance(d, redis.RedisError) for d in asyncio.run(run(False)))


@pytest.mark.parametrize(("per_minute", "burst"), [(11, 52), (13, 32), (7, 9), (600, 20)])
def test_a_round_as_large_as_the_burst_passes_whole_on_a_fresh_key(
    redis_client: redis.Redis, per_minute: int, burst: int
) -> None:
    async def run() -> tuple[int, int]:
        client = redis.asyncio.Redis.from_url(TEST_REDIS_URL)
        limiter = RateLimiter(client)
        try:
            # Floating point must not make b * T / T land under b and refuse the last one that fits.
            decisions = await limiter._count(f"fresh-{per_minute}-{burst}", per_minute, burst, burst + 1)
            return sum(d.allowed for d in decisions), int(decisions[-1].retry_after * 1000)
        finally:
            await client.aclose()

    allowed, retry_ms = asyncio.run(run())
    assert allowed == burst and retry_ms > 0
