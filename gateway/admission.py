"""Stages 3, 5 and 8: admission before the upstream call, settlement after it.

``admit`` checks the rate limits (``gateway.limits``), computes the request's worst-case cost
(every input token, padded by 10 %, at the highest input rate plus the largest possible output)
and asks the budget service to reserve it on every budget counter of the key and of each
ancestor tenant, plus one request on every plan quota, all or nothing (``budgets.service``); a
refusal is a 402. ``settle`` corrects the rate windows and settles the reservation to the actual
cost, exactly once. See docs/budgets.md.

When Redis is unreachable, ``CHITTYCAN_REDIS_FAILURE_POLICY`` decides: ``refuse`` answers 503
with ``retry-after``; ``degrade`` enforces budgets in PostgreSQL alone (row locks) and rate limits
per process. There is no fail-open path. Passthrough mode's tenant and routes live here too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime

from asgiref.sync import sync_to_async
from django.conf import settings

from budgets import counters, service
from core import invalidation, money
from gateway import limits
from gateway.context import RequestContext
from gateway.errors import QuotaExceeded, RateLimited, ServiceUnavailable
from gateway.models import Provider
from gateway.providers.base import ProviderConfig
from gateway.routing import DeploymentRoute, ModelRoute, _provider_config, route_table
from tenants import services
from tenants.keyinfo import KeyInfo, load_key

#: Input estimates are padded by 10 % (plus a few tokens) so a reservation covers tokenizer drift.
INPUT_MARGIN = 1.10
INPUT_OVERHEAD_TOKENS = 16


def reservation_micro(ctx: RequestContext, max_output_tokens: int) -> int:
    assert ctx.route is not None
    prompt = math.ceil(ctx.estimated_prompt_tokens * INPUT_MARGIN) + INPUT_OVERHEAD_TOKENS
    return money.worst_case_micro(ctx.route.price_at(), prompt, max_output_tokens)


@dataclass(slots=True)
class Ticket:
    """What ``admit`` took and ``settle`` must give back (kept in ``ctx.reservations``)."""

    reservation: service.Reservation | None = None
    rate: limits.RateTicket | None = None
    settled: bool = False


def _policy_error() -> ServiceUnavailable:
    wait = str(settings.CHITTYCAN_REDIS_RETRY_AFTER)
    return ServiceUnavailable(
        "Budget and rate-limit enforcement is unavailable (Redis unreachable); retry later.",
        code="enforcement_unavailable",
        headers={"retry-after": wait},
    )


def _degrading() -> bool:
    """Redis is unreachable: refuse (raise 503) or go on with the per-process path."""
    try:
        counters.degrade_or_refuse()
    except counters.EnforcementUnavailable:
        raise _policy_error() from None
    return True


def _usd(micro: int) -> str:
    return money.format_usd(micro).rstrip("0").rstrip(".") if micro else "0"


def _refusal(refusal: service.Refusal) -> QuotaExceeded:
    if refusal.quota:
        return QuotaExceeded(
            f"The monthly request quota of {refusal.limit} for tenant {refusal.tenant} is used up "
            f"({refusal.period_label}). Upgrade the plan or wait for the next month."
        )
    who = f"tenant {refusal.tenant}" if refusal.scope == "tenant" else "this API key"
    return QuotaExceeded(
        f"Hard budget exceeded for {who}: limit ${_usd(refusal.limit)} per {refusal.period}, "
        f"${_usd(refusal.left)} left, and this request may cost up to ${_usd(refusal.amount)} "
        f"(lower max_tokens to reserve less)."
    )


async def _rate_limit(ctx: RequestContext, key: KeyInfo, tokens: int) -> limits.RateTicket | None:
    if not limits.windows_for(key, tokens):
        return None  # nothing to enforce: Redis is not needed, whatever its state
    result: limits.RateResult | None
    if settings.REDIS_URL and not counters.redis_suspect():
        try:
            result = await limits.hit(key, tokens, use_redis=True)
        except counters.CounterUnavailable:
            counters.redis_failed()
            _degrading()
            result = await limits.hit(key, tokens, use_redis=False)
    elif settings.REDIS_URL:
        _degrading()
        result = await limits.hit(key, tokens, use_redis=False)
    else:
        result = await limits.hit(key, tokens, use_redis=False)
    if result is None:
        return None
    ctx.extra_headers.extend(result.headers)
    if not result.allowed:
        assert result.refused is not None
        what = "requests" if result.refused.kind == "r" else "tokens"
        scope = "this API key" if result.refused.name.startswith("k") else "the tenant"
        raise RateLimited(
            f"Rate limit reached for {scope}: {result.refused.limit} {what} per minute. "
            f"Try again in {result.retry_after} s.",
            headers={"retry-after": str(result.retry_after)},
        )
    return result.ticket


async def admit(ctx: RequestContext, max_output_tokens: int) -> None:
    """Rate limits, then the worst-case reservation on every budget and quota counter."""
    ctx.reserved_micro = reservation_micro(ctx, max_output_tokens)
    key = ctx.key
    assert key is not None
    ticket = Ticket()
    ticket.rate = await _rate_limit(ctx, key, ctx.estimated_prompt_tokens + max_output_tokens)
    when = datetime.fromtimestamp(ctx.created_at, UTC)
    try:
        outcome = await service.reserve(ctx.request_id, key, when, ctx.reserved_micro)
    except counters.EnforcementUnavailable:
        await _release_rate(ticket)
        raise _policy_error() from None
    except BaseException:
        await _release_rate(ticket)
        raise
    if isinstance(outcome, service.Refusal):
        await _release_rate(ticket)
        raise _refusal(outcome)
    ticket.reservation = outcome
    ctx.reservations.append(ticket)


async def _release_rate(ticket: Ticket) -> None:
    if ticket.rate is not None:
        try:
            await limits.adjust(ticket.rate, 0)
        except counters.CounterUnavailable:
            counters.redis_failed()


async def settle(ctx: RequestContext) -> None:
    """Bring reservations to the actual cost. Idempotent by request id (and per context)."""
    ctx.reserved_micro = 0
    for ticket in ctx.reservations:
        if not isinstance(ticket, Ticket) or ticket.settled:
            continue
        ticket.settled = True
        reached = ctx.reached_provider
        actual = ctx.cost_micro if reached else 0
        if ticket.rate is not None:
            used = ctx.usage.prompt_tokens + ctx.usage.completion_tokens if ctx.usage is not None and reached else 0
            try:
                await limits.adjust(ticket.rate, used)
            except counters.CounterUnavailable:
                counters.redis_failed()
        if ticket.reservation is not None:
            await service.settle(ticket.reservation, actual, 1 if reached else 0)


# --- passthrough mode -------------------------------------------------------------------------

_passthrough: dict[str, KeyInfo] = {}


@invalidation.subscribe
def forget_passthrough_key() -> None:
    """Drop the cached passthrough key (its tenant's limits may have changed)."""
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
    return _provider_config(provider)
