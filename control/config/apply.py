"""``can apply``: make the database match a configuration document, in ONE transaction.

Every write goes through the service functions the admin, the CLI and the REST API use
(``gateway.catalog`` for providers, models, deployments and prices; ``tenants.services`` for plans,
tenants, budgets and the cache settings of existing keys), so each change is validated, audited
(``actor_label=apply``, with the file name and the old and new values; secrets only as changed)
and announced to the gateway processes, once, after commit. This module reads the database to
decide what to change and never writes it itself. A dry run does the same work and rolls it back,
so it reports exactly what a real run would change.

Secrets are never in the file: a provider's ``api_key`` (and a budget's ``webhook_secret``) is an
``${ENV_VAR}`` reference, read from the environment here. An unset variable keeps the stored
secret (an error if none is stored, except for an inactive provider, which needs no credentials
until it is activated). The reference's name is kept (``control.config.references``) so that
``can export`` writes the same placeholder back.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, TypedDict

from django.conf import settings
from django.contrib.auth.base_user import AbstractBaseUser
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import IntegrityError, transaction

from budgets import services as budget_services
from budgets.models import Budget
from control.config import references
from control.config.schema import MICRO, SECRET_REF, ConfigError, Document, ModelSpec, TenantSpec
from core import egress
from core.money import format_usd_short
from gateway import catalog, experiments, policies
from gateway.models import Deployment, Experiment, LLMModel, Price, Provider, RoutingPolicy
from tenants import audit, services
from tenants.models import ApiKey, Plan, Tenant

__all__ = ["ACTOR", "Change", "Result", "apply"]

ACTOR = "apply"


@dataclass
class Change:
    op: Literal["create", "update", "delete", "deactivate"]
    kind: str  # provider, model, deployment, price, plan, tenant, budget, key
    target: str
    fields: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    note: str = ""

    def __str__(self) -> str:
        sign = {"create": "+", "update": "~", "delete": "-", "deactivate": "-"}[self.op]
        text = f"{sign} {self.op} {self.kind} {self.target}"
        if self.fields and self.op == "update":
            text += ": " + ", ".join(f"{k} {_show(a)} -> {_show(b)}" for k, (a, b) in self.fields.items())
        if self.note:
            text += f" ({self.note})"
        return text


def _show(value: Any) -> str:
    if value is audit.HIDDEN:
        return "(secret)"
    if value is None:
        return "none"
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


@dataclass
class Result:
    changes: list[Change]
    notes: list[str]
    dry_run: bool


class _By(TypedDict):
    """Who the services record as making the change."""

    actor: AbstractBaseUser | None
    actor_label: str
    source: str


def _messages(exc: DjangoValidationError) -> str:
    if hasattr(exc, "error_dict"):
        return "; ".join(f"{k}: {' '.join(v)}" for k, v in exc.message_dict.items())
    return " ".join(exc.messages)


class _Applier:
    def __init__(
        self, doc: Document, *, prune: bool, env: dict[str, str], actor: AbstractBaseUser | None, filename: str
    ) -> None:
        self.doc = doc
        self.prune = prune
        self.env = env
        self.by: _By = {"actor": actor, "actor_label": ACTOR, "source": filename}
        self.filename = filename
        self.changes: list[Change] = []
        self.notes: list[str] = []
        self.errors: list[str] = []
        self._doomed_providers: list[Provider] = []

    @contextmanager
    def valid(self, kind: str, target: str) -> Iterator[None]:
        """A service refusing a row becomes ``<file>: <kind> <target>: <what is wrong>``."""
        try:
            yield
        except DjangoValidationError as exc:
            raise ConfigError([f"{self.filename}: {kind} {target}: {_messages(exc)}"]) from None

    def check_url(self, url: str, path: str) -> None:
        """The egress policy (``core.egress``) on a URL of the file, as ``<file>: <path>: <why>``."""
        try:
            egress.validate_url(url)
        except DjangoValidationError as exc:
            raise ConfigError([f"{self.filename}: {path}: {' '.join(exc.messages)}"]) from None

    def created(self, kind: str, target: str) -> None:
        self.changes.append(Change("create", kind, target))

    def updated(self, kind: str, target: str, changes: audit.Changes) -> None:
        if changes:
            self.changes.append(Change("update", kind, target, changes))

    def deleted(self, kind: str, target: str) -> None:
        self.changes.append(Change("delete", kind, target))

    def secret(self, ref: str | None, current: str, path: str, *, optional: str = "") -> tuple[str | None, str | None]:
        """(new plaintext or None to keep, a note). Errors when nothing is stored to keep, unless
        ``optional`` says why none is needed (an inactive provider)."""
        if ref is None:
            return None, None
        name = _ref_name(ref)
        if name in self.env:
            value = self.env[name]
            return (value if value != current else None), None
        if current:
            return None, f"{path}: {name} is not set; the stored secret is kept"
        if optional:
            return None, f"{path}: {name} is not set; none is needed while {optional}"
        self.errors.append(f"{self.filename}: {path}: environment variable {name} is not set")
        return None, None

    def run(self) -> None:
        plans = self.plans()
        providers = self.providers()
        self.models(providers)
        self.tenants(plans)
        self.routing_policies()
        self.experiments()
        if self.errors:
            raise ConfigError(self.errors)
        references.forget_missing(references.PROVIDER_API_KEY, Provider.objects.values_list("pk", flat=True))
        references.forget_missing(references.BUDGET_WEBHOOK_SECRET, Budget.objects.values_list("pk", flat=True))

    def plans(self) -> dict[str, Plan]:
        out: dict[str, Plan] = {}
        for spec in self.doc.plans:
            desired: services.PlanFields = {
                "slug": spec.slug,
                "name": spec.name or spec.slug,
                "monthly_request_quota": spec.monthly_request_quota,
                "rpm_limit": spec.rpm,
                "tpm_limit": spec.tpm,
            }
            plan = Plan.objects.filter(slug=spec.slug).first()
            with self.valid("plan", spec.slug):
                if plan is None:
                    plan = services.plan_create(**desired, **self.by)
                    self.created("plan", spec.slug)
                else:
                    self.updated("plan", spec.slug, services.plan_update(plan, **desired, **self.by))
            out[spec.slug] = plan
        if self.prune:
            for plan in Plan.objects.exclude(slug__in=out):
                target = plan.slug
                services.plan_delete(plan, **self.by)  # tenants still on it (none in the file) keep no plan
                self.deleted("plan", target)
        return out

    def providers(self) -> dict[str, Provider]:
        out: dict[str, Provider] = {}
        for i, spec in enumerate(self.doc.providers):
            desired: catalog.ProviderFields = {
                "slug": spec.slug,
                "kind": spec.kind,
                "base_url": spec.base_url,
                "extra_headers": dict(spec.extra_headers),
                "connect_timeout": spec.connect_timeout,
                "read_timeout": spec.read_timeout,
                "first_byte_timeout": spec.first_byte_timeout,
                "total_timeout": spec.total_timeout,
                "max_retries": spec.max_retries,
                "responses_api": spec.responses_api,
                "probe_enabled": spec.probe.enabled,
                "probe_interval": spec.probe.interval,
                "probe_request": dict(spec.probe.request),
                "outlier_latency_factor": spec.outlier_latency_factor,
                "breaker_failures": spec.breaker.failures,
                "breaker_error_rate": spec.breaker.error_rate,
                "breaker_min_requests": spec.breaker.min_requests,
                "breaker_window": spec.breaker.window,
                "breaker_cooldown": spec.breaker.cooldown,
                "is_active": spec.active,
            }
            self.check_url(spec.base_url, f"providers[{i}].base_url")
            provider = Provider.objects.filter(slug=spec.slug).first()
            try:
                current = provider.api_key if provider is not None else ""
            except ValueError:  # encrypted under another key: only a new value helps
                current = ""
            # An inactive provider is never called, so it needs no credentials (used if set).
            inactive = "" if spec.active else f"provider {spec.slug} is inactive"
            new_secret, note = self.secret(spec.api_key, current, f"providers[{i}].api_key", optional=inactive)
            if note:
                self.notes.append(note)
            with self.valid("provider", spec.slug):
                if provider is None:
                    provider = catalog.provider_create(api_key=new_secret or "", **desired, **self.by)
                    self.created("provider", spec.slug)
                else:
                    changes = catalog.provider_update(provider, api_key=new_secret, **desired, **self.by)
                    self.updated("provider", spec.slug, changes)
            if spec.api_key is not None:
                references.remember(references.PROVIDER_API_KEY, provider.pk, _ref_name(spec.api_key))
            out[spec.slug] = provider
        if self.prune:
            # Deployments of pruned models go first, below; whatever still points here is kept.
            self._doomed_providers = list(Provider.objects.exclude(slug__in=out))
        return out

    def models(self, providers: dict[str, Provider]) -> None:
        file_names = {m.name for m in self.doc.models}
        if self.prune:
            for stale in LLMModel.objects.exclude(name__in=file_names):
                target = stale.name
                catalog.model_delete(stale, **self.by)
                self.deleted("model", target)
        for spec in self.doc.models:
            desired: catalog.ModelFields = {
                "name": spec.name,
                "kind": spec.kind,
                "aliases": list(spec.aliases),
                "owned_by": spec.owned_by,
                "context_window": spec.context_window,
                "max_output_tokens": spec.max_output_tokens,
                "is_active": spec.active,
                "cache_enabled": spec.cache is not None and spec.cache.enabled,
                "cache_ttl": spec.cache.ttl if spec.cache is not None else 86_400,
                "semantic_cache_enabled": spec.semantic_cache is not None and spec.semantic_cache.enabled,
                "semantic_embedding_model": spec.semantic_cache.embedding_model if spec.semantic_cache else "",
                "semantic_threshold": spec.semantic_cache.threshold if spec.semantic_cache else 0.95,
                "strategy": spec.strategy,
            }
            model = LLMModel.objects.filter(name=spec.name).first()
            with self.valid("model", spec.name):
                if model is None:
                    model = catalog.model_create(**desired, **self.by)
                    self.created("model", spec.name)
                else:
                    self.updated("model", spec.name, catalog.model_update(model, **desired, **self.by))
            self.deployments(model, spec, providers)
            self.prices(model, spec)
        if self.prune:
            for provider in self._doomed_providers:
                if provider.deployments.exists():
                    self.notes.append(f"provider {provider.slug} is still used by deployments; not pruned")
                    continue
                target = provider.slug
                catalog.provider_delete(provider, **self.by)
                self.deleted("provider", target)
        self._check_alias_clashes(file_names)

    def _check_alias_clashes(self, file_names: set[str]) -> None:
        """Aliases against models that stay in the database without being in the file."""
        index = {m.name: i for i, m in enumerate(self.doc.models)}
        taken: dict[str, str] = {}
        rows = list(LLMModel.objects.order_by("name").values_list("name", "aliases"))
        for name, _ in rows:
            taken[name] = name
        for name, aliases in rows:
            for alias in aliases or []:
                owner = taken.setdefault(alias, name)
                if owner == name or (name not in file_names and owner not in file_names):
                    continue
                where = f"models[{index[name]}].aliases" if name in index else f"model {name} (not in the file)"
                self.errors.append(
                    f"{self.filename}: {where}: {alias} is already the name or an alias of model {owner}"
                )

    def deployments(self, model: LLMModel, spec: ModelSpec, providers: dict[str, Provider]) -> None:
        existing = {(d.provider.slug, d.upstream_model): d for d in model.deployments.select_related("provider")}
        wanted = set()
        for dep in spec.deployments:
            ident = (dep.provider, dep.upstream_model)
            wanted.add(ident)
            desired: catalog.DeploymentFields = {
                "model": model,
                "provider": providers[dep.provider],
                "upstream_model": dep.upstream_model,
                "priority": dep.priority,
                "weight": dep.weight,
                "is_active": dep.active,
            }
            target = catalog.deployment_label(Deployment(**desired))
            row = existing.get(ident)
            with self.valid("deployment", target):
                if row is None:
                    catalog.deployment_create(**desired, **self.by)
                    self.created("deployment", target)
                else:
                    self.updated("deployment", target, catalog.deployment_update(row, **desired, **self.by))
        if self.prune:
            for ident, row in existing.items():
                if ident not in wanted:
                    target = catalog.deployment_label(row)
                    catalog.deployment_delete(row, **self.by)
                    self.deleted("deployment", target)

    def prices(self, model: LLMModel, spec: ModelSpec) -> None:
        existing = {p.effective_from: p for p in model.prices.all()}
        wanted = set()
        for price in spec.prices:
            wanted.add(price.effective_from)
            desired: catalog.PriceFields = {
                "model": model,
                "effective_from": price.effective_from,
                "input_per_mtok": price.input,
                "cached_input_per_mtok": price.cached_input,
                "cache_write_per_mtok": price.cache_write,
                "output_per_mtok": price.output,
                "per_image": price.per_image,
                "image_prices": {k: str(v) for k, v in price.image_prices.items()},
                "audio_per_minute": price.audio_per_minute,
                "per_mchars": price.per_mchars,
            }
            target = catalog.price_label(Price(**desired))
            row = existing.get(price.effective_from)
            with self.valid("price", target):
                if row is None:
                    catalog.price_create(**desired, **self.by)
                    self.created("price", target)
                else:
                    self.updated("price", target, catalog.price_update(row, **desired, **self.by))
        if self.prune:
            for when, row in existing.items():
                if when not in wanted:
                    target = catalog.price_label(row)
                    catalog.price_delete(row, **self.by)
                    self.deleted("price", target)

    def tenants(self, plans: dict[str, Plan]) -> None:
        by_slug = {t.slug: t for t in self.doc.tenants}
        rows: dict[str, Tenant] = {}
        # Parents before children, so a new child can point at a parent created in this run.
        for spec in _parents_first(self.doc.tenants):
            parent = rows.get(spec.parent) if spec.parent else None
            desired: services.TenantFields = {
                "slug": spec.slug,
                "name": spec.name or spec.slug,
                "kind": spec.kind or _default_kind(by_slug[spec.parent].kind if spec.parent else None, parent),
                "parent": parent,
                "plan": plans.get(spec.plan) if spec.plan else None,
                "time_zone": spec.time_zone,
                "stripe_customer_id": spec.stripe_customer,
                "rpm_limit": spec.rpm,
                "tpm_limit": spec.tpm,
                "allowed_models": list(spec.allowed_models),
                "is_active": spec.active,
                "require_otp": spec.require_otp,
                "cache_enabled": spec.cache.enabled if spec.cache is not None else None,
                "cache_scope": spec.cache.scope if spec.cache is not None else "tenant",
            }
            tenant = Tenant.objects.filter(slug=spec.slug).first()
            with self.valid("tenant", spec.slug):
                if tenant is None:
                    tenant = services.tenant_create(**desired, **self.by)
                    self.created("tenant", spec.slug)
                else:
                    self.updated("tenant", spec.slug, services.tenant_update(tenant, **desired, **self.by))
            rows[spec.slug] = tenant
            self.budgets(tenant, spec)
            self.keys(tenant, spec)
        if self.prune:
            keep = set(by_slug) | {settings.CHITTYCAN_PASSTHROUGH_TENANT}
            note = "not in the file; keys and usage kept"
            for tenant in Tenant.objects.exclude(slug__in=keep).filter(is_active=True):
                if services.tenant_deactivate(tenant, note=note, **self.by):
                    self.changes.append(Change("deactivate", "tenant", tenant.slug, note=note))

    def budgets(self, tenant: Tenant, spec: TenantSpec) -> None:
        """Through ``budgets.services``, as the admin and the REST API. A budget in the file is
        the tenant's hard budget for its period, or (``hard: false``) the soft alert level at its
        limit; the file is explicit, so it may raise or remove a hard budget (noted in the plan)."""
        existing = {_budget_ident(b.period, b.hard, b.limit_micro): b for b in Budget.objects.filter(tenant=tenant)}
        wanted = set()
        i = next(n for n, t in enumerate(self.doc.tenants) if t.slug == spec.slug)
        for j, budget in enumerate(spec.budgets):
            limit = int(budget.limit_usd * MICRO)
            ident = _budget_ident(budget.period, budget.hard, limit)
            wanted.add(ident)
            row = existing.get(ident)
            desired: dict[str, Any] = {
                "limit_micro": limit,
                "hard": budget.hard,
                "alert_thresholds": list(budget.thresholds),
                "alert_emails": list(budget.emails),
                "webhook_url": budget.webhook,
            }
            self.check_url(budget.webhook, f"tenants[{i}].budgets[{j}].webhook")
            target = _budget_target(tenant.slug, budget.period, budget.hard, limit)
            current_secret = row.webhook_secret if row is not None else ""
            new_secret, note = self.secret(
                budget.webhook_secret, current_secret, f"tenants[{i}].budgets[{j}].webhook_secret"
            )
            if note:
                self.notes.append(note)
            diff = {k: (getattr(row, k), v) for k, v in desired.items() if getattr(row, k) != v} if row else {}
            if new_secret is not None and row is not None:
                diff["webhook_secret"] = (audit.HIDDEN, audit.HIDDEN)
            if budget.webhook_secret is not None and row is not None:
                references.remember(references.BUDGET_WEBHOOK_SECRET, row.pk, _ref_name(budget.webhook_secret))
            if row is not None and not diff:
                continue
            if row is not None and limit > row.limit_micro:
                self.notes.append(f"{target}: raises the hard limit (weakens the cap)")
            try:
                saved = budget_services.budget_put(
                    tenant=tenant,
                    period=budget.period,
                    webhook_secret=new_secret,
                    allow_weaken=True,
                    actor_label=ACTOR,
                    **desired,
                ).budget
            except (DjangoValidationError, ValueError) as exc:
                text = "; ".join(exc.messages) if isinstance(exc, DjangoValidationError) else str(exc)
                raise ConfigError([f"{self.filename}: tenants[{i}].budgets[{j}]: {text}"]) from None
            if budget.webhook_secret is not None:
                references.remember(references.BUDGET_WEBHOOK_SECRET, saved.pk, _ref_name(budget.webhook_secret))
            if row is None:
                self.created("budget", target)
            else:
                self.updated("budget", target, diff)
        if self.prune:
            for ident, row in existing.items():
                if ident not in wanted:
                    budget_services.budget_delete(budget=row, allow_weaken=True, actor_label=ACTOR)
                    self.deleted("budget", _budget_target(tenant.slug, row.period, row.hard, row.limit_micro))

    def keys(self, tenant: Tenant, spec: TenantSpec) -> None:
        """The cache settings of the tenant's existing keys named in the file (every active key of
        that name), through ``tenants.services.key_update`` as the admin and the CLI. Keys are never
        created here (their secrets are not configuration). With ``--prune``, the tenant's named keys
        the file does not list go back to the defaults (as the tenant says)."""
        i = next(n for n, t in enumerate(self.doc.tenants) if t.slug == spec.slug)
        by_name: dict[str, list[ApiKey]] = {}
        for row in ApiKey.objects.filter(tenant=tenant, revoked_at__isnull=True).order_by("created_at", "pk"):
            by_name.setdefault(row.name, []).append(row)
        for j, key in enumerate(spec.keys):
            found = by_name.get(key.name)
            if not found:
                self.errors.append(
                    f"{self.filename}: tenants[{i}].keys[{j}].name: tenant {tenant.slug} has no active key named "
                    f"{key.name}; the file sets the settings of existing keys and never creates one (its secret "
                    f"is not configuration): create it with `can keys create --tenant {tenant.slug} --name "
                    f"{key.name}` (or in the admin), then apply again"
                )
                continue
            cache = key.cache
            desired: services.KeyFields = {
                "cache_enabled": cache.enabled if cache is not None else None,
                "cache_own": cache is not None and cache.scope == "own",
            }
            for row in found:
                self._key_update(tenant, row, desired)
        if self.prune:
            named = {key.name for key in spec.keys}
            for name, found in by_name.items():
                if name and name not in named:  # a key without a name cannot be listed: the admin's
                    for row in found:
                        self._key_update(tenant, row, {"cache_enabled": None, "cache_own": False})

    def _key_update(self, tenant: Tenant, row: ApiKey, desired: services.KeyFields) -> None:
        target = f"{tenant.slug}/{row.name or '(no name)'} ({row.prefix})"
        with self.valid("key", target):
            self.updated(
                "key",
                target,
                services.key_update(row, actor=self.by["actor"], actor_label=ACTOR, source=self.filename, **desired),
            )

    def routing_policies(self) -> None:
        """Routing policies, each replaced whole (its rules in file order) when it differs."""
        names = {p.name for p in self.doc.routing_policies}
        if self.prune:
            for stale in RoutingPolicy.objects.exclude(name__in=names):
                target = stale.name
                policies.policy_delete(stale, **self.by)
                self.deleted("routing policy", target)
        # Library rule sets first: the policies that include them are checked against them.
        ordered = sorted(enumerate(self.doc.routing_policies), key=lambda item: not item[1].library)
        for i, spec in ordered:
            tenant = None
            if spec.tenant is not None:
                tenant = Tenant.objects.filter(slug=spec.tenant).first()
                if tenant is None:
                    raise ConfigError([f"{self.filename}: routing_policies[{i}].tenant: no tenant {spec.tenant}"])
            with self.valid("routing policy", spec.name):
                _, changes = policies.policy_put(
                    name=spec.name,
                    rules=[dict(rule) for rule in spec.rules],
                    tenant=tenant,
                    is_library=spec.library,
                    description=spec.description,
                    fallback_chain=list(spec.fallback_chain),
                    is_active=spec.active,
                    **self.by,
                )
            if changes is None:
                self.created("routing policy", spec.name)
            else:
                self.updated("routing policy", spec.name, changes)

    def experiments(self) -> None:
        """Routing experiments, each replaced whole when it differs. A promotion the auto-promotion
        task made is kept while the file still says ``running`` (the file is not told to undo it)."""
        ids = {e.id for e in self.doc.experiments}
        if self.prune:
            for stale in Experiment.objects.exclude(slug__in=ids):
                target = stale.slug
                experiments.experiment_delete(stale, **self.by)
                self.deleted("experiment", target)
        for i, spec in enumerate(self.doc.experiments):
            tenant = None
            if spec.tenant is not None:
                tenant = Tenant.objects.filter(slug=spec.tenant).first()
                if tenant is None:
                    raise ConfigError([f"{self.filename}: experiments[{i}].tenant: no tenant {spec.tenant}"])
            status: str = spec.status
            winner = spec.winner
            stored = Experiment.objects.filter(slug=spec.id).first()
            if stored is not None and stored.status == "promoted" and status == "running" and not winner:
                status, winner = stored.status, stored.winner
            auto = spec.auto_promote
            with self.valid("experiment", spec.id):
                _, changes = experiments.experiment_put(
                    slug=spec.id,
                    arms=[dict(arm) for arm in spec.arms],
                    tenant=tenant,
                    model=spec.model or "",
                    rule=spec.rule or "",
                    status=status,
                    description=spec.description,
                    auto_promote=auto is not None,
                    metric=auto.metric if auto else "score",
                    min_samples=auto.min_samples if auto else 100,
                    significance=auto.significance if auto else 0.05,
                    winner=winner,
                    **self.by,
                )
            if changes is None:
                self.created("experiment", spec.id)
            else:
                self.updated("experiment", spec.id, changes)


def _budget_ident(period: str, hard: bool, limit_micro: int) -> tuple[str, bool, int | None]:
    """What identifies a budget in the file: its period if hard, its period and limit if soft."""
    return (period, hard, None if hard else limit_micro)


def _budget_target(slug: str, period: str, hard: bool, limit_micro: int) -> str:
    if hard:
        return f"{slug} per {period}"
    return f"{slug} per {period} (soft at {format_usd_short(limit_micro)} USD)"


def _ref_name(ref: str) -> str:
    """``${NAME}`` -> ``NAME`` (the schema has validated the form)."""
    match = SECRET_REF.match(ref)
    assert match is not None
    return match.group(1)


def _default_kind(parent_kind: str | None, parent: Tenant | None) -> str:
    kind = parent_kind or (parent.kind if parent else None)
    if kind is None:
        return Tenant.Kind.ORGANISATION
    return Tenant.Kind.TEAM if kind == Tenant.Kind.ORGANISATION else Tenant.Kind.PROJECT


def _parents_first(tenants: list[TenantSpec]) -> list[TenantSpec]:
    by_slug = {t.slug: t for t in tenants}
    out: list[TenantSpec] = []
    done: set[str] = set()

    def visit(spec: TenantSpec) -> None:
        if spec.slug in done:
            return
        done.add(spec.slug)
        if spec.parent and spec.parent in by_slug:
            visit(by_slug[spec.parent])
        out.append(spec)

    for spec in tenants:
        visit(spec)
    return out


def apply(
    doc: Document,
    *,
    prune: bool = False,
    dry_run: bool = False,
    env: dict[str, str] | None = None,
    actor: AbstractBaseUser | None = None,
    filename: str = "chittycan.yaml",
) -> Result:
    """Make the database match ``doc`` in one transaction (rolled back when ``dry_run``)."""
    applier = _Applier(doc, prune=prune, env=dict(os.environ) if env is None else env, actor=actor, filename=filename)
    try:
        with transaction.atomic():
            applier.run()
            if dry_run:
                transaction.set_rollback(True)
    except IntegrityError as exc:
        raise ConfigError([f"{filename}: the database refused the change: {exc}".strip()]) from None
    return Result(changes=applier.changes, notes=applier.notes, dry_run=dry_run)
