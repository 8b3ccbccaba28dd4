"""Per-process runtime: the async Redis client and the background tasks a gateway process runs.

Background tasks start lazily on the first request (daphne has no ASGI lifespan), are tracked,
and restart if they die. Everything is per event loop so tests can run several loops.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import weakref
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import hiredis
import redis
import redis.asyncio as aioredis
from django.conf import settings
from django.core.signals import setting_changed
from redis.commands.core import AsyncScript

from core import backoff, dbsafe, invalidation

log = logging.getLogger(__name__)

# Per event loop, held weakly by the loop (tests and the benchmark run several loops in a process).
_redis: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, aioredis.Redis] = weakref.WeakKeyDictionary()
_last_redis: tuple[asyncio.AbstractEventLoop, aioredis.Redis] | None = None
_tasks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, asyncio.Task[None]]] = (
    weakref.WeakKeyDictionary()
)
_starters: list[tuple[str, Callable[[], Coroutine[Any, Any, None]]]] = []
_freeze_scheduled = False
#: Seconds after the first request before the second ``freeze_heap`` (caches are warm by then).
FREEZE_AFTER_WARMUP = 5.0


@functools.cache
def key_prefix() -> str:
    """``REDIS_PREFIX``, read once: a request builds about fifteen Redis keys, and each read of
    ``django.conf.settings`` costs ~0.2 µs (``LazyObject.__getattribute__``). A change made with
    ``override_settings`` is seen (``setting_changed``)."""
    return str(settings.REDIS_PREFIX)


def _prefix_changed(*, setting: str, **kwargs: Any) -> None:
    if setting == "REDIS_PREFIX":
        key_prefix.cache_clear()


setting_changed.connect(_prefix_changed, dispatch_uid="chittycan_redis_key_prefix")


def freeze_heap() -> None:
    """Move every object alive now to the collector's permanent generation (``gc.freeze``).

    Start-up leaves a few hundred thousand long-lived objects (Django, the app, the route table);
    without this every full collection walks all of them, a pause of tens of milliseconds that
    lands on whichever requests are in flight. Runs when the ASGI app is built and once more a
    few seconds after the first request. ``CHITTYCAN_GC_FREEZE=false`` turns it off.
    """
    if settings.CHITTYCAN_GC_FREEZE:
        gc.collect()
        gc.freeze()


class _HiredisPacking:
    """Commands packed into the Redis protocol by hiredis (C) instead of redis-py's asyncio
    connection, which builds each command in Python byte string by byte string: with a dozen
    arguments per budget script, that was ~4 % of a gateway's CPU per request. Same bytes out.
    Also sends them without a task per write (``send_packed_command``)."""

    def pack_command(self, *args: Any) -> list[bytes]:
        first = args[0]
        if isinstance(first, str) and " " in first:  # "CONFIG GET": the server wants two words
            args = (*first.split(), *args[1:])
        elif isinstance(first, bytes) and b" " in first:
            args = (*first.split(), *args[1:])
        return [hiredis.pack_command(args)]

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        """redis-py's, with the write bounded only when it can wait: once the kernel has taken
        every byte (the usual case: a few hundred bytes on an idle socket), the stream's drain
        returns at once, so it needs no timer; otherwise ``asyncio.timeout`` (not
        ``asyncio.wait_for``, which wraps the write in a task of its own). Same outcomes: a write
        that times out or fails drops the connection and raises redis-py's error."""
        conn: Any = self
        if not conn.is_connected:
            await conn.connect_check_health(check_health=False)
        if check_health:
            await conn.check_health()
        if isinstance(command, str):
            command = command.encode()
        if isinstance(command, bytes):
            command = [command]
        try:
            writer = conn._writer
            writer.writelines(command)
            transport = writer.transport
            if transport.get_write_buffer_size() or transport.is_closing():
                async with asyncio.timeout(conn.socket_timeout or None):
                    await writer.drain()
            else:
                await writer.drain()  # cannot wait (nothing is buffered); raises a reader's error
        except TimeoutError:
            await conn.disconnect(nowait=True)
            raise redis.TimeoutError("Timeout writing to socket") from None
        except OSError as exc:
            await conn.disconnect(nowait=True)
            number, message = ("UNKNOWN", exc.args[0]) if len(exc.args) == 1 else exc.args[:2]
            raise redis.ConnectionError(f"Error {number} while writing to socket. {message}.") from exc
        except BaseException:
            # A write cut short (cancelled): what was sent cannot be taken back, so the connection goes.
            await conn.disconnect(nowait=True)
            raise


