"""Coalescing: identical in-flight requests answered by one upstream call (docs/caching.md).

The first request of a cache key to miss becomes the key's *leader*: it holds a lease
(``<prefix>:rcl:<space>:<model digest>:<request digest>``, ``SET NX PX``, renewed while it runs)
and calls the upstream. Every identical request that arrives meanwhile, in any gateway process, is
a *follower*: it reads the leader's answer as the leader receives it (each stream item, or the
complete body) and ends with the leader's usage, or with a failure, after which it tries again
(as leader, or following a new one).

In one process, leader and followers share a ``Flight`` (a list of messages and an event). Across
processes, the leader's process also appends each message to a Redis stream
(``<prefix>:rcf:<lease token>``, ``XADD``) and one watcher per flight in each other process reads
it (``XREAD BLOCK``) into a local mirror its followers share; a watcher whose leader's lease is
gone without an end (the leader's process died) fails the mirror, so no follower ever hangs.
Without ``REDIS_URL`` (the embedded mode) flights are this process's only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncGenerator
from typing import Any

import orjson
import redis
from django.conf import settings

from core.money import Usage
from core.runtime import key_prefix, redis_client

log = logging.getLogger(__name__)

Json = dict[str, Any]
Message = tuple[str, Any]  # ("item", stream item) | ("body", answer) | ("end", usage) | ("fail", None)

__all__ = ["Flight", "join", "usage_from", "usage_to"]

LEASE_MS = 10_000  # a leader that stops renewing (its process died) is replaced after this
RENEW_EVERY = 3.0
READ_BLOCK_MS = 500  # below the Redis client's 1 s socket timeout
STREAM_TTL_MS = 120_000
TERMINAL = frozenset({"end", "fail"})

_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"
_RENEW = (
    "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) else return 0 end"
)

_flights: dict[str, Flight] = {}
_gone: dict[str, float] = {}  # tokens of flights this process saw end, until their lease is released


def usage_to(usage: Usage, deployment_id: int | None) -> Json:
    return {
        "usage": [
            usage.prompt_tokens,
            usage.cached_tokens,
            usage.cache_write_tokens,
            usage.completion_tokens,
            usage.reasoning_tokens,
        ],
        "deployment_id": deployment_id,
    }


def usage_from(data: Json) -> tuple[Usage, int | None]:
    prompt, cached, written, completion, reasoning = data["usage"]
    return Usage(prompt, cached, written, completion, reasoning, source="cache"), data.get("deployment_id")


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Flight:
    """One in-flight answer as this process sees it: the leader's own, or a mirror of another's."""

    def __init__(self, key: str, *, leader: bool, token: str = "") -> None:
        self.key = key
        self.leader = leader
        self.token = token
        self.loop = asyncio.get_running_loop()
        self.messages: list[Message] = []
        self.state = "running"  # running | done | failed
        self.work: asyncio.Future[Any] | None = None  # the leader's shielded upstream call
        self.pump: asyncio.Task[None] | None = None  # the leader's upstream stream reader
        self._event = asyncio.Event()
        self._outbox: asyncio.Queue[Message] | None = None
        self._tasks: list[asyncio.Task[None]] = []

    # --- the leader's side ----------------------------------------------------------------------

    def push(self, kind: str, data: Any = None) -> None:
        """A message for the followers (ignored once the flight has ended)."""
        if self.state != "running":
            return
        self.messages.append((kind, data))
        if kind in TERMINAL:
            self.state = "done" if kind == "end" else "failed"
        if self._outbox is not None:
            self._outbox.put_nowait((kind, data))
        event, self._event = self._event, asyncio.Event()
        event.set()
        if self.state != "running":
            if self.token:
                _gone[self.token] = time.monotonic() + LEASE_MS / 1000
            if _flights.get(self.key) is self:
                del _flights[self.key]

    def end(self, usage: Usage, deployment_id: int | None) -> None:
        self.push("end", usage_to(usage, deployment_id))

    def fail(self) -> None:
        self.push("fail")

    def items(self) -> list[Json]:
        return [data for kind, data in self.messages if kind == "item"]

    def _share(self) -> None:
        """Publish this leader's messages to the other processes and keep its lease alive."""
        self._outbox = asyncio.Queue()
        self._tasks.append(asyncio.ensure_future(self._publish()))
        self._tasks.append(asyncio.ensure_future(self._renew()))

    async def _publish(self) -> None:
        assert self._outbox is not None
        stream = _stream_key(self.token)
        done = False
        while not done:
            batch = [await self._outbox.get()]
            while not self._outbox.empty():
                batch.append(self._outbox.get_nowait())
            try:
                pipe = redis_client().pipeline(transaction=False)
                for kind, data in batch:
                    if kind in TERMINAL:  # the lease goes first: a follower told to go again can lead
                        pipe.eval(_RELEASE, 1, self.key, self.token)
                        done = True
                    pipe.xadd(stream, {"k": kind, "d": orjson.dumps(data)})
                pipe.pexpire(stream, STREAM_TTL_MS)
                await pipe.execute()
            except (redis.RedisError, OSError) as exc:
                # The other processes' followers will see the lease lapse and take over.
                log.warning("coalescing: could not publish to Redis: %s", exc)
        _gone.pop(self.token, None)

    async def _renew(self) -> None:
        while self.state == "running":
            await asyncio.sleep(RENEW_EVERY)
            if self.state != "running":
                return
            try:
                await redis_client().eval(_RENEW, 1, self.key, self.token, LEASE_MS)
            except (redis.RedisError, OSError) as exc:
                log.warning("coalescing: could not renew a lease: %s", exc)

    # --- a mirror of another process's leader -----------------------------------------------------

    async def _watch(self) -> None:
        stream, last = _stream_key(self.token), "0-0"
        try:
            while self.state == "running":
                got: Any = await redis_client().xread({stream: last}, count=500, block=READ_BLOCK_MS)
                if not got:
                    holder = await redis_client().get(self.key)
                    if (holder is None or _text(holder) != self.token) and not await self._drain(stream, last):
                        self.fail()  # the lease lapsed or passed on without an end: the leader is gone
                    continue
                for _, entries in got:
                    for entry_id, fields in entries:
                        last = _text(entry_id)
                        kind = _text(fields.get(b"k", fields.get("k", "")))
                        raw = fields.get(b"d", fields.get("d", b"null"))
                        self.push(kind, orjson.loads(raw))
        except (redis.RedisError, OSError) as exc:
            log.warning("coalescing: lost the leader's stream: %s", exc)
            self.fail()
        finally:
            if self.state == "running":
                self.fail()

    async def _drain(self, stream: str, last: str) -> bool:
        """Read what remains after ``last`` without blocking: whether it reached a terminal message."""
        got: Any = await redis_client().xread({stream: last}, count=10_000)
        for _, entries in got or []:
            for _, fields in entries:
                kind = _text(fields.get(b"k", fields.get("k", "")))
                self.push(kind, orjson.loads(fields.get(b"d", fields.get("d", b"null"))))
        return self.state != "running"

    # --- every follower -------------------------------------------------------------------------

    async def read(self) -> AsyncGenerator[Message, None]:
        """The flight's messages from the first, as they come, up to and including its end or failure."""
        index = 0
        while True:
            while index < len(self.messages):
                message = self.messages[index]
                index += 1
                yield message
                if message[0] in TERMINAL:
                    return
            await self._event.wait()

    async def close(self) -> None:
        """The leader is done with its flight (ended, or failed if it had not): let it go."""
        if self.state == "running":
            self.fail()
        if _flights.get(self.key) is self:
            del _flights[self.key]
        publisher = self._tasks[0] if self._tasks else None
        for task in self._tasks[1:]:
            task.cancel()
        if publisher is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(publisher), 5.0)


