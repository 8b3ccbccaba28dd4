"""``can export``: the current configuration as the document ``can apply`` reads, defaults left out.

Secrets are written as ``${ENV_VAR}`` references, never in plaintext, so ``export`` then
``apply`` is a no-op. A reference keeps the name the applied file used (``references``); a secret
set another way gets a name made from the slug (``OPENAI_API_KEY``, ``ACME_MONTH_WEBHOOK_SECRET``).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, time
from decimal import Decimal
from typing import Any

import yaml

from control.config import references
from control.config.schema import MICRO, VERSION
from gateway.experiments import experiment_config
from gateway.models import Experiment, LLMModel, Provider, RoutingPolicy
from gateway.policies import policy_config
from tenants.models import ApiKey, Plan, Tenant

__all__ = ["dump", "env_name", "export"]


def env_name(*parts: str) -> str:
    name = "_".join(re.sub(r"[^A-Za-z0-9]+", "_", p).strip("_").upper() for p in parts if p)
    return name if name and not name[0].isdigit() else f"_{name}"


def _money(value: Decimal | None) -> str | None:
    if value is None:
        return None
    text = format(value.normalize(), "f")
    if "." not in text:
        text += ".00"
    elif len(text.split(".")[1]) == 1:
        text += "0"
    return text


def _date_text(when: datetime) -> str:
    """A price's ``effective_from`` as written in the file: a date when it starts at midnight UTC."""
    when = when.astimezone(UTC)
    return when.date().isoformat() if when.time() == time.min else when.isoformat().replace("+00:00", "Z")


