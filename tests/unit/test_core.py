"""``core``: the backoff rule, the invalidation registry, the Redis command packing (no services needed)."""

from __future__ import annotations

from typing import Any

import pytest
import redis.asyncio as aioredis

from core import backoff, invalidation, runtime
from ledger import writer


def test_backoff_grows_is_capped_and_stays_within_its_jitter() -> None:
    for exponent, nominal in ((0, 0.1), (1, 0.2), (3, 0.8), (10, 2.0), (500, 2.0)):
        for _ in range(50):
            wait = backoff.delay(exponent, base=0.1, cap=2.0, low=0.75, high=1.25)
            assert 0.75 * nominal <= wait <= 1.25 * nominal
    assert all(0.5 <= backoff.delay(1, base=0.5, cap=30.0) <= 1.0 for _ in range(50))  # equal jitter by default


def test_a_subscribed_cache_is_dropped_by_an_announcement_once(settings: Any) -> None:
    # This process only: without Redis. In `make test` REDIS_URL is set, and the announcement's
    # Redis message could reach a listener that drops the caches a second time.
    settings.REDIS_URL = ""
    dropped: list[str] = []

    def drop() -> None:
        dropped.append("cache")

    assert invalidation.subscribe(drop) is drop
    invalidation.subscribe(drop)  # subscribing twice does not drop twice
    invalidation.announce()  # no REDIS_URL: this process only (and the stamp file)
    assert dropped == ["cache"]


def test_the_usage_writer_backoff_grows_and_is_capped(settings: Any) -> None:
    settings.CHITTYCAN_USAGE_RETRY_BASE = 0.5
    settings.CHITTYCAN_USAGE_RETRY_MAX = 8.0
    assert 0.5 <= writer.backoff_seconds(1) <= 1.0
    assert 2.0 <= writer.backoff_seconds(3) <= 4.0
    assert 4.0 <= writer.backoff_seconds(30) <= 8.0


@pytest.mark.parametrize(
    "command",
    [
        ("SET", "key", "värde ✓", "EX", 30),
        ("EVALSHA", "0" * 40, 3, b"a", b"\x00\xff", -7, 2**63 - 1, 0.1, 1e-9, 12.5),
        ("CONFIG GET", "maxmemory"),
        (b"CLIENT SETNAME", b"chittycan"),
        ("XADD", "stream", "*", "row", b'{"request_id":"req_1"}' * 1000),
    ],
)
def test_redis_commands_packed_by_hiredis_are_the_bytes_redis_py_sends(command: tuple[Any, ...]) -> None:
    pool = aioredis.ConnectionPool.from_url("redis://127.0.0.1:6379/0")
    plain = pool.make_connection()
    runtime._with_hiredis_packing(pool)
    fast = pool.make_connection()
    assert type(fast).__name__ == "HiredisConnection" and isinstance(fast, type(plain))
    assert b"".join(fast.pack_command(*command)) == b"".join(plain.pack_command(*command))
    many = [command, ("GET", "k"), command]
    assert b"".join(fast.pack_commands(many)) == b"".join(plain.pack_commands(many))
