"""Stage 2, authenticate: ``Authorization: Bearer`` or ``x-api-key``.

Keys are looked up by their public prefix and verified by HMAC in constant time. The verified key
and its tenant chain (``tenants.keyinfo``) are cached in-process for ``CHITTYCAN_AUTH_CACHE_TTL``
seconds and dropped at once when a key or tenant changes (``core.invalidation``), so the warm path
runs no database query. Budgets are not loaded here: the reserve stage asks ``budgets.service``.
"""

from __future__ import annotations

import time

from asgiref.sync import sync_to_async
from django.conf import settings

from core import invalidation
from gateway.errors import AuthenticationFailed, PermissionDenied
from tenants import keys
from tenants.keyinfo import KeyInfo, load_key

_MISSING = "Missing API key. Send it as 'Authorization: Bearer <key>' or 'x-api-key: <key>'."
_INVALID = "Incorrect API key provided."


_cache: dict[str, tuple[float, KeyInfo | None]] = {}
_CACHE_MAX = 100_000


@invalidation.subscribe
def invalidate() -> None:
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
    if not keys.looks_valid(token):
        raise AuthenticationFailed(_INVALID)
    prefix = keys.key_prefix(token)
    now = time.monotonic()
    cached = _cache.get(prefix)
    if cached is not None and now - cached[0] < settings.CHITTYCAN_AUTH_CACHE_TTL:
        info = cached[1]
    else:
        info = await sync_to_async(load_key, thread_sensitive=False)(prefix)
        if len(_cache) >= _CACHE_MAX:
            _cache.clear()
        _cache[prefix] = (now, info)
    if info is None or not keys.verify_key(token, info.hashed):
        raise AuthenticationFailed(_INVALID)
    if info.expires_at is not None and info.expires_at <= time.time():
        raise AuthenticationFailed("This API key has expired.", code="expired_api_key")
    return info


def check_endpoint(key: KeyInfo, endpoint: str) -> None:
    if not key.allows_endpoint(endpoint):
        raise PermissionDenied(f"This API key may not use the {endpoint} endpoint.", code="endpoint_not_allowed")