_packing_classes: dict[type[Any], type[Any]] = {}


def _with_hiredis_packing(pool: aioredis.ConnectionPool) -> None:
    """Give the pool's connection class (plain, TLS or Unix socket, as the URL chose) hiredis packing."""
    base = pool.connection_class
    fast = _packing_classes.get(base)
    if fast is None:
        fast = _packing_classes[base] = type(f"Hiredis{base.__name__}", (_HiredisPacking, base), {})
    pool.connection_class = fast


class _Pool(aioredis.BlockingConnectionPool):
    """redis-py's bounded pool, with a fast path for the common case: a connection is free and
    nobody is waiting, so it is taken (and given back) without the pool's condition, its timeout
    and its wait-time bookkeeping (~5 % of a gateway's CPU per request, two commands each). A
    connection is still checked (``ensure_connection``) before use. Whenever a request waits, both
    ways go through the parent's condition, so waiters are served in order and always woken."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._waiting = 0

    async def get_connection(self, command_name: Any = None, *keys: Any, **options: Any) -> Any:
        if self._available_connections and not self._waiting:
            connection = self.get_available_connection()  # no await since the check: still free
            try:
                await self.ensure_connection(connection)
            except BaseException:
                await self.release(connection)
                raise
            return connection
        self._waiting += 1
        try:
            return await super().get_connection()  # (its arguments are deprecated and unused)
        finally:
            self._waiting -= 1

    async def release(self, connection: Any) -> None:
        if self._waiting:
            await super().release(connection)  # under the condition, waking a waiter
            return
        await aioredis.ConnectionPool.release(self, connection)
        if self._waiting:  # one started waiting while the connection was being put back
            async with self._condition:
                self._condition.notify()


def redis_client() -> aioredis.Redis:
    """The async Redis client for this event loop. Only valid when REDIS_URL is set."""
    global _last_redis
    loop = asyncio.get_running_loop()
    last = _last_redis
    if last is not None and last[0] is loop:
        return last[1]  # the common case, without a weak reference per call
    conn = _redis.get(loop)
    if conn is None:
        # A bounded pool: a request holds a connection for one short command at a time, so under a
        # burst requests briefly wait for one instead of each opening its own (memory, Redis fds).
        pool = _Pool.from_url(
            settings.REDIS_URL,
            socket_timeout=1.0,
            socket_connect_timeout=1.0,
            health_check_interval=30,
            max_connections=settings.CHITTYCAN_REDIS_MAX_CONNECTIONS,
            timeout=settings.CHITTYCAN_REDIS_POOL_TIMEOUT,
        )
        _with_hiredis_packing(pool)
        conn = _redis[loop] = aioredis.Redis(connection_pool=pool)
    _last_redis = (loop, conn)
    return conn


async def close_redis() -> None:
    """Close this event loop's Redis client (server shutdown, tests)."""
    global _last_redis
    _last_redis = None
    conn = _redis.pop(asyncio.get_running_loop(), None)
    if conn is not None:
        await conn.aclose()


OnError = Callable[[BaseException], Awaitable[None] | None]


Call = tuple[AsyncScript | None, list[Any], list[Any], OnError]


class RedisBatch:
    """Commands one request sends to Redis together, in one round trip (a pipeline, not a
    transaction): each keeps its own outcome, and a command that fails calls its ``on_error``
    (with the whole batch's error if Redis could not be reached).

    The batches of requests that send in the same turn of the event loop leave together, as one
    pipeline on one connection (``_SendGroup``): under load several requests close at once, and
    each round trip saved is a write, a read and two wake-ups of the loop. Each batch still gets
    its own commands' outcomes.

    Scripts go by their SHA; one the server does not know yet (first use, a restarted Redis) is
    run again on its own, which loads it.
    """

    __slots__ = ("_calls",)

    def __init__(self) -> None:
        self._calls: list[Call] = []

    def __len__(self) -> int:
        return len(self._calls)

    def script(self, script: AsyncScript, keys: list[Any], args: list[Any], on_error: OnError) -> None:
        self._calls.append((script, keys, args, on_error))

    def command(self, *args: Any, on_error: OnError) -> None:
        self._calls.append((None, [], list(args), on_error))

    async def send(self) -> None:
        calls, self._calls = self._calls, []
        if not calls:
            return
        results = await _send_group().join(calls)
        for (script, keys, args, on_error), result in zip(calls, results, strict=True):
            if script is not None:
                result = await _loaded_if_unknown(script, keys, args, result)
            if isinstance(result, BaseException):
                outcome = on_error(result)
                if outcome is not None:
                    await outcome


