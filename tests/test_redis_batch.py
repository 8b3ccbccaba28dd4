"""The request's closing round trip (``core.runtime.RedisBatch``) against the real Redis: every
command keeps its own outcome, unknown scripts are loaded, and an unreachable Redis reaches every
command's ``on_error`` (so a ledger row is spooled, not lost)."""

from __future__ import annotations

import asyncio
import os
from typing import Any

from django.conf import settings

from core import runtime


def _run(coro_fn: Any) -> Any:
    async def main() -> Any:
        try:
            return await coro_fn()
        finally:
            await runtime.close_redis()

    return asyncio.run(main())


def test_commands_keep_their_own_outcome_and_unknown_scripts_are_loaded() -> None:
    key = f"{settings.REDIS_PREFIX}:batch:{os.urandom(4).hex()}"
    # A script this server has never seen (a fresh comment makes a fresh SHA): NOSCRIPT, then loaded.
    lua = f"-- {os.urandom(8).hex()}\nreturn redis.call('INCRBY', KEYS[1], ARGV[1])"
    errors: list[BaseException] = []

    async def go() -> list[Any]:
        conn = runtime.redis_client()
        await conn.set(f"{key}:text", "not a number")
        batch = runtime.RedisBatch()
        batch.script(conn.register_script(lua), [f"{key}:n"], [5], on_error=errors.append)
        batch.command("INCR", f"{key}:text", on_error=errors.append)  # fails: not an integer
        batch.command("XADD", f"{key}:stream", "*", b"row", b"{}", on_error=errors.append)
        await batch.send()
        found = [await conn.get(f"{key}:n"), await conn.xlen(f"{key}:stream")]
        await conn.delete(f"{key}:n", f"{key}:text", f"{key}:stream")
        return found

    assert _run(go) == [b"5", 1]
    assert len(errors) == 1 and "not an integer" in str(errors[0])


def test_an_unreachable_redis_reaches_every_on_error(settings: Any) -> None:
    settings.REDIS_URL = "redis://127.0.0.1:9/0"  # the discard port: nothing listens
    errors: list[str] = []
    spooled: list[str] = []

    async def spool(exc: BaseException) -> None:
        spooled.append(type(exc).__name__)

    async def go() -> None:
        batch = runtime.RedisBatch()
        batch.command("INCR", "x", on_error=lambda exc: errors.append(type(exc).__name__))
        batch.command("XADD", "s", "*", b"row", b"{}", on_error=spool)
        await batch.send()

    _run(go)
    assert errors == ["ConnectionError"] and spooled == ["ConnectionError"]
