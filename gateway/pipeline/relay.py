"""Stage 8, relay: the answer to the client in the route's wire format.

A complete answer is read for usage, priced and sent with ``X-ChittyCan-Cost``. A stream is
relayed item by item as it arrives (never buffered), framed by the wire format's tracker, with a
keepalive where the format has one. An error after the stream started goes out as the format's
in-stream error; a client that leaves cancels the relay (and so the upstream request).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import orjson

from core import money
from gateway import tracing
from gateway.context import RequestContext, Responder
from gateway.errors import GatewayError, UpstreamError
from gateway.formats import StreamTracker, WireFormat
from gateway.providers.base import close_stream
from gateway.routing import breaker

log = logging.getLogger(__name__)

Json = dict[str, Any]


async def upstream_failed(responder: Responder, ctx: RequestContext, wire: WireFormat, err: GatewayError) -> None:
    """Dispatch gave up before anything reached the client: the error in the route's envelope."""
    ctx.status, ctx.http_status, ctx.error_type = "upstream_error", err.status, err.code or err.type
    await responder.send_json(*wire.error_response(err, ctx))


async def send_result(responder: Responder, ctx: RequestContext, wire: WireFormat, result: Json) -> None:
    ctx.usage = wire.read_result(ctx, result)
    if ctx.trace is not None:
        tracing.finish_reasons(ctx.trace, result)
    assert ctx.route is not None
    ctx.cost_micro = money.cost_micro(ctx.route.price_for(ctx.deployment), ctx.usage)
    headers = wire.success_headers(ctx)
    headers.append((b"x-chittycan-cost", money.format_usd(ctx.cost_micro).encode()))
    await responder.send_json(200, orjson.dumps(result), headers)


async def send_stream(
    responder: Responder, ctx: RequestContext, wire: WireFormat, first: Json, rest: AsyncIterator[Json]
) -> None:
    """Relay an opened stream (its first item already read by dispatch) to its end."""
    ctx.ttft_ms = ctx.elapsed_ms()
    ctx.stage("upstream_first_chunk")
    headers = wire.success_headers(ctx)
    headers.append((b"content-type", wire.stream_content_type(ctx, first)))
    headers.append((b"cache-control", b"no-cache"))
    await responder.start_stream(headers)
    tracker = wire.stream_tracker(ctx)
    try:
        await _relay(responder, tracker, chain(first, rest))
        ctx.usage = tracker.usage()
        assert ctx.route is not None
        ctx.cost_micro = money.cost_micro(ctx.route.price_for(ctx.deployment), ctx.usage)
        ctx.stage("relay")
        if ctx.status == "ok":
            await responder.write(tracker.closing(money.format_usd(ctx.cost_micro)))
            if ctx.deployment is not None:
                # The upstream streamed to its end: a half-open probe's success closes the breaker.
                probe, ctx.stream_probe = ctx.stream_probe, None
                await breaker.record(ctx.deployment, probe, None)
    except asyncio.CancelledError:
        ctx.status, ctx.http_status = "client_disconnected", 499
        raise
    except GatewayError as err:
        # The stream broke after it started: the client gets the format's error event (never a
        # clean end); the ledger row keeps the partial usage with status upstream_error and
        # http_status 200 (what marks a stream cut after its start); the breaker counts a failure.
        ctx.status, ctx.error_type = "upstream_error", err.code or err.type
        await responder.write(tracker.error_frame(err))
        if ctx.deployment is not None and isinstance(err, UpstreamError):
            probe, ctx.stream_probe = ctx.stream_probe, None
            await breaker.record(ctx.deployment, probe, err)  # a probe's failure reopens it
    except Exception as exc:
        log.exception("stream relay failed", extra={"request_id": ctx.request_id})
        ctx.status, ctx.error_type = "error", type(exc).__name__
        await responder.write(tracker.error_frame(UpstreamError("The upstream stream failed.", retryable=False)))
    finally:
        if ctx.usage is None:
            ctx.usage = tracker.usage()  # what was relayed before the end, estimated where unreported
        await asyncio.shield(close_stream(rest))
        if ctx.stream_probe is not None:
            # The probe ended without a verdict (the client left): another request may probe.
            probe, ctx.stream_probe = ctx.stream_probe, None
            await asyncio.shield(breaker.release(probe))
    await responder.finish()


async def _relay(responder: Responder, tracker: StreamTracker, items: AsyncIterator[Json]) -> None:
    recorded = tracker.ctx.cache_items  # the response cache records a streamed miss
    traced = tracker.ctx.trace  # finish reasons for the request's span (tracing on)
    paced = items if tracker.keepalive is None else with_keepalive(items, tracker.keepalive)
    async with contextlib.aclosing(paced) as stream:  # type: ignore[type-var]
        async for item in stream:
            if item is None:
                await responder.write(tracker.ping)
                continue
            if recorded is not None:
                recorded.append(dict(item))  # as it came (the tracker may trim it for this client)
            if traced is not None:
                tracing.stream_item(traced, item)
            frame = tracker.frame(item)
            if frame is not None:
                await responder.write(frame)
            if tracker.stopped:
                return


async def chain(first: Json, rest: AsyncIterator[Json]) -> AsyncGenerator[Json, None]:
    """The stream's first item (already read by dispatch) followed by the rest."""
    yield first
    async for item in rest:
        yield item


async def _next_or_end(iterator: AsyncIterator[Json]) -> Json | None:
    try:
        return await anext(iterator)
    except StopAsyncIteration:
        return None


async def with_keepalive(events: AsyncIterator[Json], interval: float) -> AsyncGenerator[Json | None, None]:
    """The events, with ``None`` each time ``interval`` seconds pass without one."""
    pending: asyncio.Future[Json | None] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(_next_or_end(events))
            done, _ = await asyncio.wait({pending}, timeout=interval)
            if not done:
                yield None
                continue
            item, pending = pending.result(), None
            if item is None:
                return
            yield item
    finally:
        if pending is not None and not pending.done():
            pending.cancel()
            await asyncio.gather(pending, return_exceptions=True)
