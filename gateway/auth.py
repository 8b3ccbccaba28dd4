"""Stage 2, authenticate: ``Authorization: Bearer`` or ``x-api-key``.

Keys are looked up by their public prefix and verified by HMAC in constant time. The verified key
and its tenant chain are cached in-process for ``CHITTYCAN_AUTH_CACHE_TTL`` seconds and dropped at
once when a key, tenant or budget changes (``core.invalidation``), so the warm path runs no
database query.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings

from budgets.periods import BudgetInfo, load_budgets
from core import invalidation
from gateway.errors import AuthenticationFailed, PermissionDenied
from tenants import keys

_MISSING = "Missing API key. Send it as 'Authorization: Bearer <key>' or 'x-api-key: <key>'."
_INVALID = "Incorrect API key provided."


@dataclass(frozen=True, slots=True)
class TenantInfo:
    id: int
    slug: str
    time_zone: str
    rpm_limit: int | None
    tpm_limit: int | None
    monthly_request_quota: int | None


@dataclass(frozen=True, slots=True)
class KeyInfo:
    id: int | None
    prefix: str
    hashed: str
    tenant: TenantInfo
    lineage: tuple[TenantInfo, ...]  # the tenant itself, then its ancestors, nearest first
    models: frozenset[str] | None  # None = every model
    endpoints: frozenset[str] | None  # None = every endpoint
    rpm_limit: int | None
    tpm_limit: int | None
    expires_at: float | None
    budgets: tuple[BudgetInfo, ...] = ()  # the key's, its tenant's and every ancestor's

    @property
    def root_id(self) -> int:
        """The top of the tenant tree: the hash tag all of this tree's counters share."""
        return self.lineage[-1].id

    def allows_model(self, name: str, aliases: tuple[str, ...] = ()) -> bool:
        return self.models is None or name in self.models or any(a in self.models for a in aliases)

    def check_endpoint(self, endpoint: str) -> None:
        if self.endpoints is not None and endpoint not in self.endpoints:
            raise PermissionDenied(f"This API key may not use the {endpoint} endpoint.", code="endpoint_not_allowed")


def _tenant_info(tenant: Any) -> TenantInfo:
    plan = tenant.plan
    return TenantInfo(
        id=tenant.pk,
        slug=tenant.slug,
        time_zone=tenant.time_zone,
        rpm_limit=tenant.rpm_limit if tenant.rpm_limit is not None else (plan.rpm_limit if plan else None),
        tpm_limit=tenant.tpm_limit if tenant.tpm_limit is not None else (plan.tpm_limit if plan else None),
        monthly_request_quota=plan.monthly_request_quota if plan else None,
    )


def _scope_set(values: Any) -> frozenset[str] | None:
    if not values:
        return None
    return frozenset(str(v) for v in values)


def load_key(prefix: str) -> KeyInfo | None:
    """Read a usable key and its tenant chain (synchronous; call off the event loop)."""
    from tenants.models import ApiKey

    key = ApiKey.objects.usable().select_related("tenant__plan", "tenant__parent").filter(prefix=prefix).first()
    if key is None:
        return None
    chain = [key.tenant, *key.tenant.ancestors()]
    if any(not t.is_active for t in chain):
        return None
    scopes = key.scopes or {}
    models = _scope_set(scopes.get("models"))
    # A tenant's own model allow-list (and its ancestors') narrows whatever the key says.
    for tenant in chain:
        allowed = _scope_set(tenant.allowed_models)
        if allowed is not None:
            models = allowed if models is None else models & allowed
    lineage = tuple(_tenant_info(t) for t in chain)
    return KeyInfo(
        id=key.pk,
        prefix=key.prefix,
        hashed=key.hashed_secret,
        tenant=lineage[0],
        lineage=lineage,
        models=models,
        endpoints=_scope_set(scopes.get("endpoints")),
        rpm_limit=key.rpm_limit,
        tpm_limit=key.tpm_limit,
        expires_at=key.expires_at.timestamp() if key.expires_at else None,
        budgets=load_budgets(chain, key.pk),
    )


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
