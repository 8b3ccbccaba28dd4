"""Stage 4, route: from a public model name to the ordered deployments that may serve it.

The route table is an immutable snapshot of providers, models, deployments and prices, loaded from
the database off the event loop and kept for ``CHITTYCAN_ROUTES_TTL`` seconds or until a config
change is announced (see ``core.invalidation``). The hot path never queries the database.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal

from asgiref.sync import sync_to_async
from django.conf import settings

from core import invalidation
from core.money import PriceInfo
from gateway.errors import ServiceUnavailable
from gateway.models import Experiment, LLMModel, Price, Provider, RoutingPolicy
from gateway.providers.base import BreakerSettings, ProbeSettings, ProviderConfig
from gateway.routing.experiments import ExperimentError, ExperimentSpec, parse_arms
from gateway.routing.policy import Policy, PolicyError, PolicySet, check_includes, parse_policy

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class HopTimeouts:
    """Per-hop limits in seconds; None: the provider's own setting."""

    connect: float | None = None
    first_byte: float | None = None
    total: float | None = None


@dataclass(frozen=True, slots=True)
class DeploymentRoute:
    id: int | None
    provider: ProviderConfig
    upstream_model: str
    priority: int = 0
    weight: int = 1
    timeouts: HopTimeouts = HopTimeouts()


@dataclass(frozen=True, slots=True)
class ModelRoute:
    id: int | None
    name: str
    kind: str
    owned_by: str
    created: int
    context_window: int
    max_output_tokens: int
    deployments: tuple[DeploymentRoute, ...]
    prices: tuple[PriceInfo, ...] = ()  # newest first
    aliases: tuple[str, ...] = ()
    cache_ttl: int = 0  # seconds the exact response cache keeps an answer; 0: the cache is off
    semantic_model: str = ""  # the embedding model of the semantic cache; "": it is off
    semantic_threshold: float = 1.0  # the cosine similarity a semantic hit needs
    # A routing policy's route may hold other models' deployments (its fallback chain): their prices.
    hop_prices: tuple[tuple[tuple[int | None, str, str], tuple[PriceInfo, ...]], ...] = ()
    strategy: str = "priority"  # load balancing: gateway.routing.strategy
    cache_ttl_setting: int = 86_400  # the model's TTL even when off (a tenant or key may turn it on)

    def price_at(self, when: datetime | None = None) -> PriceInfo | None:
        return _price_at(self.prices, when or datetime.now(UTC))

    def price_for(self, deployment: DeploymentRoute | None, when: datetime | None = None) -> PriceInfo | None:
        """The price of the model the deployment serves (a fallback hop's own), else this model's."""
        if deployment is not None and self.hop_prices:
            ident = deployment_ident(deployment)
            for key, prices in self.hop_prices:
                if key == ident:
                    return _price_at(prices, when or datetime.now(UTC))
        return self.price_at(when)

    def worst_price(self, when: datetime | None = None) -> PriceInfo | None:
        """The highest price per token kind and per unit over every deployment (what a reservation
        must cover)."""
        when = when or datetime.now(UTC)
        found = [p for p in (self.price_at(when), *(_price_at(ps, when) for _, ps in self.hop_prices)) if p]
        if len(found) <= 1:
            return found[0] if found else None
        return PriceInfo(
            effective_from=max(p.effective_from for p in found),
            input_per_mtok=max(p.input_per_mtok for p in found),
            cached_input_per_mtok=max(p.cached_input_per_mtok for p in found),
            cache_write_per_mtok=max(p.cache_write_per_mtok for p in found),
            output_per_mtok=max(p.output_per_mtok for p in found),
            per_image=max(p.per_image for p in found),
            image_prices=tuple(
                (variant, max(p.image_price(variant) for p in found))
                for variant in sorted({k for p in found for k, _ in p.image_prices})
            ),
            audio_per_minute=max(p.audio_per_minute for p in found),
            per_mchars=max(p.per_mchars for p in found),
        )

    def ordered_deployments(self) -> list[DeploymentRoute]:
        """Lowest priority first; among equals, a weighted random order."""
        groups: dict[int, list[DeploymentRoute]] = {}
        for dep in self.deployments:
            groups.setdefault(dep.priority, []).append(dep)
        ordered: list[DeploymentRoute] = []
        for priority in sorted(groups):
            pool = list(groups[priority])
            while pool:
                if len(pool) == 1:
                    ordered.append(pool.pop())
                    break
                pick = random.choices(range(len(pool)), weights=[max(d.weight, 0) or 1 for d in pool])[0]
                ordered.append(pool.pop(pick))
        return ordered