#: ``run_script`` calls sent on their own at once, at most; more in flight share pipelines.
ALONE_MAX = 8


async def run_script(script: AsyncScript, keys: list[Any], args: list[Any]) -> Any:
    """One script call, sent with every other call ready in this turn of the event loop (one
    pipeline on one connection, ``_SendGroup``): under load, requests admitted together share a
    round trip instead of each taking a pooled connection of its own. Returns what the script
    returned; raises what it raised, a Redis error as redis-py would (``redis.ConnectionError``,
    ``redis.TimeoutError``, ``OSError``, ``redis.ResponseError``).

    A call whose awaiting task is cancelled before the pipeline leaves is not sent at all, as a
    direct call cancelled before sending would not be; once sent, it ran (the caller's lease
    covers that, as it does for a direct call).

    With no other call waiting to leave and fewer than ``ALONE_MAX`` sent on their own still
    unanswered (an idle or moderately busy gateway), the call goes at once on its own: a pipeline
    of one or two commands costs more than the commands (a task, a future, redis-py's pipeline
    machinery) and the wait for the end of the turn only adds latency. Past that, the calls of a
    turn share one pipeline, so a burst holds a few connections, not one per request."""
    group = _send_group()
    if not group.busy():
        group.alone += 1
        try:
            return await script(keys=keys, args=args)
        finally:
            group.alone -= 1
    results = await group.join([(script, keys, args, _raised_instead)], droppable=True)
    result = await _loaded_if_unknown(script, keys, args, results[0])
    if isinstance(result, BaseException):
        raise result
    return result


def _raised_instead(exc: BaseException) -> None:
    """The ``on_error`` of a ``run_script`` call, never called: its error is raised to its caller."""


async def _loaded_if_unknown(script: AsyncScript, keys: list[Any], args: list[Any], result: Any) -> Any:
    """A pipelined script's result; if the server did not know the script (first use, a restarted
    Redis), the script run again on its own, which loads it, and that outcome (value or error)."""
    if not isinstance(result, redis.exceptions.NoScriptError):
        return result
    try:
        return await script(keys=keys, args=args)
    except (redis.RedisError, OSError) as exc:
        return exc


class _SendGroup:
    """The ``RedisBatch`` sends and ``run_script`` calls of one event loop that arrive in the same
    turn of it: the first schedules the flush (``call_soon``, so it runs once the requests ready
    now have run), the others join; the flush sends them all as one pipeline and hands each its
    results. A droppable join whose future was cancelled before the flush is left out."""

    __slots__ = ("loop", "waiting", "sending", "alone")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.waiting: list[tuple[list[Call], asyncio.Future[list[Any]], bool]] = []
        self.sending: set[asyncio.Task[None]] = set()
        self.alone = 0  # ``run_script`` calls sent on their own, not answered yet

    def busy(self) -> bool:
        """Whether a call made now should join the group: calls are already waiting for this
        turn's pipeline, or ``ALONE_MAX`` calls sent on their own are still unanswered (a burst).
        A pipeline already on the wire does not count: nothing can join it."""
        return bool(self.waiting) or self.alone >= ALONE_MAX

    def join(self, calls: list[Call], *, droppable: bool = False) -> asyncio.Future[list[Any]]:
        future: asyncio.Future[list[Any]] = self.loop.create_future()
        if not self.waiting:
            self.loop.call_soon(self._flush)
        self.waiting.append((calls, future, droppable))
        return future

    def _flush(self) -> None:
        waiting, self.waiting = self.waiting, []
        batches = [(calls, future) for calls, future, droppable in waiting if not (droppable and future.done())]
        if not batches:
            return
        task = self.loop.create_task(_send_batches(batches))
        self.sending.add(task)  # held until done: the loop keeps only a weak reference to tasks
        task.add_done_callback(self.sending.discard)


