"""Stage 4, route: from a public model name to the ordered deployments that may serve it.

The route table is an immutable snapshot of providers, models, deployments and prices, loaded from
the database off the event loop and kept for ``CHITTYCAN_ROUTES_TTL`` seconds or until a config
change is announced (see ``core.invalidation``). The hot path never queries the database.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal

from asgiref.sync import sync_to_async
from django.conf import settings
from django.utils import timezone

from core import invalidation
from core.money import PriceInfo
from gateway.errors import ServiceUnavailable
from gateway.models import LLMModel, Price, Provider
from gateway.providers.base import BreakerSettings, ProviderConfig


@dataclass(frozen=True, slots=True)
class DeploymentRoute:
    id: int | None
    provider: ProviderConfig
    upstream_model: str
    priority: int = 0
    weight: int = 1


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

    def price_at(self, when: datetime | None = None) -> PriceInfo | None:
        when = when or timezone.now()
        for price in self.prices:
            if price.effective_from <= when:
                return price
        return None

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


@dataclass(slots=True)
class RouteTable:
    models: dict[str, ModelRoute] = field(default_factory=dict)  # public names and aliases
    loaded_at: float = 0.0

    def resolve(self, name: str) -> ModelRoute | None:
        return self.models.get(name)

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
        max_retries=provider.max_retries,
        responses_api=provider.responses_api,
        breaker=breaker_settings(provider),
    )


def breaker_settings(provider: Provider) -> BreakerSettings:
    return BreakerSettings(
        failures=provider.breaker_failures,
        error_rate=provider.breaker_error_rate,
        min_requests=provider.breaker_min_requests,
        window=provider.breaker_window,
        cooldown=provider.breaker_cooldown,
    )


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
        )
        table.models[model.name] = route
        for alias in model.aliases or ():
            table.models.setdefault(alias, route)
    return table


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