def deployment_ident(deployment: DeploymentRoute) -> tuple[int | None, str, str]:
    return (deployment.id, deployment.provider.slug, deployment.upstream_model)


def _price_at(prices: tuple[PriceInfo, ...], when: datetime) -> PriceInfo | None:
    for price in prices:  # newest first
        if price.effective_from <= when:
            return price
    return None


@dataclass(slots=True)
class RouteTable:
    models: dict[str, ModelRoute] = field(default_factory=dict)  # public names and aliases
    loaded_at: float = 0.0
    policies: PolicySet = field(default_factory=PolicySet)  # routing policies, compiled
    by_deployment: dict[str, tuple[ModelRoute, DeploymentRoute]] = field(default_factory=dict)  # built on first use
    experiments: tuple[ExperimentSpec, ...] = ()  # running and promoted routing experiments

    def resolve(self, name: str) -> ModelRoute | None:
        return self.models.get(name)

    def deployment(self, target: str) -> tuple[ModelRoute, DeploymentRoute] | None:
        """A ``provider/upstream-model`` target: the first model's deployment that matches it."""
        if not self.by_deployment and self.models:
            for route in self.public_models():
                for dep in route.deployments:
                    self.by_deployment.setdefault(f"{dep.provider.slug}/{dep.upstream_model}", (route, dep))
        return self.by_deployment.get(target)

    def public_models(self) -> list[ModelRoute]:
        seen: dict[str, ModelRoute] = {}
        for route in self.models.values():
            seen.setdefault(route.name, route)
        return sorted(seen.values(), key=lambda r: r.name)


def provider_config(provider: Provider) -> ProviderConfig:
    return ProviderConfig(
        id=provider.pk,
        slug=provider.slug,
        kind=provider.kind,
        base_url=provider.base_url,
        api_key=provider.api_key,
        extra_headers=dict(provider.extra_headers or {}),
        connect_timeout=provider.connect_timeout,
        read_timeout=provider.read_timeout,
        first_byte_timeout=provider.first_byte_timeout,
        total_timeout=provider.total_timeout,
        max_retries=provider.max_retries,
        responses_api=provider.responses_api,
        breaker=breaker_settings(provider),
        probe=ProbeSettings(
            enabled=provider.probe_enabled,
            interval=provider.probe_interval,
            request=dict(provider.probe_request) if isinstance(provider.probe_request, dict) else {},
        ),
        outlier_latency_factor=provider.outlier_latency_factor,
    )


def breaker_settings(provider: Provider) -> BreakerSettings:
    return BreakerSettings(
        failures=provider.breaker_failures,
        error_rate=provider.breaker_error_rate,
        min_requests=provider.breaker_min_requests,
        window=provider.breaker_window,
        cooldown=provider.breaker_cooldown,
    )


def _semantic_model(model: LLMModel) -> str:
    """The embedding model of the model's semantic cache, or "" (off; it needs the exact cache)."""
    return model.semantic_embedding_model if model.cache_enabled and model.semantic_cache_enabled else ""


