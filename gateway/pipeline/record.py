"""Stage 10, record: one ledger row for every request that reached a provider.

The row (a plain dict, ``created_at`` a Unix timestamp) is built here from the context and handed
durably to the ledger's writer (``ledger.writer``: a Redis stream, or the local spool when Redis is
unreachable); the writer inserts it, idempotent by request id. With Redis, the hand-off goes in one
round trip with the settle stage's commands (``ctx.closing``). Its summary then goes to the
dashboard's live feed (``ledger.feed``: the tenant's and its ancestors' groups, without waiting).
"""

from __future__ import annotations

from typing import Any

from gateway import metrics, tracing
from gateway.context import RequestContext
from gateway.errors import GatewayError
from gateway.routing import breaker, latency
from ledger import feed, writer


async def run(ctx: RequestContext) -> None:
    batch, ctx.closing = ctx.closing, None
    row = row_from_context(ctx) if ctx.reached_provider or ctx.cache_hit else None
    if row is not None:
        await writer.hand_off_or_spool(row, batch)
    if ctx.deployment is not None and ctx.status == "ok" and not ctx.cache_hit:
        # The p50 a routing policy reads (``p50_ms``): time to the first byte, or the whole answer.
        latency.observe(
            breaker.breaker_id(ctx.deployment), ctx.ttft_ms if ctx.ttft_ms is not None else ctx.elapsed_ms()
        )
    if batch is not None:
        await batch.send()
    if row is not None and ctx.key is not None:
        feed.publish(row, (t.id for t in ctx.key.lineage))
    if ctx.trace is not None:
        tracing.export(ctx)
    metrics.observe(ctx)


def refused(ctx: RequestContext, err: GatewayError) -> None:
    """A request refused before reserve (bad input, key, limit): metrics and log line only."""
    ctx.status, ctx.http_status, ctx.error_type = "refused", err.status, err.type
    if ctx.trace is not None:
        tracing.export(ctx)
    metrics.observe(ctx)


def row_from_context(ctx: RequestContext) -> dict[str, Any]:
    usage = ctx.usage
    key = ctx.key
    deployment = ctx.deployment
    return {
        "request_id": ctx.request_id,
        "created_at": ctx.created_at,
        "tenant_id": key.tenant.id if key else None,
        "api_key_id": key.id if key else None,
        "endpoint": ctx.endpoint,
        "requested_model": ctx.requested_model[:200],
        "served_model": deployment.upstream_model if deployment else "",
        "provider": deployment.provider.slug if deployment else "",
        "deployment_id": deployment.id if deployment else None,
        "prompt_tokens": usage.prompt_tokens if usage else 0,
        "cached_tokens": usage.cached_tokens if usage else 0,
        "cache_write_tokens": usage.cache_write_tokens if usage else 0,
        "completion_tokens": usage.completion_tokens if usage else 0,
        "reasoning_tokens": usage.reasoning_tokens if usage else 0,
        "images": usage.images if usage else 0,
        "audio_ms": usage.audio_ms if usage else 0,
        "characters": usage.characters if usage else 0,
        "cost_micro": ctx.cost_micro,
        "usage_source": usage.source if usage else "estimated",
        "latency_ms": ctx.elapsed_ms(),
        "ttft_ms": ctx.ttft_ms,
        "status": ctx.status,
        "http_status": ctx.http_status,
        "error_type": ctx.error_type[:100],
        "stream": ctx.stream,
        "cache_hit": ctx.cache_hit,
        "saved_micro": ctx.saved_micro,
        "coalesced": ctx.coalesced,
        "end_user": ctx.end_user[:200],
        "timings": ctx.timings,
        "attempts": ctx.attempt_log,
        "route": route_explanation(ctx),
        "experiment": ctx.experiment,
        "arm": ctx.arm,
    }


def route_explanation(ctx: RequestContext) -> dict[str, Any]:
    """Why this model: the routing policy's decision, and what dispatch did with it."""
    if not ctx.route_explanation:
        return {}
    served = ctx.deployment
    return {
        **ctx.route_explanation,
        "served": f"{served.provider.slug}/{served.upstream_model}" if served else None,
        "outcome": ctx.route_reason,
    }
