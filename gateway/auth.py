"""Stage 2, authenticate: ``Authorization: Bearer`` or ``x-api-key``.

Keys are looked up by their public prefix and verified by HMAC in constant time. The verified key
and its tenant chain (``tenants.keyinfo``) are cached in-process for ``CHITTYCAN_AUTH_CACHE_TTL``
seconds and dropped at once when a key or tenant changes (``core.invalidation``), so the warm path
runs no database query. Budgets are not loaded here: the reserve stage asks ``budgets.service``.
"""

from __future__ import annotations

import hmac
import time

from asgiref.sync import sync_to_async
from cachetools import TTLCache
from django.conf import settings

from core import invalidation
from gateway.errors import AuthenticationFailed, PermissionDenied
from tenants import keys, services
from tenants.keyinfo import KeyInfo, load_key

_MISSING = "Missing API key. Send it as 'Authorization: Bearer <key>' or 'x-api-key: <key>'."
_INVALID = "Incorrect API key provided."


class _Entry:
    """A cached key (None: no key has this prefix), and the token that last verified against it:
    the same token again (every request of a client) is recognised by a constant-time comparison
    instead of the format check and the HMAC (~7 µs). It lives and dies with the entry."""

    __slots__ = ("info", "verified")

    def __init__(self, info: KeyInfo | None) -> None:
        self.info = info
        self.verified = b""


#: Keys by prefix: an LRU bounded in size, each entry kept for CHITTYCAN_AUTH_CACHE_TTL seconds,
#: dropped at once when configuration changes.
_cache: TTLCache[str, _Entry] = TTLCache(maxsize=100_000, ttl=settings.CHITTYCAN_AUTH_CACHE_TTL)
#: Bumped by every invalidation: a key read from the database before a change (a revocation) that
#: lands after it is not cached, or the revoked key would be served from the cache for a TTL.
_generation = 0


@invalidation.subscribe
def invalidate() -> None:
    global _generation
    _generation += 1
    _cache.clear()


def bearer_token(headers: dict[bytes, bytes]) -> str:
    raw = headers.get(b"authorization")
    if raw:
        scheme, _, token = raw.decode("latin-1").partition(" ")
        if scheme.lower() == "bearer":
            return token.strip()
    raw = headers.get(b"x-api-key")
    return raw.decode("latin-1").strip() if raw else ""


async def authenticate(token: str) -> KeyInfo:
    if not token:
        raise AuthenticationFailed(_MISSING, code="missing_api_key")
    prefix = keys.key_prefix(token)
    raw = token.encode()
    try:
        entry: _Entry | None = _cache[prefix]
    except KeyError:
        entry = None
    if entry is not None and entry.info is not None and hmac.compare_digest(entry.verified, raw):
        return _unexpired(entry.info)
    if not keys.looks_valid(token):
        raise AuthenticationFailed(_INVALID)
    if entry is None:
        generation = _generation
        entry = _Entry(await sync_to_async(load_key, thread_sensitive=False)(prefix))
        if generation == _generation:  # else a change landed meanwhile: served, not kept
            _cache[prefix] = entry
    info = entry.info
    if info is None or not keys.verify_key(token, info.hashed):
        raise AuthenticationFailed(_INVALID)
    entry.verified = raw
    return _unexpired(info)


def _unexpired(info: KeyInfo) -> KeyInfo:
    if info.expires_at is not None and info.expires_at <= time.time():
        raise AuthenticationFailed("This API key has expired.", code="expired_api_key")
    return info


def check_endpoint(key: KeyInfo, endpoint: str) -> None:
    if not key.allows_endpoint(endpoint):
        raise PermissionDenied(f"This API key may not use the {endpoint} endpoint.", code="endpoint_not_allowed")


# --- passthrough mode -------------------------------------------------------------------------

_passthrough: dict[str, KeyInfo] = {}


@invalidation.subscribe
def forget_passthrough_key() -> None:
    """Drop the cached passthrough key (its tenant's budgets or limits may have changed)."""
    _passthrough.clear()


def _passthrough_key_sync() -> KeyInfo:
    tenant = services.passthrough_tenant()
    key = services.passthrough_api_key(tenant)
    info = load_key(key.prefix)
    assert info is not None
    return info


async def passthrough_key() -> KeyInfo:
    """The key passthrough requests are metered under (created on first use)."""
    found = _passthrough.get("key")
    if found is None:
        found = _passthrough["key"] = await sync_to_async(_passthrough_key_sync, thread_sensitive=False)()
    return found
