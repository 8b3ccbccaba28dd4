"""Requests in flight per deployment, for the ``least_in_flight`` strategy, shared by every
gateway process through Redis.

An upstream attempt counts from its start to its end (a stream: until the relay closes it), on a
route whose strategy is ``least_in_flight`` (other routes pay nothing). With Redis, each attempt is
a member of the deployment's sorted set (``<prefix>:inflight:{<breaker id>}``) scored with its own
expiry: the attempt's total time limit, else ``LEASE`` seconds. The count is the members not yet
expired, so an attempt whose process crashed stops counting at its expiry even while the
deployment keeps busy (a plain counter's key TTL would be refreshed by every new attempt and keep a
crashed process's increments forever); the key itself expires ``LEASE`` seconds after its last
attempt started. Without Redis (embedded mode) the counts are this process's. If Redis fails the
counts read as zero and the strategy falls back to its weighted tie-break: never an error.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass

from django.conf import settings

from core import runtime
from gateway.routing.breaker import REDIS_ERRORS

log = logging.getLogger(__name__)

#: Seconds an attempt without a total time limit counts at most (and the key's idle TTL).
LEASE = 600.0

_local: dict[str, int] = {}


@dataclass(frozen=True, slots=True)
class Slot:
    """One attempt in flight on the deployment ``key`` (``member``: its entry in Redis)."""

    key: str
    member: str = ""


def redis_key(key: str) -> str:
    return f"{runtime.key_prefix()}:inflight:{{{key}}}"


async def start(key: str, lease: float | None = None) -> Slot:
    """Count an attempt on the deployment ``key`` (its breaker id) until ``end``."""
    if not settings.REDIS_URL:
        _local[key] = _local.get(key, 0) + 1
        return Slot(key)
    member = secrets.token_hex(8)
    seconds = lease if lease is not None and lease > 0 else LEASE
    now = time.time()
    try:
        async with runtime.redis_client().pipeline(transaction=False) as pipe:
            pipe.zremrangebyscore(redis_key(key), "-inf", now)
            pipe.zadd(redis_key(key), {member: now + seconds})
            pipe.pexpire(redis_key(key), int(max(seconds, LEASE) * 1000))
            await pipe.execute()
    except REDIS_ERRORS as exc:
        log.warning("in-flight count not written", extra={"deployment": key, "error": str(exc)})
        return Slot(key, "")
    return Slot(key, member)


async def end(slot: Slot) -> None:
    """The attempt ended (call it in a ``finally``, shielded from cancellation)."""
    if not settings.REDIS_URL:
        left = _local.get(slot.key, 0) - 1
        if left > 0:
            _local[slot.key] = left
        else:
            _local.pop(slot.key, None)
        return
    if not slot.member:
        return
    try:
        await runtime.redis_client().zrem(redis_key(slot.key), slot.member)
    except REDIS_ERRORS as exc:
        log.warning("in-flight count not released", extra={"deployment": slot.key, "error": str(exc)})


async def counts(keys: Iterable[str]) -> dict[str, int]:
    """The attempts in flight on each deployment (one Redis round trip for all of them)."""
    wanted = list(dict.fromkeys(keys))
    if not settings.REDIS_URL:
        return {k: _local.get(k, 0) for k in wanted}
    if not wanted:
        return {}
    now = time.time()
    try:
        async with runtime.redis_client().pipeline(transaction=False) as pipe:
            for k in wanted:
                pipe.zcount(redis_key(k), f"({now}", "+inf")
            raw = await pipe.execute()
    except REDIS_ERRORS as exc:
        log.warning("in-flight counts unreadable", extra={"error": str(exc)})
        return dict.fromkeys(wanted, 0)
    return {k: int(v or 0) for k, v in zip(wanted, raw, strict=True)}


def reset_local() -> None:
    """Forget this process's counts (tests)."""
    _local.clear()