def price_info(price: Price) -> PriceInfo:
    """A price row as the pipeline reads it: the cache prices filled in (empty means the input
    price), the per-unit prices of the media routes with it."""
    return PriceInfo(
        effective_from=price.effective_from,
        input_per_mtok=price.input_per_mtok,
        cached_input_per_mtok=price.cached_input_per_mtok
        if price.cached_input_per_mtok is not None
        else price.input_per_mtok,
        cache_write_per_mtok=price.cache_write_per_mtok
        if price.cache_write_per_mtok is not None
        else price.input_per_mtok,
        output_per_mtok=price.output_per_mtok,
        per_image=price.per_image,
        image_prices=tuple((str(k), Decimal(str(v))) for k, v in sorted((price.image_prices or {}).items())),
        audio_per_minute=price.audio_per_minute,
        per_mchars=price.per_mchars,
    )


def load_route_table() -> RouteTable:
    """Build the snapshot from the database (synchronous; call off the event loop)."""
    table = RouteTable(loaded_at=time.monotonic())
    models = LLMModel.objects.filter(is_active=True).prefetch_related("deployments__provider", "prices")
    for model in models:
        deployments = tuple(
            DeploymentRoute(
                id=d.pk,
                provider=provider_config(d.provider),
                upstream_model=d.upstream_model,
                priority=d.priority,
                weight=d.weight,
            )
            for d in model.deployments.all()
            if d.is_active and d.provider.is_active
        )
        prices = tuple(price_info(p) for p in sorted(model.prices.all(), key=lambda p: p.effective_from, reverse=True))
        route = ModelRoute(
            id=model.pk,
            name=model.name,
            kind=model.kind,
            owned_by=model.owned_by,
            created=int(model.created_at.timestamp()),
            context_window=model.context_window,
            max_output_tokens=model.max_output_tokens,
            deployments=deployments,
            prices=prices,
            aliases=tuple(model.aliases or ()),
            cache_ttl=model.cache_ttl if model.cache_enabled else 0,
            semantic_model=_semantic_model(model),
            semantic_threshold=model.semantic_threshold,
            strategy=model.strategy,
            cache_ttl_setting=model.cache_ttl,
        )
        table.models[model.name] = route
        for alias in model.aliases or ():
            table.models.setdefault(alias, route)
    table.policies = load_policies()
    table.experiments = load_experiments()
    return table


def load_experiments() -> tuple[ExperimentSpec, ...]:
    """Running and promoted experiments (a stored one whose arms no longer parse is left out, logged)."""
    found: list[ExperimentSpec] = []
    for row in Experiment.objects.filter(status__in=("running", "promoted")).order_by("slug"):
        try:
            arms = parse_arms(row.arms)
        except ExperimentError as err:
            log.error("experiment %s left out: %s", row.slug, err)
            continue
        found.append(
            ExperimentSpec(
                slug=row.slug,
                arms=arms,
                model=row.model,
                rule=row.rule,
                tenant_id=row.tenant_id,
                status=row.status,
                winner=row.winner,
            )
        )
    return tuple(found)


def load_policies() -> PolicySet:
    """Every active routing policy, compiled. One that no longer compiles is left out (and logged)."""
    compiled: dict[str, Policy] = {}
    for row in RoutingPolicy.objects.filter(is_active=True).prefetch_related("rules"):
        try:
            compiled[row.name] = parse_policy(
                row.name,
                [rule.as_config() for rule in row.rules.all()],
                row.fallback_chain,
                tenant_id=row.tenant_id,
                library=row.is_library,
            )
        except PolicyError as err:
            log.error("routing policy %s left out: %s", row.name, err)
    try:
        check_includes(compiled)
    except PolicyError as err:
        log.error("routing policies: %s", err)
    attached = [p for p in compiled.values() if not p.library]
    return PolicySet(
        global_policy=next((p for p in attached if p.tenant_id is None), None),
        by_tenant={p.tenant_id: p for p in attached if p.tenant_id is not None},
        by_name=compiled,
    )


_table: RouteTable | None = None
_lock: asyncio.Lock | None = None


async def route_table() -> RouteTable:
    global _table, _lock
    table = _table
    if table is not None and time.monotonic() - table.loaded_at < settings.CHITTYCAN_ROUTES_TTL:
        return table
    if _lock is None:
        _lock = asyncio.Lock()
    async with _lock:
        if _table is table:  # nobody reloaded while we waited
            _table = await sync_to_async(load_route_table, thread_sensitive=False)()
        assert _table is not None
        return _table


