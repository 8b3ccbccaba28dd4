"""A verified key and its tenant chain as the hot path sees it: plain frozen values, loaded once
(``load_key``) and cached by ``gateway.auth``.

Budgets are not part of it: the reserve stage asks ``budgets.service.budgets_for(key)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tenants.models import ApiKey, Tenant

#: The scope that lets a gateway key read its own tenant's request log (``GET /api/requests``). It
#: is listed with the endpoints: a key whose ``endpoints`` scope is absent has it; a key narrowed to
#: some endpoints has it only if the list names it.
USAGE_READ = "usage:read"


@dataclass(frozen=True, slots=True)
class TenantInfo:
    id: int
    slug: str
    time_zone: str
    rpm_limit: int | None
    tpm_limit: int | None
    monthly_request_quota: int | None
    plan: str = ""  # the plan's slug ('' without one): routing policies read it
    cache_enabled: bool | None = None  # the response cache for every model (None: as each model says)
    cache_scope: str = "tenant"  # whose entries: tenant | key | tree | global (docs/caching.md)


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
    name: str = ""
    cache_enabled: bool | None = None  # the response cache for this key (None: as its tenant says)
    cache_own: bool = False  # this key's cache entries are its own (not shared with its tenant's keys)

    @property
    def root_id(self) -> int:
        """The top of the tenant tree: the hash tag all of this tree's counters share."""
        return self.lineage[-1].id

    def allows_model(self, name: str, aliases: tuple[str, ...] = ()) -> bool:
        return self.models is None or name in self.models or any(a in self.models for a in aliases)

    def allows_endpoint(self, endpoint: str) -> bool:
        return self.endpoints is None or endpoint in self.endpoints

    @property
    def can_read_usage(self) -> bool:
        return self.allows_endpoint(USAGE_READ)


def _tenant_info(tenant: Tenant) -> TenantInfo:
    plan = tenant.plan
    return TenantInfo(
        id=tenant.pk,
        slug=tenant.slug,
        time_zone=tenant.time_zone,
        rpm_limit=tenant.rpm_limit if tenant.rpm_limit is not None else (plan.rpm_limit if plan else None),
        tpm_limit=tenant.tpm_limit if tenant.tpm_limit is not None else (plan.tpm_limit if plan else None),
        monthly_request_quota=plan.monthly_request_quota if plan else None,
        plan=plan.slug if plan else "",
        cache_enabled=tenant.cache_enabled,
        cache_scope=tenant.cache_scope,
    )


def _scope_set(values: Any) -> frozenset[str] | None:
    if not values:
        return None
    return frozenset(str(v) for v in values)


def load_key(prefix: str) -> KeyInfo | None:
    """Read a usable key and its tenant chain (synchronous; call off the event loop)."""
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
        name=key.name,
        cache_enabled=key.cache_enabled,
        cache_own=key.cache_own,
    )
