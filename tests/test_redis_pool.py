"""The gateway's bounded Redis pool (core/runtime.py ``_Pool``): its fast path hands out a free
connection without the pool's condition, and must still bound the connections, serve every
waiter and wake one whenever a connection comes back. Against the real Redis of the test run."""

from __future__ import annotations

import asyncio
from typing import Any

import redis.asyncio as aioredis
from django.conf import settings

from core import runtime


def _pool(size: int) -> Any:
    return runtime._Pool.from_url(settings.REDIS_URL, max_connections=size, timeout=5)


def test_many_concurrent_commands_share_a_small_pool() -> None:
    async def main() -> None:
        pool = _pool(3)
        client = aioredis.Redis(connection_pool=pool)
        peak = 0

        async def one(i: int) -> Any:
            nonlocal peak
            value = await client.echo(f"v{i}")
            peak = max(peak, len(pool._in_use_connections))
            return value

        try:
            results = await asyncio.gather(*(one(i) for i in range(300)))
            assert results == [f"v{i}".encode() for i in range(300)]
            assert peak <= 3 and len(pool._in_use_connections) == 0
            assert len(pool._available_connections) <= 3 and pool._waiting == 0
        finally:
            await client.aclose()

    asyncio.run(main())


def test_a_waiter_is_woken_when_the_connection_comes_back() -> None:
    async def main() -> None:
        pool = _pool(1)
        held = await pool.get_connection()
        assert pool._waiting == 0
        waiter = asyncio.ensure_future(pool.get_connection())
        await asyncio.sleep(0.05)
        assert not waiter.done() and pool._waiting == 1  # the only connection is taken: it waits
        await pool.release(held)
        got = await asyncio.wait_for(waiter, timeout=2)  # woken at once, not at the pool's 5 s timeout
        assert got is held and pool._waiting == 0
        # No one waits now: the fast path takes and returns it, and a later caller finds it free.
        await pool.release(got)
        again = await asyncio.wait_for(pool.get_connection(), timeout=1)
        assert again is held
        await pool.release(again)
        await pool.aclose()

    asyncio.run(main())


def test_a_broken_free_connection_is_replaced_on_the_fast_path() -> None:
    async def main() -> None:
        pool = _pool(2)
        client = aioredis.Redis(connection_pool=pool)
        try:
            assert await client.ping()
            (free,) = pool._available_connections
            await free.disconnect()  # as after a Redis restart
            assert await client.ping()  # reconnected by ensure_connection, not an error
        finally:
            await client.aclose()

    asyncio.run(main())
