"""The exact response cache: keys, and the store (Redis, or this process in the embedded mode).

An entry is one complete, successful answer of one tenant to one request, stored under
``<prefix>:rc:<tenant id>:<model digest>:<request digest>``: every gateway process shares the
Redis key space, and a tenant's entries (every key of the tenant shares them) can be counted and
dropped by model or all at once. Without ``REDIS_URL`` the entries live in a bounded in-process
LRU with a TTL per entry (``cachetools.TLRUCache``). docs/caching.md.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import orjson
import redis
from cachetools import TLRUCache
from django.conf import settings

from core.money import Usage
from core.runtime import redis_client

log = logging.getLogger(__name__)

Json = dict[str, Any]

__all__ = [
    "IGNORED_FIELDS",
    "Entry",
    "MemoryStore",
    "RedisStore",
    "clear_memory",
    "invalidate",
    "lookup",
    "request_digest",
    "shared",
    "stats",
    "store",
]

#: Body fields that cannot change the answer (or are the model, keyed after aliasing): not keyed.
IGNORED_FIELDS = frozenset({"model", "user", "safety_identifier", "metadata", "stream", "stream_options"})

_SCAN_BATCH = 500


@dataclass(slots=True)
class Entry:
    """One cached answer: its complete body or its stream items, and what it used."""

    endpoint: str
    stored_at: float
    usage: Usage
    body: Json | None = None
    items: list[Json] | None = None
    deployment_id: int | None = None

    def encode(self) -> bytes:
        usage = self.usage
        return orjson.dumps(
            {
                "endpoint": self.endpoint,
                "stored_at": self.stored_at,
                "usage": [
                    usage.prompt_tokens,
                    usage.cached_tokens,
                    usage.cache_write_tokens,
                    usage.completion_tokens,
                    usage.reasoning_tokens,
                ],
                "body": self.body,
                "items": self.items,
                "deployment_id": self.deployment_id,
            }
        )

    @classmethod
    def decode(cls, raw: bytes) -> Entry:
        data = orjson.loads(raw)
        prompt, cached, written, completion, reasoning = data["usage"]
        return cls(
            endpoint=data["endpoint"],
            stored_at=float(data["stored_at"]),
            usage=Usage(prompt, cached, written, completion, reasoning, source="cache"),
            body=data.get("body"),
            items=data.get("items"),
            deployment_id=data.get("deployment_id"),
        )


def _canonical(value: Any) -> Any:
    """Numbers as JSON means them (``1.0`` is ``1``); the rest as is (keys are sorted on dump)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _canonical(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_canonical(v) for v in value]
    return value


def request_digest(endpoint: str, model: str, body: Json, headers: dict[str, str] | None = None) -> str:
    """sha256 of the canonical JSON (sorted keys, no whitespace) of what can change the answer:
    the route, the public model (after aliasing), every body field but ``IGNORED_FIELDS`` and the
    forwarded upstream headers (``anthropic-beta``)."""
    keyed = {k: v for k, v in body.items() if k not in IGNORED_FIELDS}
    material = {"endpoint": endpoint, "model": model, "body": _canonical(keyed), "headers": headers or {}}
    return hashlib.sha256(orjson.dumps(material, option=orjson.OPT_SORT_KEYS)).hexdigest()


def _model_part(model: str) -> str:
    return hashlib.sha256(model.encode()).hexdigest()[:24]


def _prefix(tenant_id: int) -> str:
    return f"{settings.REDIS_PREFIX}:rc:{tenant_id}:"


def _key(tenant_id: int, model: str, digest: str) -> str:
    return f"{_prefix(tenant_id)}{_model_part(model)}:{digest}"


# --- the stores ---------------------------------------------------------------------------------------


def _expires(_key: str, value: tuple[float, bytes], now: float) -> float:
    return value[0]