def export() -> dict[str, Any]:
    """The current configuration as the document ``apply`` reads (defaults left out)."""
    out: dict[str, Any] = {"version": VERSION}
    providers = []
    key_refs = references.names(references.PROVIDER_API_KEY)
    hook_refs = references.names(references.BUDGET_WEBHOOK_SECRET)
    for p in Provider.objects.order_by("slug"):
        item: dict[str, Any] = {"slug": p.slug, "kind": p.kind}
        if p.base_url:
            item["base_url"] = p.base_url
        if p.api_key_encrypted or p.pk in key_refs:
            item["api_key"] = "${" + key_refs.get(p.pk, env_name(p.slug, "API_KEY")) + "}"
        if p.extra_headers:
            item["extra_headers"] = dict(p.extra_headers)
        _put_if(item, "connect_timeout", p.connect_timeout, 5.0)
        _put_if(item, "read_timeout", p.read_timeout, 600.0)
        _put_if(item, "first_byte_timeout", p.first_byte_timeout, None)
        _put_if(item, "total_timeout", p.total_timeout, None)
        _put_if(item, "max_retries", p.max_retries, 2)
        _put_if(item, "responses_api", p.responses_api, False)
        breaker: dict[str, Any] = {}
        _put_if(breaker, "failures", p.breaker_failures, 5)
        _put_if(breaker, "error_rate", p.breaker_error_rate, 0.5)
        _put_if(breaker, "min_requests", p.breaker_min_requests, 20)
        _put_if(breaker, "window", p.breaker_window, 30.0)
        _put_if(breaker, "cooldown", p.breaker_cooldown, 30.0)
        if breaker:
            item["breaker"] = breaker
        probe: dict[str, Any] = {}
        if p.probe_enabled:
            probe["enabled"] = True
            _put_if(probe, "interval", p.probe_interval, 30.0)
            if p.probe_request:
                probe["request"] = dict(p.probe_request)
            item["probe"] = probe
        _put_if(item, "outlier_latency_factor", p.outlier_latency_factor, 0.0)
        _put_if(item, "active", p.is_active, True)
        providers.append(item)
    out["providers"] = providers
    models = []
    for m in LLMModel.objects.order_by("name").prefetch_related("deployments__provider", "prices"):
        item = {"name": m.name}
        _put_if(item, "kind", m.kind, "chat")
        if m.aliases:
            item["aliases"] = list(m.aliases)
        _put_if(item, "owned_by", m.owned_by, "chittycan")
        _put_if(item, "context_window", m.context_window, 128_000)
        _put_if(item, "max_output_tokens", m.max_output_tokens, 16_384)
        _put_if(item, "active", m.is_active, True)
        if m.cache_enabled:
            item["cache"] = {"ttl": m.cache_ttl}
        if m.semantic_cache_enabled and m.semantic_embedding_model:
            item["semantic_cache"] = {"embedding_model": m.semantic_embedding_model, "threshold": m.semantic_threshold}
        _put_if(item, "strategy", m.strategy, "priority")
        deployments = []
        for d in sorted(m.deployments.all(), key=lambda d: (d.priority, d.provider.slug, d.upstream_model)):
            dep: dict[str, Any] = {"provider": d.provider.slug, "upstream_model": d.upstream_model}
            _put_if(dep, "priority", d.priority, 0)
            _put_if(dep, "weight", d.weight, 1)
            _put_if(dep, "active", d.is_active, True)
            deployments.append(dep)
        if deployments:
            item["deployments"] = deployments
        prices = []
        for pr in sorted(m.prices.all(), key=lambda pr: pr.effective_from):
            price: dict[str, Any] = {
                "effective_from": _date_text(pr.effective_from),
                "input": _money(pr.input_per_mtok),
            }
            if pr.cached_input_per_mtok is not None:
                price["cached_input"] = _money(pr.cached_input_per_mtok)
            if pr.cache_write_per_mtok is not None:
                price["cache_write"] = _money(pr.cache_write_per_mtok)
            price["output"] = _money(pr.output_per_mtok)
            if pr.per_image:
                price["per_image"] = _money(pr.per_image)
            if pr.image_prices:
                price["image_prices"] = {k: _money(Decimal(str(v))) for k, v in sorted(pr.image_prices.items())}
            if pr.audio_per_minute:
                price["audio_per_minute"] = _money(pr.audio_per_minute)
            if pr.per_mchars:
                price["per_mchars"] = _money(pr.per_mchars)
            prices.append(price)
        if prices:
            item["prices"] = prices
        models.append(item)
    out["models"] = models
    plans = []
    for plan in Plan.objects.order_by("slug"):
        item = {"slug": plan.slug}
        _put_if(item, "name", plan.name, plan.slug)
        _put_if(item, "monthly_request_quota", plan.monthly_request_quota, None)
        _put_if(item, "rpm", plan.rpm_limit, None)
        _put_if(item, "tpm", plan.tpm_limit, None)
        plans.append(item)
    out["plans"] = plans
    tenants = []
    all_tenants = list(Tenant.objects.select_related("parent", "plan").prefetch_related("budgets"))
    named_keys: dict[int, list[ApiKey]] = {}
    for k in ApiKey.objects.filter(revoked_at__isnull=True).exclude(name="").order_by("created_at", "pk"):
        named_keys.setdefault(k.tenant_id, []).append(k)
    for t in _tree_order(all_tenants):
        item = {"slug": t.slug}
        _put_if(item, "name", t.name, t.slug)
        item["kind"] = t.kind
        if t.parent_id:
            item["parent"] = t.parent.slug  # type: ignore[union-attr]
        if t.plan_id:
            item["plan"] = t.plan.slug  # type: ignore[union-attr]
        _put_if(item, "time_zone", t.time_zone, "UTC")
        _put_if(item, "stripe_customer", t.stripe_customer_id, "")
        _put_if(item, "rpm", t.rpm_limit, None)
        _put_if(item, "tpm", t.tpm_limit, None)
        if t.allowed_models:
            item["allowed_models"] = list(t.allowed_models)
        _put_if(item, "active", t.is_active, True)
        _put_if(item, "require_otp", t.require_otp, False)
        if t.cache_enabled is not None or t.cache_scope != "tenant":
            cache: dict[str, Any] = {}
            _put_if(cache, "enabled", t.cache_enabled, None)
            _put_if(cache, "scope", t.cache_scope, "tenant")
            item["cache"] = cache
        budgets = []
        order = ["day", "month", "total"]
        rows = sorted(t.budgets.all(), key=lambda b: (order.index(b.period), not b.hard, b.limit_micro))
        shared = {b.period for b in rows if sum(1 for o in rows if o.period == b.period) > 1}
        for b in rows:
            budget: dict[str, Any] = {"period": b.period, "limit_usd": _money(Decimal(b.limit_micro) / MICRO)}
            _put_if(budget, "hard", b.hard, True)
            if list(b.alert_thresholds) != [50, 80, 100]:
                budget["thresholds"] = list(b.alert_thresholds)
            if b.alert_emails:
                budget["emails"] = list(b.alert_emails)
            if b.webhook_url:
                budget["webhook"] = b.webhook_url
            if b.webhook_secret or b.pk in hook_refs:
                # The name the file used; else a derived one (a soft level beside other budgets of
                # its period gets a name of its own).
                level = ("SOFT", str(budget["limit_usd"])) if not b.hard and b.period in shared else ()
                name = hook_refs.get(b.pk) or env_name(t.slug, b.period, *level, "WEBHOOK_SECRET")
                budget["webhook_secret"] = "${" + name + "}"
            budgets.append(budget)
        if budgets:
            item["budgets"] = budgets
        keys = _key_settings(named_keys.get(t.pk, []))
        if keys:
            item["keys"] = keys
        tenants.append(item)
    out["tenants"] = tenants
    policies = RoutingPolicy.objects.select_related("tenant").prefetch_related("rules").order_by("-is_library", "name")
    if policies:
        out["routing_policies"] = [policy_config(p) for p in policies]
    experiments = Experiment.objects.select_related("tenant").order_by("slug")
    if experiments:
        out["experiments"] = [experiment_config(e) for e in experiments]
    return out


