"""The request's closing round trip (``core.runtime.RedisBatch``) against the real Redis: every
command keeps its own outcome, unknown scripts are loaded, and an unreachable Redis reaches every
command's ``on_error`` (so a ledger row is spooled, not lost)."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import pytest
import redis.asyncio as aioredis
from django.conf import settings

from core import runtime


def _run(coro_fn: Any) -> Any:
    async def main() -> Any:
        try:
            return await coro_fn()
        finally:
            await runtime.close_redis()

    return asyncio.run(main())


def _count_pipelines(monkeypatch: Any) -> list[int]:
    """The number of commands of every pipeline sent from now on."""
    sizes: list[int] = []
    execute = aioredis.client.Pipeline.execute

    async def counting_execute(pipe: Any, raise_on_error: bool = True) -> Any:
        sizes.append(len(pipe.command_stack))
        return await execute(pipe, raise_on_error)

    monkeypatch.setattr(aioredis.client.Pipeline, "execute", counting_execute)
    return sizes


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


def test_batches_sent_in_one_turn_of_the_loop_share_one_round_trip(monkeypatch: Any) -> None:
    """Requests closing together send one pipeline, and each still gets only its own outcomes:
    a failing command, a script the server has never seen, and a cancelled sender included."""
    key = f"{settings.REDIS_PREFIX}:batch:{os.urandom(4).hex()}"
    lua = f"-- {os.urandom(8).hex()}\nreturn redis.call('INCRBY', KEYS[1], ARGV[1])"
    round_trips = _count_pipelines(monkeypatch)
    errors: dict[str, list[str]] = {"a": [], "b": [], "c": []}

    def on_error(name: str) -> Any:
        return lambda exc: errors[name].append(str(exc))

    async def go() -> list[Any]:
        conn = runtime.redis_client()
        await conn.set(f"{key}:text", "not a number")
        a, b, c = runtime.RedisBatch(), runtime.RedisBatch(), runtime.RedisBatch()
        a.command("INCRBY", f"{key}:a", 2, on_error=on_error("a"))
        a.command("INCR", f"{key}:text", on_error=on_error("a"))  # fails: only a hears of it
        b.script(conn.register_script(lua), [f"{key}:b"], [7], on_error=on_error("b"))
        b.command("XADD", f"{key}:stream", "*", b"row", b"{}", on_error=on_error("b"))
        c.command("INCRBY", f"{key}:c", 3, on_error=on_error("c"))
        round_trips.clear()
        cancelled = asyncio.ensure_future(c.send())
        sent = asyncio.gather(a.send(), b.send())
        await asyncio.sleep(0)  # all three have joined the group; c's request goes away
        cancelled.cancel()
        await sent
        found = [await conn.get(f"{key}:{name}") for name in "abc"] + [await conn.xlen(f"{key}:stream")]
        await conn.delete(*(f"{key}:{name}" for name in ("a", "b", "c", "text", "stream")))
        return found

    # One pipeline of five commands (then the unknown script alone, which loads it); c's command
    # still went: a request cancelled while its batch is on the wire does not take it back.
    assert _run(go) == [b"2", b"7", b"3", 1]
    assert round_trips[0] == 5 and len(round_trips) == 1
    assert errors["b"] == [] and errors["c"] == []
    assert len(errors["a"]) == 1 and "not an integer" in errors["a"][0]


def test_an_unreachable_redis_reaches_every_batch_of_the_group(settings: Any) -> None:
    settings.REDIS_URL = "redis://127.0.0.1:9/0"
    failed: list[str] = []

    async def go() -> None:
        batches = [runtime.RedisBatch() for _ in range(3)]
        for n, batch in enumerate(batches):

            def on_error(exc: BaseException, n: int = n) -> None:
                failed.append(f"{n}")

            batch.command("XADD", "s", "*", b"row", b"{}", on_error=on_error)
        await asyncio.gather(*(batch.send() for batch in batches))

    _run(go)
    assert sorted(failed) == ["0", "1", "2"]


def _connections() -> int:
    pool = runtime.redis_client().connection_pool
    return len(pool._available_connections) + len(pool._in_use_connections)


def test_scripts_run_in_one_turn_share_one_round_trip_and_keep_their_own_outcome(monkeypatch: Any) -> None:
    """``run_script``: concurrent calls (requests admitted together) leave as one pipeline on one
    connection (all but the first ``ALONE_MAX``, sent at once on their own); each caller gets its
    own result or its own error, and a script the server has never seen is loaded and run."""
    key = f"{settings.REDIS_PREFIX}:script:{os.urandom(4).hex()}"
    known = "return redis.call('INCRBY', KEYS[1], ARGV[1])"
    fresh = f"-- {os.urandom(8).hex()}\nreturn redis.call('INCRBY', KEYS[1], ARGV[1])"
    round_trips = _count_pipelines(monkeypatch)

    async def go() -> tuple[list[Any], int]:
        conn = runtime.redis_client()
        await conn.set(f"{key}:text", "not a number")
        await conn.script_load(known)
        script = conn.register_script(known)
        connections_before = _connections()
        round_trips.clear()
        calls = [runtime.run_script(script, [f"{key}:n"], [1]) for _ in range(40)]
        calls.append(runtime.run_script(script, [f"{key}:text"], [1]))  # fails: not an integer
        calls.append(runtime.run_script(conn.register_script(fresh), [f"{key}:fresh"], [7]))
        results = await asyncio.gather(*calls, return_exceptions=True)
        opened = _connections() - connections_before
        await conn.delete(f"{key}:n", f"{key}:text", f"{key}:fresh")
        return results, opened

    results, opened = _run(go)
    assert sorted(results[:40]) == list(range(1, 41))  # each call its own INCRBY result
    assert "not an integer" in str(results[40])
    assert results[41] == 7
    # One pipeline for the rest (then the unknown script alone, which loads it).
    assert round_trips[0] == 42 - runtime.ALONE_MAX
    assert opened <= runtime.ALONE_MAX + 1


def test_a_script_cancelled_before_its_round_trip_leaves_is_not_sent(monkeypatch: Any) -> None:
    """A request that goes away while its admission waits for the turn's pipeline takes nothing:
    its script is left out, so no reservation is made for it (the others still run)."""
    key = f"{settings.REDIS_PREFIX}:script:{os.urandom(4).hex()}"
    monkeypatch.setattr(runtime, "ALONE_MAX", 1)  # the second call on joins the group

    async def go() -> list[Any]:
        conn = runtime.redis_client()
        script = conn.register_script("return redis.call('INCRBY', KEYS[1], ARGV[1])")
        await script(keys=[f"{key}:warm"], args=[0])  # loaded: the pipeline runs it by SHA
        first = asyncio.ensure_future(runtime.run_script(script, [f"{key}:warm"], [1]))  # goes alone
        gone = asyncio.ensure_future(runtime.run_script(script, [f"{key}:gone"], [5]))
        kept = asyncio.ensure_future(runtime.run_script(script, [f"{key}:kept"], [3]))
        await asyncio.sleep(0)  # both joined this turn's group; the flush is scheduled
        gone.cancel()
        assert await kept == 3 and await first == 1
        found = [await conn.get(f"{key}:gone"), await conn.get(f"{key}:kept")]
        await conn.delete(f"{key}:gone", f"{key}:kept", f"{key}:warm")
        return found

    assert _run(go) == [None, b"3"]


@pytest.mark.parametrize("alone_max", [runtime.ALONE_MAX, 0], ids=["alone", "in-a-pipeline"])
def test_run_script_raises_what_redis_py_raises_when_redis_is_unreachable(
    settings: Any, monkeypatch: Any, alone_max: int
) -> None:
    settings.REDIS_URL = "redis://127.0.0.1:9/0"
    monkeypatch.setattr(runtime, "ALONE_MAX", alone_max)  # 0: the call goes through the group

    async def go() -> BaseException | None:
        script = runtime.redis_client().register_script("return 1")
        try:
            await runtime.run_script(script, [], [])
        except Exception as exc:  # noqa: BLE001 (the test looks at what was raised)
            return exc
        return None

    assert type(_run(go)).__name__ == "ConnectionError"


def test_a_lone_script_goes_at_once_without_a_pipeline(monkeypatch: Any) -> None:
    """One request at a time: nothing to share a round trip with, so no waiting for the end of
    the turn and no pipeline (the latency of an idle gateway)."""
    pipelines = _count_pipelines(monkeypatch)

    async def go() -> list[Any]:
        script = runtime.redis_client().register_script("return ARGV[1]")
        return [await runtime.run_script(script, [], [n]) for n in range(3)]

    assert _run(go) == [b"0", b"1", b"2"]
    assert pipelines == []
