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


#: Verified keys (and unknown prefixes, as None) by prefix: an LRU bounded in size, each entry
#: kept for CHITTYCAN_AUTH_CACHE_TTL seconds, dropped at once when configuration changes.
_cache: TTLCache[str, KeyInfo | None] = TTLCache(maxsize=100_000, ttl=settings.CHITTYCAN_AUTH_CACHE_TTL)
#: Bumped by every invalidation: a key read from the database before a change (a revocation) that
#: lands after it is not cached, or the revoked key would be served from the cache for a TTL.
_generation = 0
#: The token that last verified against each cached key, by prefix, with the ``KeyInfo`` it verified
#: against: the same key again (every request of a client) skips the format check and the HMAC
#: (~7 µs) for a constant-time comparison. Valid only while that ``KeyInfo`` is still the cached
#: one (a reload, a TTL expiry or an invalidation makes a new one); cleared with the cache.
_verified: dict[str, tuple[bytes, KeyInfo]] = {}


@invalidation.subscribe
def invalidate() -> None:
    global _generation
    _generation += 1
    _cache.clear()
    _verified.clear()


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
    try:
        info = _cache[prefix]
        cached = True
    except KeyError:
        info, cached = None, False
    raw = token.encode()
    if info is not None:
        seen = _verified.get(prefix)
        if seen is not None and seen[1] is info and hmac.compare_digest(seen[0], raw):
            return _unexpired(info)
    if not keys.looks_valid(token):
        raise AuthenticationFailed(_INVALID)
    if not cached:
        generation = _generation
        info = await sync_to_async(load_key, thread_sensitive=False)(prefix)
        cached = generation == _generation  # else a change landed meanwhile: served, not kept
        if cached:
            _cache[prefix] = info
    if info is None or not keys.verify_key(token, info.hashed):
        raise AuthenticationFailed(_INVALID)
    if cached:
        if len(_verified) >= _MAX_VERIFIED:
            _verified.clear()
        _verified[prefix] = (raw, info)
    return _unexpired(info)


_MAX_VERIFIED = 100_000  # as the cache's size


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