def _key_settings(keys: list[ApiKey]) -> list[dict[str, Any]]:
    """``keys:`` of a tenant (``keys``: its active named keys, oldest first): those whose cache
    settings are not the defaults, one entry per name (``apply`` sets every key of a name alike;
    the newest key's settings are written). A key without a name cannot be named in the file: its
    settings stay the admin's."""
    newest = {k.name: k for k in keys}
    out = []
    for name in sorted(newest):
        k = newest[name]
        cache: dict[str, Any] = {}
        _put_if(cache, "enabled", k.cache_enabled, None)
        _put_if(cache, "scope", "own" if k.cache_own else "tenant", "tenant")
        if cache:
            out.append({"name": name, "cache": cache})
    return out


def _put_if(item: dict[str, Any], key: str, value: Any, default: Any) -> None:
    if value != default:
        item[key] = value


def _tree_order(tenants: list[Tenant]) -> list[Tenant]:
    """Parents before their children; siblings by slug."""
    kids: dict[int | None, list[Tenant]] = {}
    ids = {t.pk for t in tenants}
    for t in sorted(tenants, key=lambda t: t.slug):
        kids.setdefault(t.parent_id if t.parent_id in ids else None, []).append(t)
    out: list[Tenant] = []

    def walk(parent: int | None) -> None:
        for t in kids.get(parent, []):
            out.append(t)
            walk(t.pk)

    walk(None)
    return out


class _Dumper(yaml.SafeDumper):
    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        super().increase_indent(flow, False)  # indent list items under their key


def _str_presenter(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="'" if "${" in value else None)


_Dumper.add_representer(str, _str_presenter)


def dump(data: dict[str, Any]) -> str:
    header = (
        "# ChittyCan configuration (`can export`). Apply with `can apply -f <this file>`.\n"
        "# Secrets are ${ENV_VAR} references, read from the environment at apply time.\n"
    )
    body = yaml.dump(data, Dumper=_Dumper, sort_keys=False, allow_unicode=True, default_flow_style=False, width=100)
    return header + body
