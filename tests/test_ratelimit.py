"""The per-tenant rate limiter (asynchronous, on the event loop) against the test Redis."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from unittest import mock

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


class FakeClock:
    """A monotonic clock that moves only when told."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def counting_limiter(
    client: redis.asyncio.Redis, clock: Callable[[], float] = time.monotonic
) -> tuple[RateLimiter, list[int]]:
    """A limiter on ``clock`` and the count each of its script calls asked Redis for."""
    limiter = RateLimiter(client, clock=clock)
    counts: list[int] = []
    script = limiter._script

    async def counting(*, keys: list[str], args: list[float]) -> object:
        counts.append(int(args[2]))  # the count asked for
        return await script(keys=keys, args=args)

    limiter._script = counting  # type: ignore[assignment]
    return limiter, counts


async def build_demand(limiter: RateLimiter, clock: FakeClock, key: str, checks: int) -> None:
    """Make ``checks`` checks of ``key`` (1,000 a second, burst 1,000), then start the next demand window."""
    for _ in range(checks):
        assert (await limiter.check(key, 60_000, 1000)).allowed
    clock.now += 0.1


def test_concurrent_checks_of_one_key_share_round_trips_and_keep_the_limit(redis_client: redis.Redis) -> None:
    async def run() -> tuple[list[bool], list[int]]:
        client = redis.asyncio.Redis.from_url(TEST_REDIS_URL)
        limiter, counts = counting_limiter(client)
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


def test_a_busy_key_spends_passes_granted_ahead_without_round_trips(redis_client: redis.Redis) -> None:
    async def run() -> list[int]:
        client = redis.asyncio.Redis.from_url(TEST_REDIS_URL)
        clock = FakeClock()
        limiter, counts = counting_limiter(client, clock)
        try:
            # 1,000 a second with a burst of 1,000: up to 100 passes may be granted ahead.
            for _ in range(30):
                assert (await limiter.check("busy", 60_000, 1000)).allowed
            assert counts == [1] * 30  # no demand known yet: one round trip each
            clock.now += 0.1
            for _ in range(31):
                assert (await limiter.check("busy", 60_000, 1000)).allowed
            # The last window's demand (30) was asked for beyond the one needed, and spent locally.
            assert counts[30:] == [31]
            assert (await limiter.check("busy", 60_000, 1000)).allowed
            assert counts[31:] == [31]
            # Passes granted ahead lapse after the lease: the next check asks Redis again.
            clock.now += 0.1
            assert (await limiter.check("busy", 60_000, 1000)).allowed
            return counts
        finally:
            await client.aclose()

    assert len(asyncio.run(run())) == 33


def test_passes_granted_ahead_serve_checks_that_queued_behind_a_round(redis_client: redis.Redis) -> None:
    async def run() -> tuple[list[bool], list[int]]:
        client = redis.asyncio.Redis.from_url(TEST_REDIS_URL)
        clock = FakeClock()
        limiter, counts = counting_limiter(client, clock)
        try:
            await build_demand(limiter, clock, "queued", 20)
            # The first goes to Redis and asks for 20 more; the nine queued behind it spend nine of them.
            decisions = await asyncio.gather(*(limiter.check("queued", 60_000, 1000) for _ in range(10)))
            return [d.allowed for d in decisions], counts[20:]
        finally:
            await client.aclose()

    allowed, counts = asyncio.run(run())
    assert all(allowed) and counts == [21]


def test_granting_ahead_never_lets_processes_together_past_the_limit(redis_client: redis.Redis) -> None:
    async def run() -> tuple[int, float, list[int]]:
        client = redis.asyncio.Redis.from_url(TEST_REDIS_URL)
        clock = FakeClock()
        # Two processes of one tenant: 100 a second with a burst of 100, so each may hold up to 10 ahead.
        first, first_counts = counting_limiter(client, clock)
        second, second_counts = counting_limiter(client, clock)
        started = time.time()
        passed = 0
        try:
            for step in range(600):
                if step % 20 == 0:
                    clock.now += 0.05  # demand windows roll over, so both keep asking ahead
                limiter = first if step % 2 else second
                passed += (await limiter.check("shared", 6000, 100)).allowed
            return passed, time.time() - started, first_counts + second_counts
        finally:
            await client.aclose()

    passed, elapsed, counts = asyncio.run(run())
    assert max(counts) > 1  # passes were granted ahead
    # The limit: the burst plus what the rate earned while the test ran (by the clients' wall clock).
    assert passed <= 100 + 100 * elapsed + 1
    # Passes granted ahead and left unused are lost: here no more than what the two leases held.
    assert passed >= 100 - 2 * 10


def test_a_check_cancelled_while_queued_takes_no_pass_granted_ahead(redis_client: redis.Redis) -> None:
    async def run() -> tuple[list[bool], list[int], int]:
        client = redis.asyncio.Redis.from_url(TEST_REDIS_URL)
        clock = FakeClock()
        limiter, counts = counting_limiter(client, clock)
        try:
            await build_demand(limiter, clock, "cancel", 5)
            # The first goes to Redis and asks for 5 more; four queue behind it, and one of those gives up.
            first = asyncio.ensure_future(limiter.check("cancel", 60_000, 1000))
            await asyncio.sleep(0)
            queued = [asyncio.ensure_future(limiter.check("cancel", 60_000, 1000)) for _ in range(4)]
            await asyncio.sleep(0)
            queued[1].cancel()
            served = await asyncio.gather(first, queued[0], queued[2], queued[3])
            lease = limiter._leases[("cancel", 60_000, 1000)]
            return [d.allowed for d in served], counts[5:], lease.tokens
        finally:
            await client.aclose()

    allowed, counts, left = asyncio.run(run())
    # One round trip for all; the three still waiting spent three of the five passes, the cancelled none.
    assert all(allowed) and counts == [6] and left == 2


def test_the_limit_runs_on_redis_time_not_on_each_hosts_clock(redis_client: redis.Redis) -> None:
    # Two API hosts whose clocks disagree by 30 s share a tenant's limit of 10 a second (burst 1): the one
    # behind is not refused for 30 s because the one ahead moved the limit's clock on.
    real_time = time.time

    async def run() -> tuple[bool, bool]:
        client = redis.asyncio.Redis.from_url(TEST_REDIS_URL)
        try:
            with mock.patch("time.time", lambda: real_time() + 30):
                ahead = await RateLimiter(client).check("skewed", 600, 1)
            await asyncio.sleep(0.15)  # more than one interval later, by any clock
            behind = await RateLimiter(client).check("skewed", 600, 1)
            return ahead.allowed, behind.allowed
        finally:
            await client.aclose()

    assert asyncio.run(run()) == (True, True)
