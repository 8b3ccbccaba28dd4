"""Stage 7, dispatch: call the route's deployments in order with retries and fallback.

A half-open deployment (its breaker's cool-down over) takes one probe request. A stream does not
take it while a deployment this process last saw closed remains after it: a stream cut after its
first chunk cannot fail over, so it skips the deployment (``breaker half-open`` in
``X-ChittyCan-Route`` and the ledger's attempts) and asks for an on-demand health probe instead
(``health.probe_soon``); a non-stream request, whose failed probe fails over, or a stream with no
other deployment left, takes it.

Only retryable errors are retried (with exponential backoff and jitter, honouring a short
``retry-after``) or failed over to the next deployment; a stream is retried only before its first
chunk, that is before any byte could have reached the client.

Per-hop timeouts (``DeploymentRoute.timeouts``, else the provider's settings): *connect* is the
HTTP client's; *first byte* bounds an attempt until its answer (a stream: its first chunk);
*total* bounds the whole attempt, a stream included. A timeout before the first chunk is retried
or fails over like any retryable error; a stream that runs past its total limit after its first
chunk ends with the wire format's error event (the relay's), never a clean end.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any

from core import backoff
from gateway import tracing
from gateway.context import RequestContext
from gateway.errors import GatewayError, InvalidRequest, UpstreamError
from gateway.providers import get_provider
from gateway.providers.base import NativeMessages, NativeResponses, Operation, Provider, UpstreamCall, close_stream
from gateway.providers.bridge import MessagesViaChat
from gateway.providers.responses_bridge import ResponsesViaChat
from gateway.routing import breaker, health, inflight
from gateway.routing.table import DeploymentRoute

Json = dict[str, Any]

log = logging.getLogger(__name__)

MAX_BACKOFF = 2.0


def _delay(attempt: int, err: UpstreamError, *, fallback: bool) -> float | None:
    """Seconds to wait before retrying the same deployment, or None to move on to the next.

    A 429 with a fallback deployment available moves on at once instead of waiting out
    ``retry-after``; without one, a short ``retry-after`` is honoured. Otherwise exponential
    backoff with full jitter (anywhere between 0 and the capped exponential delay).
    """
    if err.code == "upstream_auth_failed":
        return None
    if err.status == 429 and fallback:
        return None
    for header, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        raw = err.headers.get(header)
        if raw:
            try:
                wanted = float(raw) * scale
            except ValueError:
                break
            return wanted if wanted <= MAX_BACKOFF else None
    return backoff.delay(attempt, base=0.1, cap=MAX_BACKOFF, low=0.0, high=1.0)


def make_call(ctx: RequestContext, deployment: DeploymentRoute, body: Json | None = None) -> UpstreamCall:
    upstream_body = dict(body if body is not None else ctx.body)
    upstream_body["model"] = deployment.upstream_model
    headers = dict(ctx.upstream_headers)
    if ctx.trace is not None:
        headers.update(ctx.trace.upstream_headers())  # W3C traceparent: this attempt's span
    return UpstreamCall(
        provider=deployment.provider,
        upstream_model=deployment.upstream_model,
        body=upstream_body,
        api_key=ctx.passthrough_key,
        headers=headers,
        max_output_tokens=ctx.route.max_output_tokens if ctx.route is not None else 4096,
        connect_timeout=deployment.timeouts.connect,
    )


def _attempt_entry(
    ctx: RequestContext,
    deployment: DeploymentRoute,
    why: str,
    began: float | None,
    outcome: str,
    status: int | None = None,
    error: str = "",
) -> dict[str, Any]:
    """One upstream attempt as the ledger keeps it (``UsageRecord.attempts``): which deployment, why
    it was tried (primary, retry or fallback after what), when (ms from the request's start), how
    long, and how it ended (ok, error, cancelled, or skipped with its breaker open)."""
    now = time.perf_counter()
    start = began if began is not None else now
    return {
        "n": len(ctx.attempt_log) + 1,
        "deployment_id": deployment.id,
        "provider": deployment.provider.slug,
        "model": deployment.upstream_model,
        "why": why,
        "start_ms": round((start - ctx.started) * 1000, 3),
        "ms": round((now - start) * 1000, 3),
        "outcome": outcome,
        "status": status,
        "error": error,
    }


def first_byte_limit(deployment: DeploymentRoute) -> float | None:
    """Seconds an attempt may wait for its answer (a stream: its first chunk); None: unbounded here.

    The hop's own first-byte limit, else the provider's; never more than the total limit.
    """
    hop, provider = deployment.timeouts, deployment.provider
    first = hop.first_byte if hop.first_byte is not None else provider.first_byte_timeout
    total = total_limit(deployment)
    if first is None:
        return total
    return first if total is None else min(first, total)


def total_limit(deployment: DeploymentRoute) -> float | None:
    """Seconds a whole attempt may take (a stream: to its end); None: no limit."""
    hop = deployment.timeouts.total
    return hop if hop is not None else deployment.provider.total_timeout


def _timed_out(deployment: DeploymentRoute, what: str, limit: float) -> UpstreamError:
    return UpstreamError(
        f"upstream {deployment.provider.slug} sent no {what} within {limit:g} s",
        retryable=True,
        status=504,
        code="timeout",
    )


async def _until_deadline(
    deployment: DeploymentRoute, stream: AsyncIterator[Json], deadline: float, limit: float
) -> AsyncGenerator[Json, None]:
    """The rest of a stream, cut with a timeout error (the relay's in-stream error) at ``deadline``."""
    try:
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    item = await anext(stream)
            except StopAsyncIteration:
                return
            except TimeoutError:
                raise UpstreamError(
                    f"upstream {deployment.provider.slug} stream exceeded its total timeout of {limit:g} s",
                    retryable=True,
                    status=504,
                    code="timeout",
                ) from None
            yield item
    finally:
        await close_stream(stream)


def _counts_in_flight(ctx: RequestContext) -> bool:
    """Whether this request's attempts are counted in flight (the ``least_in_flight`` strategy)."""
    return ctx.route is not None and ctx.route.strategy == "least_in_flight"


async def _start_in_flight(ctx: RequestContext, deployment: DeploymentRoute) -> inflight.Slot | None:
    if not _counts_in_flight(ctx):
        return None
    return await inflight.start(breaker.breaker_id(deployment), total_limit(deployment))


async def _end_in_flight(slot: inflight.Slot | None) -> None:
    if slot is not None:
        await asyncio.shield(inflight.end(slot))  # a cancelled request still ends its count


class _InFlightStream:
    """A stream counted in flight on its deployment until it ends or is closed."""

    def __init__(self, stream: AsyncIterator[Json], slot: inflight.Slot) -> None:
        self._stream = stream
        self._slot: inflight.Slot | None = slot

    def __aiter__(self) -> _InFlightStream:
        return self

    async def __anext__(self) -> Json:
        try:
            return await anext(self._stream)
        except StopAsyncIteration:
            await self.aclose()
            raise

    async def aclose(self) -> None:
        slot, self._slot = self._slot, None
        try:
            await close_stream(self._stream)
        finally:
            await _end_in_flight(slot)


def _client_key_rejected(exc: UpstreamError) -> UpstreamError:
    """Passthrough: the provider refused the client's own key, so the client hears it as a 401."""
    message = exc.message.removeprefix("upstream rejected the gateway's credentials: ")
    return UpstreamError(message, retryable=False, status=401, type="invalid_request_error", code="invalid_api_key")


async def _attempts(
    ctx: RequestContext, attempt_fn: Callable[[DeploymentRoute], Awaitable[Any]], *, stream: bool = False
) -> Any:
    """Try the route's deployments in order: an open breaker skips one at once (no upstream call).

    A stream's success is the relay's to report (at its clean end; a failure after the first byte
    counts against the breaker), a half-open probe's too: the probe's admission goes to
    ``ctx.stream_probe``, and only a stream that completes closes the breaker.
    """
    assert ctx.route is not None
    deployments = ctx.route.ordered_deployments()
    if not deployments:
        raise GatewayError(f"The model {ctx.route.name} has no active deployment.", status=503, code="no_deployment")
    last: UpstreamError | None = None
    skipped: list[str] = []
    kept_off: list[str] = []  # half-open deployments a stream skipped (their probe is a non-stream's)
    kept_off_failing: list[str] = []  # closed deployments on a failure streak a stream skipped
    why = "primary"
    # (index in the route, deployment, last resort): a half-open deployment a stream skipped comes
    # again at the end, as the probe, if nothing after it served the request.
    plan = [(index, deployment, False) for index, deployment in enumerate(deployments)]
    later: list[tuple[int, DeploymentRoute, bool]] = []
    pos = 0
    while True:
        if pos == len(plan):
            if not later:
                break
            plan += later
            later = []
        index, deployment, last_resort = plan[pos]
        pos += 1
        may_probe = (
            last_resort
            or not stream
            or not any(breaker.cached_state(d) in (None, "closed") for d in deployments[index + 1 :])
        )
        if (
            stream
            and not last_resort
            and breaker.failing(deployment)
            and any(
                breaker.cached_state(d) in (None, "closed") and not breaker.failing(d) for d in deployments[index + 1 :]
            )
        ):
            # Its last attempts failed: a stream that started there could not be retried. It comes
            # again at the end if nothing after it served the request.
            name = f"{deployment.provider.slug}:{deployment.upstream_model}"
            kept_off_failing.append(name)
            later.append((index, deployment, True))
            ctx.attempt_log.append(_attempt_entry(ctx, deployment, why, None, "skipped", error="breaker_failing"))
            why = "fallback: failing"
            continue
        admission = await breaker.admit(deployment, may_probe=may_probe)
        if admission is None:
            name = f"{deployment.provider.slug}:{deployment.upstream_model}"
            if not may_probe and breaker.cached_state(deployment) == "half_open":
                kept_off.append(name)
                later.append((index, deployment, True))
                ctx.attempt_log.append(_attempt_entry(ctx, deployment, why, None, "skipped", error="breaker_half_open"))
                why = "fallback: breaker half-open"
                health.probe_soon(ctx.route, deployment)
                continue
            skipped.append(name)
            ctx.attempt_log.append(_attempt_entry(ctx, deployment, why, None, "skipped", error="breaker_open"))
            why = "fallback: breaker open"
            continue
        breaker.budget_deposit(admission)
        # The half-open probe is one request: it is not retried (its failure reopens the breaker).
        retries = 0 if admission.probe else deployment.provider.max_retries
        fallback = any(not breaker.known_open(d) for d in deployments[index + 1 :])
        attempt = 0
        limit = first_byte_limit(deployment)
        while True:
            ctx.attempts += 1
            ctx.deployment = deployment
            if ctx.trace is not None:
                tracing.new_attempt(ctx.trace)
            began = time.perf_counter()
            started = time.monotonic()
            try:
                if limit is None:
                    result = await attempt_fn(deployment)
                else:
                    try:
                        async with asyncio.timeout(limit) as within:
                            result = await attempt_fn(deployment)
                    except TimeoutError:
                        if not within.expired():
                            raise
                        raise _timed_out(deployment, "answer" if not stream else "first chunk", limit) from None
            except UpstreamError as exc:
                last = exc
                entry = _attempt_entry(ctx, deployment, why, began, "error", exc.upstream_status, exc.code or exc.type)
                ctx.attempt_log.append(entry)
                log.info(
                    "upstream attempt failed",
                    extra={"request_id": ctx.request_id, "provider": deployment.provider.slug, "error": exc.message},
                )
                if ctx.passthrough_key and exc.code == "upstream_auth_failed":
                    # The client's own key was refused: says nothing about the upstream's health.
                    await breaker.record(deployment, admission, _client_key_rejected(exc))
                    raise _client_key_rejected(exc) from exc
                await breaker.record(deployment, admission, exc)
                if not exc.retryable:
                    raise
                wait = _delay(attempt, exc, fallback=fallback) if attempt < retries else None
                if wait is None or not breaker.budget_spend(admission):
                    why = f"fallback after {entry['status'] or ''} {entry['error']}".replace("  ", " ")
                    break
                why = f"retry after {entry['status'] or ''} {entry['error']}".replace("  ", " ")
                await asyncio.sleep(wait)
                attempt += 1
                continue
            except BaseException as exc:
                outcome = "cancelled" if isinstance(exc, asyncio.CancelledError) else "error"
                error = getattr(exc, "code", None) or getattr(exc, "type", None) or type(exc).__name__
                ctx.attempt_log.append(_attempt_entry(ctx, deployment, why, began, outcome, None, str(error)))
                await asyncio.shield(breaker.release(admission))  # cancelled: let another request probe
                raise
            ctx.attempt_log.append(_attempt_entry(ctx, deployment, why, began, "ok", 200))
            if not stream:
                await breaker.record(deployment, admission, None)
            elif admission.probe:
                ctx.stream_probe = admission  # settled by the relay when the stream ends
            await health.observe(ctx.route.deployments, deployment, time.monotonic() - started)
            ctx.route_reason = "primary" if index == 0 else f"fallback:{index}"
            if skipped:
                ctx.route_reason += f" (breaker open: {', '.join(skipped)})"
            if kept_off:
                ctx.route_reason += f" (breaker half-open, probe left to a non-stream request: {', '.join(kept_off)})"
            if kept_off_failing:
                ctx.route_reason += f" (failing, kept off for a stream: {', '.join(kept_off_failing)})"
            return result
    if last is None:
        raise GatewayError(
            f"Every deployment of the model {ctx.route.name} is unavailable (circuit breaker open); retry shortly.",
            status=503,
            type="api_error",
            code="upstream_unavailable",
        )
    raise last


def _messages(provider: Provider) -> NativeMessages | MessagesViaChat:
    """A provider's Anthropic Messages face: its own, or translated through its chat."""
    return provider if isinstance(provider, NativeMessages) else MessagesViaChat(provider)


def _responses(provider: Provider, call: UpstreamCall) -> NativeResponses | ResponsesViaChat:
    """A provider's Responses API face: its own where the upstream serves it, else via its chat."""
    native = call.provider.responses_api and isinstance(provider, NativeResponses)
    return provider if native else ResponsesViaChat(provider)  # type: ignore[return-value]


async def _call_once(provider: Provider, operation: Operation, call: UpstreamCall) -> Json:
    match operation:
        case Operation.CHAT:
            return await provider.chat(call)
        case Operation.COMPLETIONS:
            return await provider.completions(call)
        case Operation.EMBEDDINGS:
            return await provider.embeddings(call)
        case Operation.MESSAGES:
            return await _messages(provider).messages(call)
        case Operation.RESPONSES:
            return await _responses(provider, call).responses(call)
        case Operation.IMAGES:
            return await provider.images(call)
        case Operation.IMAGE_EDITS:
            return await provider.image_edits(call)
        case Operation.TRANSCRIPTIONS:
            return await provider.transcriptions(call)
        case Operation.MODERATIONS:
            return await provider.moderations(call)
        case Operation.SPEECH:
            raise InvalidRequest("speech is always streamed", param="stream")


def _stream_once(provider: Provider, operation: Operation, call: UpstreamCall) -> AsyncIterator[Json]:
    match operation:
        case Operation.CHAT:
            return provider.chat_stream(call)
        case Operation.COMPLETIONS:
            return provider.completions_stream(call)
        case Operation.MESSAGES:
            return _messages(provider).messages_stream(call)
        case Operation.RESPONSES:
            return _responses(provider, call).responses_stream(call)
        case Operation.SPEECH:
            return provider.speech_stream(call)
        case (
            Operation.EMBEDDINGS
            | Operation.IMAGES
            | Operation.IMAGE_EDITS
            | Operation.TRANSCRIPTIONS
            | Operation.MODERATIONS
        ):
            raise InvalidRequest(f"{operation.value} do not stream", param="stream")


async def call(ctx: RequestContext, operation: Operation) -> Json:
    """A complete answer from the first deployment that gives one."""

    async def attempt(deployment: DeploymentRoute) -> Json:
        provider = get_provider(deployment.provider.kind)
        ctx.reached_provider = True
        slot = await _start_in_flight(ctx, deployment)
        try:
            return await _call_once(provider, operation, make_call(ctx, deployment))
        finally:
            await _end_in_flight(slot)

    result: Json = await _attempts(ctx, attempt)
    return result


async def open_stream(ctx: RequestContext, operation: Operation) -> tuple[Json, AsyncIterator[Json]]:
    """Start a stream on the first deployment that sends a first item; returns it and the rest."""

    async def attempt(deployment: DeploymentRoute) -> tuple[Json, AsyncIterator[Json]]:
        provider = get_provider(deployment.provider.kind)
        ctx.reached_provider = True
        total = total_limit(deployment)
        deadline = asyncio.get_running_loop().time() + total if total is not None else None
        slot = await _start_in_flight(ctx, deployment)
        try:
            stream = _stream_once(provider, operation, make_call(ctx, deployment))
            try:
                first = await anext(stream)
            except StopAsyncIteration:
                raise UpstreamError("upstream closed the stream without sending anything", retryable=True) from None
            except BaseException:
                await close_stream(stream)
                raise
        except BaseException:
            await _end_in_flight(slot)
            raise
        rest: AsyncIterator[Json] = stream
        if deadline is not None and total is not None:
            rest = _until_deadline(deployment, stream, deadline, total)
        return first, rest if slot is None else _InFlightStream(rest, slot)

    opened: tuple[Json, AsyncIterator[Json]] = await _attempts(ctx, attempt, stream=True)
    return opened


async def count_tokens(ctx: RequestContext, body: Json) -> int | None:
    """Input tokens as the route's first deployment counts them, if it can (Anthropic); else None."""
    assert ctx.route is not None
    deployments = ctx.route.ordered_deployments()[:1]
    provider = get_provider(deployments[0].provider.kind) if deployments else None
    if not isinstance(provider, NativeMessages):
        return None
    try:
        result = await provider.count_tokens(make_call(ctx, deployments[0], body))
    except UpstreamError as err:
        log.info("upstream count_tokens failed; counting offline", extra={"error": err.message})
        return None
    value = result.get("input_tokens")
    return value if isinstance(value, int) else None