def _stream_key(token: str) -> str:
    return f"{key_prefix()}:rcf:{token}"


def lease_key(space: str, model_part: str, digest: str) -> str:
    return f"{key_prefix()}:rcl:{space}:{model_part}:{digest}"


def _local(key: str) -> Flight | None:
    flight = _flights.get(key)
    if flight is None or flight.state != "running" or flight.loop is not asyncio.get_running_loop():
        return None
    return flight


async def join(key: str) -> tuple[Flight, bool] | None:
    """The flight of this lease key, and whether this request leads it (else it follows the one
    in the air). None when coalescing cannot be arranged (Redis unreachable): the request goes alone.
    """
    flight = _local(key)
    if flight is not None:
        return flight, False
    if not settings.REDIS_URL:
        flight = _flights[key] = Flight(key, leader=True)
        return flight, True
    token = os.urandom(12).hex()
    now = time.monotonic()
    for gone, until in list(_gone.items()):
        if until < now:
            del _gone[gone]
    try:
        for _ in range(400):
            if await redis_client().set(key, token, nx=True, px=LEASE_MS):
                flight = _flights[key] = Flight(key, leader=True, token=token)
                flight._share()
                return flight, True
            holder = await redis_client().get(key)
            if holder is None:
                continue  # released between the two commands: try to lead again
            if _text(holder) in _gone:
                await asyncio.sleep(0.005)  # a flight that ended here: its lease is about to go
                continue
            flight = _local(key)  # another request of this process may have set up the mirror
            if flight is not None:
                return flight, False
            flight = _flights[key] = Flight(key, leader=False, token=_text(holder))
            flight._tasks.append(asyncio.ensure_future(flight._watch()))
            return flight, False
    except (redis.RedisError, OSError) as exc:
        log.warning("coalescing unavailable (Redis): %s", exc)
    return None