@invalidation.subscribe
def invalidate() -> None:
    global _table, _lock
    _table = None
    _lock = None


_DEV_MOCK = ProviderConfig(id=0, slug="dev-mock", kind="mock", base_url="")


_OLLAMA_KINDS = ("chat", "completion", "embedding")


def dev_route(name: str, known: ModelRoute | None) -> ModelRoute | None:
    """Dev mode: a catalogue model goes to Ollama when OLLAMA_BASE_URL is set, otherwise to the mock
    (the media models, images, audio and moderations, always to the mock: Ollama serves none of them).

    Prices stay those of the model asked for, so a team sees what it would cost. A name the
    catalogue does not know (neither a model nor an alias) is ``None``, the same 404
    ``model_not_found`` as in production, so a suite run against dev mode sees production's errors;
    ``CHITTYCAN_DEV_ACCEPT_ANY_MODEL`` serves every name instead (unknown names at $0).
    """
    if known is None and not settings.CHITTYCAN_DEV_ACCEPT_ANY_MODEL:
        return None
    if settings.OLLAMA_BASE_URL and (known is None or known.kind in _OLLAMA_KINDS):
        provider = ProviderConfig(id=0, slug="dev-ollama", kind="ollama", base_url=settings.OLLAMA_BASE_URL)
        deployment = DeploymentRoute(id=None, provider=provider, upstream_model=settings.CHITTYCAN_DEV_OLLAMA_MODEL)
    else:
        deployment = DeploymentRoute(id=None, provider=_DEV_MOCK, upstream_model=name)
    if known is not None:
        return ModelRoute(
            id=known.id,
            name=known.name,
            kind=known.kind,
            owned_by=known.owned_by,
            created=known.created,
            context_window=known.context_window,
            max_output_tokens=known.max_output_tokens,
            deployments=(deployment,),
            prices=known.prices,
            aliases=known.aliases,
            cache_ttl=known.cache_ttl,
            semantic_model=known.semantic_model,
            semantic_threshold=known.semantic_threshold,
            cache_ttl_setting=known.cache_ttl_setting,
        )
    return ModelRoute(
        id=None,
        name=name,
        kind="chat",
        owned_by="chittycan-dev",
        created=0,
        context_window=128_000,
        max_output_tokens=4096,
        deployments=(deployment,),
    )


async def passthrough_route(name: str, known: ModelRoute | None) -> ModelRoute:
    """Forward to the passthrough provider with the client's own key; price as the model if known."""
    table = await route_table()
    provider = next(
        (
            d.provider
            for r in table.public_models()
            for d in r.deployments
            if d.provider.slug == settings.CHITTYCAN_PASSTHROUGH_PROVIDER
        ),
        None,
    )
    if provider is None:
        provider = await sync_to_async(_provider_config_by_slug, thread_sensitive=False)(
            settings.CHITTYCAN_PASSTHROUGH_PROVIDER
        )
    deployment = DeploymentRoute(id=None, provider=provider, upstream_model=name)
    return ModelRoute(
        id=known.id if known else None,
        name=known.name if known else name,
        kind=known.kind if known else "chat",
        owned_by=known.owned_by if known else "passthrough",
        created=known.created if known else 0,
        context_window=known.context_window if known else 128_000,
        max_output_tokens=known.max_output_tokens if known else 16_384,
        deployments=(deployment,),
        prices=known.prices if known else (),
        aliases=known.aliases if known else (),
    )


def _provider_config_by_slug(slug: str) -> ProviderConfig:
    provider = Provider.objects.filter(slug=slug, is_active=True).first()
    if provider is None:
        raise ServiceUnavailable(
            f"Passthrough is on but the provider {slug!r} is not configured.", code="passthrough_unconfigured"
        )
    return provider_config(provider)