class MemoryStore:
    """The embedded mode's store: this process's bounded LRU, each entry with its own expiry."""

    def __init__(self, max_entries: int) -> None:
        self._lock = threading.Lock()
        self._entries: TLRUCache[str, tuple[float, bytes]] = TLRUCache(
            maxsize=max(1, max_entries), ttu=_expires, timer=time.time
        )

    async def get(self, key: str) -> bytes | None:
        with self._lock:
            found = self._entries.get(key)
        return found[1] if found is not None else None

    async def set(self, key: str, raw: bytes, ttl: int) -> None:
        with self._lock:
            self._entries[key] = (time.time() + ttl, raw)

    def _keys(self, pattern: str) -> list[str]:
        start = pattern.removesuffix("*")
        with self._lock:
            self._entries.expire()
            return [k for k in self._entries.keys() if k.startswith(start)]

    async def delete_matching(self, pattern: str) -> int:
        keys = self._keys(pattern)
        with self._lock:
            return sum(1 for k in keys if self._entries.pop(k, None) is not None)

    async def count_matching(self, pattern: str) -> int:
        return len(self._keys(pattern))

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


class RedisStore:
    """The production store: one key space shared by every gateway process."""

    async def get(self, key: str) -> bytes | None:
        got = await redis_client().get(key)
        return got.encode() if isinstance(got, str) else got

    async def set(self, key: str, raw: bytes, ttl: int) -> None:
        await redis_client().set(key, raw, ex=ttl)

    async def delete_matching(self, pattern: str) -> int:
        conn = redis_client()
        removed = 0
        batch: list[bytes] = []
        async for key in conn.scan_iter(match=pattern, count=_SCAN_BATCH):
            batch.append(key)
            if len(batch) >= _SCAN_BATCH:
                removed += int(await conn.unlink(*batch))
                batch = []
        if batch:
            removed += int(await conn.unlink(*batch))
        return removed

    async def count_matching(self, pattern: str) -> int:
        count = 0
        async for _ in redis_client().scan_iter(match=pattern, count=_SCAN_BATCH):
            count += 1
        return count


Store = MemoryStore | RedisStore

_memory = MemoryStore(settings.CHITTYCAN_CACHE_MEMORY_ENTRIES)
_redis = RedisStore()


def shared() -> bool:
    """Whether the entries are shared by every gateway process (Redis) or this process's own."""
    return bool(settings.REDIS_URL)


def _store() -> Store:
    return _redis if shared() else _memory


def clear_memory() -> None:
    _memory.clear()


# --- the operations -----------------------------------------------------------------------------------


def _pattern(tenant_id: int, model: str | None) -> str:
    return f"{_prefix(tenant_id)}{_model_part(model)}:*" if model is not None else f"{_prefix(tenant_id)}*"


async def lookup(tenant_id: int, model: str, digest: str, store_: Store | None = None) -> Entry | None:
    """The tenant's cached answer to this request, or None (also when Redis cannot be reached)."""
    try:
        raw = await (store_ or _store()).get(_key(tenant_id, model, digest))
    except (redis.RedisError, OSError) as exc:
        log.warning("response cache unreachable on lookup: %s", exc)
        return None
    return Entry.decode(raw) if raw is not None else None


async def store(tenant_id: int, model: str, digest: str, entry: Entry, ttl: int, store_: Store | None = None) -> bool:
    """Keep an answer for ``ttl`` seconds; False when it is over the size cap or Redis failed."""
    raw = entry.encode()
    if len(raw) > settings.CHITTYCAN_CACHE_MAX_BYTES:
        return False
    try:
        await (store_ or _store()).set(_key(tenant_id, model, digest), raw, ttl)
    except (redis.RedisError, OSError) as exc:
        log.warning("response cache unreachable on store: %s", exc)
        return False
    return True


async def invalidate(tenant_id: int, model: str | None = None, store_: Store | None = None) -> int:
    """Drop the tenant's entries (of one public model, or all): how many went."""
    return await (store_ or _store()).delete_matching(_pattern(tenant_id, model))


async def stats(tenant_id: int, model: str | None = None, store_: Store | None = None) -> int:
    """How many entries the tenant has (of one public model, or all)."""
    return await (store_ or _store()).count_matching(_pattern(tenant_id, model))
