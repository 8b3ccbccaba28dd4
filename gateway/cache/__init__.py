"""The exact response cache: keys, and the store (Redis, or this process in the embedded mode).

An entry is one complete, successful answer of one tenant to one request, stored under
``<prefix>:rc:<tenant id>:<model digest>:<request digest>``: every gateway process shares the
Redis key space, and a tenant's entries (every key of the tenant shares them) can be counted and
dropped by model or all at once. Without ``REDIS_URL`` the entries live in a bounded in-process
LRU with a TTL per entry (``cachetools.TLRUCache``). docs/caching.md.
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
import redis
from asgiref.sync import sync_to_async
from cachetools import TLRUCache
from django.conf import settings

from core.money import Usage
from core.runtime import key_prefix, redis_client
from gateway.cache import coalesce
from gateway.errors import AuthenticationFailed, InvalidRequest
from tenants.keyinfo import KeyInfo
from tenants.models import Tenant

log = logging.getLogger(__name__)

Json = dict[str, Any]

__all__ = [
    "GLOBAL_SPACE",
    "MANAGEMENT_PREFIX",
    "IGNORED_FIELDS",
    "Entry",
    "MemoryStore",
    "RedisStore",
    "Selection",
    "clear_memory",
    "invalidate",
    "lease_key",
    "lookup",
    "management_scope",
    "management_token_check",
    "prompt_text",
    "request_digest",
    "shared",
    "space_for",
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
    prompt: str = ""  # the request's prompt text, for invalidation by a pattern over it

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
                "prompt": self.prompt,
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
            prompt=data.get("prompt") or "",
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


def _key(space: str, model: str, digest: str) -> str:
    return f"{key_prefix()}:rc:{space}:{_model_part(model)}:{digest}"


def lease_key(space: str, model: str, digest: str) -> str:
    """The coalescing lease of one cache key (``gateway.cache.coalesce``)."""
    return coalesce.lease_key(space, _model_part(model), digest)


def prompt_text(endpoint: str, body: Json) -> str:
    """The request's prompt as text (what an invalidation ``pattern`` is matched against): the
    messages' text parts (the system prompt first on ``/v1/messages``), the legacy prompt or the
    embeddings input, joined by newlines."""
    parts: list[str] = []

    def add(value: Any) -> None:
        if isinstance(value, str):
            parts.append(value)
        elif isinstance(value, list):
            for part in value:
                if isinstance(part, dict):
                    add(part.get("text") if part.get("type", "text") == "text" else None)
                else:
                    add(part)

    if endpoint in ("chat", "messages"):
        add(body.get("system"))
        for message in body.get("messages") or []:
            if isinstance(message, dict):
                add(message.get("content"))
    else:
        add(body.get("prompt") if endpoint == "completions" else body.get("input"))
    return "\n".join(parts)


def space_for(key: KeyInfo) -> str:
    """Whose entries a key's requests read and write: its tenant's (the default), its own (the
    tenant's scope narrowed to the key), an ancestor tenant's (shared up the tree) or everyone's."""
    scope = key.tenant.cache_scope
    if key.cache_own or scope == "key":
        return f"{key.tenant.id}.k{key.id}"
    if scope == "global":
        return GLOBAL_SPACE
    if scope == "tree":
        return str(key.root_id)
    return str(key.tenant.id)


GLOBAL_SPACE = "global"


def enabled_ttl(model_ttl: int, model_ttl_setting: int, key: KeyInfo) -> int:
    """Seconds this key's answers of a model are kept (0: the cache is off for them). The key
    decides first, then its tenant and the tenant's ancestors (nearest first), then the model;
    turned on above the model, the model's TTL setting applies."""
    decided = key.cache_enabled
    if decided is None:
        decided = next((t.cache_enabled for t in key.lineage if t.cache_enabled is not None), None)
    if decided is None:
        return model_ttl
    return (model_ttl or model_ttl_setting) if decided else 0


MANAGEMENT_PREFIX = "ccm_"

#: Set by the control app (``control.apps``): whether a management token is valid. The gateway
#: sits below the control plane, so the check is handed down rather than imported.
management_token_check: Callable[[str], bool] | None = None


async def management_scope(token: str, tenant: Any) -> tuple[int, ...] | None:
    """The tenants a management token's invalidation covers: one (``tenant``, a slug) or all (None)."""
    check = management_token_check
    if check is None or not await sync_to_async(check)(token):
        raise AuthenticationFailed("Invalid management token.")
    if tenant is None:
        return None
    if not isinstance(tenant, str) or not tenant:
        raise InvalidRequest("tenant: must be a tenant slug", param="tenant")
    found = await Tenant.objects.filter(slug=tenant).values_list("pk", flat=True).afirst()
    if found is None:
        raise InvalidRequest(f"tenant: no tenant {tenant!r}", param="tenant")
    return (found,)


@dataclass(frozen=True, slots=True)
class Selection:
    """Which entries an invalidation (or a count) takes: of some tenants (``None``: every entry,
    for staff and management tokens), optionally of one public model, whose cache key starts with
    ``key_prefix``, and whose prompt matches the glob ``pattern`` (``fnmatch``, case-sensitive)."""

    tenant_ids: tuple[int, ...] | None
    model: str | None = None
    key_prefix: str = ""
    pattern: str | None = None

    def key_patterns(self) -> list[str]:
        model = _model_part(self.model) if self.model is not None else "*"
        tail = f"{model}:{self.key_prefix}*"
        base = f"{key_prefix()}:rc:"
        if self.tenant_ids is None:
            return [f"{base}*:{tail}"]
        # A tenant's own entries, and those of its keys narrowed to their own (``<tenant>.k<key>``).
        return [p for t in self.tenant_ids for p in (f"{base}{t}:{tail}", f"{base}{t}.k*:{tail}")]


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

    async def get_many(self, keys: list[str]) -> list[bytes | None]:
        return [await self.get(k) for k in keys]

    async def set(self, key: str, raw: bytes, ttl: int) -> None:
        with self._lock:
            self._entries[key] = (time.time() + ttl, raw)

    async def keys(self, pattern: str) -> list[str]:
        with self._lock:
            self._entries.expire()
            return [k for k in self._entries.keys() if fnmatch.fnmatchcase(k, pattern)]

    async def delete(self, keys: list[str]) -> int:
        with self._lock:
            return sum(1 for k in keys if self._entries.pop(k, None) is not None)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


class RedisStore:
    """The production store: one key space shared by every gateway process."""

    async def get(self, key: str) -> bytes | None:
        got = await redis_client().get(key)
        return got.encode() if isinstance(got, str) else got

    async def get_many(self, keys: list[str]) -> list[bytes | None]:
        found: list[bytes | None] = []
        for start in range(0, len(keys), _SCAN_BATCH):
            got = await redis_client().mget(keys[start : start + _SCAN_BATCH])
            found.extend(v.encode() if isinstance(v, str) else v for v in got)
        return found

    async def set(self, key: str, raw: bytes, ttl: int) -> None:
        await redis_client().set(key, raw, ex=ttl)

    async def keys(self, pattern: str) -> list[str]:
        return [
            k.decode() if isinstance(k, bytes) else str(k)
            async for k in redis_client().scan_iter(match=pattern, count=_SCAN_BATCH)
        ]

    async def delete(self, keys: list[str]) -> int:
        removed = 0
        for start in range(0, len(keys), _SCAN_BATCH):
            removed += int(await redis_client().unlink(*keys[start : start + _SCAN_BATCH]))
        return removed


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


async def lookup(space: str, model: str, digest: str, store_: Store | None = None) -> Entry | None:
    """The space's cached answer to this request, or None (also when Redis cannot be reached)."""
    try:
        raw = await (store_ or _store()).get(_key(space, model, digest))
    except (redis.RedisError, OSError) as exc:
        log.warning("response cache unreachable on lookup: %s", exc)
        return None
    return Entry.decode(raw) if raw is not None else None


async def store(space: str, model: str, digest: str, entry: Entry, ttl: int, store_: Store | None = None) -> bool:
    """Keep an answer for ``ttl`` seconds; False when it is over the size cap or Redis failed."""
    raw = entry.encode()
    if len(raw) > settings.CHITTYCAN_CACHE_MAX_BYTES:
        return False
    try:
        await (store_ or _store()).set(_key(space, model, digest), raw, ttl)
    except (redis.RedisError, OSError) as exc:
        log.warning("response cache unreachable on store: %s", exc)
        return False
    return True


async def _selected(selection: Selection, store_: Store) -> list[str]:
    keys = sorted({k for pattern in selection.key_patterns() for k in await store_.keys(pattern)})
    if selection.pattern is None or not keys:
        return keys
    chosen = []
    for k, raw in zip(keys, await store_.get_many(keys), strict=True):
        if raw is not None and fnmatch.fnmatchcase(Entry.decode(raw).prompt, selection.pattern):
            chosen.append(k)
    return chosen


async def invalidate(selection: Selection, store_: Store | None = None) -> int:
    """Drop the selected entries: how many went."""
    chosen = store_ or _store()
    return await chosen.delete(await _selected(selection, chosen))


async def stats(selection: Selection, store_: Store | None = None) -> int:
    """How many entries the selection holds."""
    return len(await _selected(selection, store_ or _store()))
