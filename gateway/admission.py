"""Enforcement before the upstream call and settlement after it (the limit, reserve and settle stages).

``rate_limit`` checks the rate limits (``gateway.limits``); ``reserve`` computes the request's
worst-case cost (every input token, padded by 10 %, at the highest input rate plus the largest
possible output, plus the most images, audio minutes and characters it may bill: docs/media.md)
and asks the budget service to reserve it on every budget counter of the key and of each ancestor
tenant, plus one request on every plan quota, all or nothing
(``budgets.service``); a refusal is a 402. ``settle`` corrects the rate windows and settles the
reservation to the actual cost, exactly once. See docs/budgets.md.

When Redis is unreachable, ``CHITTYCAN_REDIS_FAILURE_POLICY`` decides: ``refuse`` answers 503
with ``retry-after``; ``degrade`` enforces budgets in PostgreSQL alone (row locks) and rate limits
per process. There is no fail-open path.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime

from django.conf import settings

from budgets import counters, service
from core import money
from core.runtime import RedisBatch
from gateway import limits
from gateway.context import RequestContext
from gateway.errors import QuotaExceeded, RateLimited, ServiceUnavailable
from tenants.keyinfo import KeyInfo

#: Input estimates are padded by 10 % (plus a few tokens) so a reservation covers tokenizer drift.
INPUT_MARGIN = 1.10
INPUT_OVERHEAD_TOKENS = 16


def reservation_micro(ctx: RequestContext, max_output_tokens: int) -> int:
    assert ctx.route is not None
    prompt = math.ceil(ctx.estimated_prompt_tokens * INPUT_MARGIN) + INPUT_OVERHEAD_TOKENS
    price = ctx.route.worst_price()
    units = money.cost_micro(price, ctx.most_units) if ctx.most_units is not None else 0  # images, audio, characters
    return money.worst_case_micro(price, prompt, max_output_tokens) + units


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


async def rate_limit(ctx: RequestContext, tokens: int) -> None:
    """RPM/TPM for the key and its tenants.

    With Redis, the windows are only planned here (``ctx.rate_plan``): the reserve stage takes them
    in the same script as the reservation, one round trip for both. Without Redis (or with Redis
    down under the ``degrade`` policy) they are counted in this process now.
    """
    key = ctx.key
    assert key is not None
    if settings.REDIS_URL and not counters.redis_suspect():
        ctx.rate_plan = limits.plan(key, tokens)
        return
    _limit_locally(ctx, key, tokens)


def _limit_locally(ctx: RequestContext, key: KeyInfo, tokens: int) -> None:
    if not limits.windows_for(key, tokens):
        return  # nothing to enforce: Redis is not needed, whatever its state
    if settings.REDIS_URL:
        _degrading()
    _apply(ctx, limits.hit(key, tokens))


def _apply(ctx: RequestContext, result: limits.RateResult | None) -> None:
    """Rate-limit headers on the answer; a 429 if a window was full; else what to settle."""
    if result is None:
        return
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
    ctx.rate_ticket = result.ticket


async def reserve(ctx: RequestContext, max_output_tokens: int) -> None:
    """The worst-case reservation on every budget and quota counter, all or nothing, with the
    rate-limit windows the limit stage planned (one Redis round trip for both).

    A refusal also gives back what the rate limiter took: the request never happened.
    """
    ctx.reserved_micro = reservation_micro(ctx, max_output_tokens)
    key = ctx.key
    assert key is not None
    when = datetime.fromtimestamp(ctx.created_at, UTC)
    rate, ctx.rate_plan = ctx.rate_plan, None
    if rate is not None:
        try:
            outcome, gated = await service.reserve_gated(
                ctx.request_id, key, when, ctx.reserved_micro, limits.gates(rate), limits.GATE_TTL
            )
        except counters.CounterUnavailable:
            _limit_locally(ctx, key, rate.tokens)  # Redis failed: the two-step way below, per the policy
        else:
            admitted = not isinstance(outcome, service.Refusal)
            _apply(ctx, limits.taken(rate, gated, tokens_counted=admitted))
            if isinstance(outcome, service.Refusal):
                raise _refusal(outcome)  # the request windows counted it; the token windows did not
            ctx.reservation = outcome
            return
    try:
        found = await service.reserve(ctx.request_id, key, when, ctx.reserved_micro)
    except counters.EnforcementUnavailable:
        await _release_rate(ctx)
        raise _policy_error() from None
    except BaseException:
        await _release_rate(ctx)
        raise
    if isinstance(found, service.Refusal):
        await _release_rate(ctx)
        raise _refusal(found)
    ctx.reservation = found


async def count_cache_hit(ctx: RequestContext) -> None:
    """A response-cache hit: it counts in the request windows the limit stage planned (a full one
    is a 429), never in the token windows, and reserves no budget."""
    rate, ctx.rate_plan = ctx.rate_plan, None
    key = ctx.key
    if rate is None or key is None:
        return
    try:
        _, gated = await counters.primary_redis().admit(
            ctx.request_id, key.root_id, [], limits.gates(rate), limits.GATE_TTL
        )
    except counters.CounterUnavailable:
        _limit_locally(ctx, key, rate.tokens)
        return
    _apply(ctx, limits.taken(rate, gated, tokens_counted=False))


async def _release_rate(ctx: RequestContext) -> None:
    ticket, ctx.rate_ticket = ctx.rate_ticket, None
    if ticket is not None:
        try:
            await limits.adjust(ticket, 0)
        except counters.CounterUnavailable:
            counters.redis_failed()


async def settle(ctx: RequestContext) -> None:
    """Bring the rate ticket and the reservation to what was used. Runs once per request.

    With Redis the corrections are queued on ``ctx.closing``, which the record stage sends with
    the ledger hand-off: one round trip after the upstream call."""
    ctx.reserved_micro = 0
    reached = ctx.reached_provider
    batch = ctx.closing = RedisBatch() if settings.REDIS_URL else None
    ticket, ctx.rate_ticket = ctx.rate_ticket, None
    if ticket is not None:
        used = ctx.usage.prompt_tokens + ctx.usage.completion_tokens if ctx.usage is not None and reached else 0
        try:
            await limits.adjust(ticket, used, batch)
        except counters.CounterUnavailable:
            counters.redis_failed()
    reservation, ctx.reservation = ctx.reservation, None
    if reservation is not None:
        await service.settle(reservation, ctx.cost_micro if reached else 0, 1 if reached else 0, batch)
