"""Writes to routing policies: a policy and its rules are written as one unit.

The one write path for ``RoutingPolicy`` and ``RoutingRule`` rows: the admin and ``can apply`` call
these functions. Each runs in one transaction, validates the policy and every rule (a rule's CEL
condition is compiled; ``include`` must name a known rule set, without cycles), writes an audit
row through ``tenants.audit`` and announces the change to every gateway process after commit, so
the route table snapshot (which holds the compiled policies) is rebuilt.
"""

from __future__ import annotations

from typing import Any

from django.contrib.auth.base_user import AbstractBaseUser
from django.core.exceptions import ValidationError
from django.db import transaction

from core import invalidation
from gateway.models import RoutingPolicy, RoutingRule
from gateway.routing.policy import RULE_FIELDS, PolicyError, check_includes, parse_policy
from tenants import audit
from tenants.models import Tenant

__all__ = ["policy_config", "policy_delete", "policy_put", "rules_config"]


def rules_config(policy: RoutingPolicy) -> list[dict[str, Any]]:
    return [rule.as_config() for rule in policy.rules.all()]


def policy_config(policy: RoutingPolicy) -> dict[str, Any]:
    """The policy as the configuration file writes it."""
    data: dict[str, Any] = {"name": policy.name}
    if policy.tenant_id is not None:
        data["tenant"] = policy.tenant.slug if policy.tenant else None
    if policy.is_library:
        data["library"] = True
    if policy.description:
        data["description"] = policy.description
    if not policy.is_active:
        data["active"] = False
    data["rules"] = rules_config(policy)
    if policy.fallback_chain:
        data["fallback_chain"] = policy.fallback_chain
    return data


def _rule_row(policy: RoutingPolicy, position: int, data: dict[str, Any]) -> RoutingRule:
    route = data.get("route") or []
    return RoutingRule(
        policy=policy,
        position=position,
        name=str(data.get("name") or ""),
        condition=str(data.get("condition") or ""),
        route=[route] if isinstance(route, str) else list(route),
        split=list(data.get("split") or []),
        reject=str(data.get("reject") or ""),
        fallback=data.get("fallback"),
        timeouts=data.get("timeouts") or {},
        retries=data.get("retries"),
        tags=list(data.get("tags") or []),
        include=str(data.get("include") or ""),
    )


def _check_all() -> None:
    """Every stored active policy compiles together: includes resolve, no cycles."""
    compiled = {}
    for row in RoutingPolicy.objects.filter(is_active=True).prefetch_related("rules"):
        try:
            compiled[row.name] = parse_policy(row.name, rules_config(row), row.fallback_chain, library=row.is_library)
        except PolicyError as err:
            raise ValidationError({"rules": f"policy {row.name}: {err}"}) from None
    try:
        check_includes(compiled)
    except PolicyError as err:
        raise ValidationError({"include": str(err)}) from None


@transaction.atomic
def policy_put(
    *,
    name: str,
    rules: list[dict[str, Any]],
    tenant: Tenant | None = None,
    is_library: bool = False,
    description: str = "",
    fallback_chain: list[Any] | None = None,
    is_active: bool = True,
    actor: AbstractBaseUser | None = None,
    actor_label: str = "",
    source: str = "",
) -> tuple[RoutingPolicy, audit.Changes | None]:
    """Create or replace the policy ``name`` with these rules, in order.

    Returns the row and what changed: None when it was created, ``{}`` when nothing did (nothing is
    written, audited or announced then).
    """
    for index, rule in enumerate(rules):
        unknown = sorted(set(rule) - set(RULE_FIELDS))
        if unknown:
            raise ValidationError({"rules": f"rule #{index + 1}: unknown field(s) {', '.join(unknown)}"})
    try:
        parse_policy(name, rules, fallback_chain or [], library=is_library)
    except PolicyError as err:
        raise ValidationError({"rules": str(err)}) from None
    stored = RoutingPolicy.objects.select_for_update().filter(name=name).first()
    fields: dict[str, Any] = {
        "tenant_id": tenant.pk if tenant is not None else None,
        "is_library": is_library,
        "description": description,
        "fallback_chain": list(fallback_chain or []),
        "is_active": is_active,
    }
    if stored is None:
        policy = RoutingPolicy(name=name, **fields)
        changes: audit.Changes | None = None
    else:
        policy = stored
        old_rules = rules_config(stored)
        changes = audit.diff(stored, fields)
        new_rules = [_rule_row(stored, i, r).as_config() for i, r in enumerate(rules)]
        if new_rules != old_rules:
            changes["rules"] = (old_rules, new_rules)
        if not changes:
            return stored, changes
        for key, value in fields.items():
            setattr(policy, key, value)
    policy.full_clean()
    policy.save()
    policy.rules.all().delete()
    for index, data in enumerate(rules):
        row = _rule_row(policy, index, data)
        row.full_clean()
        row.save()
    _check_all()
    if changes is None:
        audit.record(
            "routing_policy.create",
            tenant=policy.tenant,
            target=name,
            actor=actor,
            actor_label=actor_label,
            source=source,
        )
    else:
        audit.record(
            "routing_policy.update",
            tenant=policy.tenant,
            target=name,
            changes=changes,
            actor=actor,
            actor_label=actor_label,
            source=source,
        )
    invalidation.announce_on_commit()
    return policy, changes


@transaction.atomic
def policy_delete(
    policy: RoutingPolicy, *, actor: AbstractBaseUser | None = None, actor_label: str = "", source: str = ""
) -> None:
    name, tenant = policy.name, policy.tenant
    policy.delete()
    _check_all()
    audit.record(
        "routing_policy.delete", tenant=tenant, target=name, actor=actor, actor_label=actor_label, source=source
    )
    invalidation.announce_on_commit()