async def _send_batches(batches: list[tuple[list[Call], asyncio.Future[list[Any]]]]) -> None:
    results: list[Any]
    try:
        pipe = redis_client().pipeline(transaction=False)
        for calls, _ in batches:
            for script, keys, args, _ in calls:
                if script is None:
                    pipe.execute_command(*args)
                else:
                    pipe.evalsha(script.sha, len(keys), *keys, *args)
        try:
            results = await pipe.execute(raise_on_error=False)
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            results = [exc] * sum(len(calls) for calls, _ in batches)
    except asyncio.CancelledError:  # the loop is closing: so are the sends waiting on it
        for _, future in batches:
            future.cancel()
        raise
    except Exception as exc:  # not Redis being away (that is a result above): each send raises it
        for _, future in batches:
            if not future.done():
                future.set_exception(exc)
        return
    start = 0
    for calls, future in batches:
        if not future.done():  # (its request was cancelled meanwhile)
            future.set_result(results[start : start + len(calls)])
        start += len(calls)


_send_groups: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _SendGroup] = weakref.WeakKeyDictionary()


def _send_group() -> _SendGroup:
    loop = asyncio.get_running_loop()
    group = _send_groups.get(loop)
    if group is None:
        group = _send_groups[loop] = _SendGroup(loop)
    return group


def background(
    name: str,
) -> Callable[[Callable[[], Coroutine[Any, Any, None]]], Callable[[], Coroutine[Any, Any, None]]]:
    """Register a coroutine function to run for the life of each gateway process."""

    def register(fn: Callable[[], Coroutine[Any, Any, None]]) -> Callable[[], Coroutine[Any, Any, None]]:
        _starters.append((name, fn))
        return fn

    return register


async def _supervise(name: str, fn: Callable[[], Coroutine[Any, Any, None]]) -> None:
    failures = 0
    while True:
        try:
            await fn()
            return
        except asyncio.CancelledError:
            raise
        except Exception:
            failures += 1
            wait = backoff.delay(failures - 1, base=1.0, cap=30.0)
            log.exception("background task %s failed; restarting in %.1f s", name, wait)
            await asyncio.sleep(wait)


def ensure_started() -> None:
    global _freeze_scheduled
    loop = asyncio.get_running_loop()
    tasks = _tasks.get(loop)
    if tasks is None:
        tasks = _tasks[loop] = {}
        dbsafe.install(loop)  # ORM calls off the loop recover from a database restart
    if not _freeze_scheduled:
        _freeze_scheduled = True
        loop.call_later(FREEZE_AFTER_WARMUP, freeze_heap)
    for name, fn in _starters:
        task = tasks.get(name)
        if task is None or (task.done() and not _returned(task)):
            tasks[name] = loop.create_task(_supervise(name, fn), name=f"chittycan:{name}")


def _returned(task: asyncio.Task[None]) -> bool:
    """A done background task that returned: it has nothing to do in this process (the embedded
    scheduler when it is off, the budget convergence without Redis) and is not started again on
    every request. One that was cancelled or raised is."""
    return not task.cancelled() and task.exception() is None


def running(name: str) -> bool:
    """Whether this event loop's background task ``name`` is alive (for ``/readyz``)."""
    task = _tasks.get(asyncio.get_running_loop(), {}).get(name)
    return task is not None and not task.done()


async def stop_background() -> None:
    tasks = _tasks.pop(asyncio.get_running_loop(), {})
    for name, task in tasks.items():
        task.cancel()
        try:
            await task
        except (asyncio.CancelledError, Exception):
            log.debug("background task %s stopped", name)


_subscribed_before = False


@background("invalidation")
async def _listen_for_invalidation() -> None:
    """Drop this process's caches when another process announces a change: over Redis pub/sub, or
    in embedded mode by watching the stamp file (see ``core.invalidation``)."""
    if not settings.REDIS_URL:
        await _watch_invalidation_stamp()
        return

    global _subscribed_before
    pubsub = redis_client().pubsub()
    await pubsub.subscribe(invalidation.channel())
    # Announcements made while this process was not subscribed (a Redis restart that killed the
    # previous listener) were missed: start again from fresh caches. The first subscription comes
    # within milliseconds of the first request (which starts this task), so the few entries
    # cached before it are kept: dropping them would make a gateway that has just warmed its
    # caches need the database again (a PostgreSQL outage right after start would refuse keys).
    if _subscribed_before:
        invalidation.drop_local()
    _subscribed_before = True
    try:
        while True:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.5)
            if message is not None:
                invalidation.deliver(message["data"])
    finally:
        await pubsub.aclose()


async def _watch_invalidation_stamp() -> None:
    last = invalidation.stamp()
    while True:
        await asyncio.sleep(invalidation.STAMP_POLL_INTERVAL)
        now = invalidation.stamp()
        if now != last:
            last = now
            invalidation.drop_local()
