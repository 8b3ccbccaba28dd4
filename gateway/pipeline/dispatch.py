"""Stage 7, dispatch: call the route's deployments in order with retries and fallback.

Only retryable errors are retried (with exponential backoff and jitter, honouring a short
``retry-after``) or failed over to the next deployment; a stream is retried only before its first
chunk, that is before any byte could have reached the client.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from core import backoff
from gateway.context import RequestContext
from gateway.errors import GatewayError, InvalidRequest, UpstreamError
from gateway.providers import get_provider
from gateway.providers.base import NativeMessages, NativeResponses, Operation, Provider, UpstreamCall, close_stream
from gateway.providers.bridge import MessagesViaChat
from gateway.providers.responses_bridge import ResponsesViaChat
from gateway.routing import breaker
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
    return UpstreamCall(
        provider=deployment.provider,
        upstream_model=deployment.upstream_model,
        body=upstream_body,
        api_key=ctx.passthrough_key,
        headers=dict(ctx.upstream_headers),
        max_output_tokens=ctx.route.max_output_tokens if ctx.route is not None else 4096,
    )


def _client_key_rejected(exc: UpstreamError) -> UpstreamError:
    """Passthrough: the provider refused the client's own key, so the client hears it as a 401."""
    message = exc.message.removeprefix("upstream rejected the gateway's credentials: ")
    return UpstreamError(message, retryable=False, status=401, type="invalid_request_error", code="invalid_api_key")


async def _attempts(
    ctx: RequestContext, attempt_fn: Callable[[DeploymentRoute], Awaitable[Any]], *, stream: bool = False
) -> Any:
    """Try the route's deployments in order: an open breaker skips one at once (no upstream call).

    A stream's success is the relay's to report (at its clean end; a failure after the first byte
    counts against the breaker), except a half-open probe's: its first item closes the breaker.
    """
    assert ctx.route is not None
    deployments = ctx.route.ordered_deployments()
    if not deployments:
        raise GatewayError(f"The model {ctx.route.name} has no active deployment.", status=503, code="no_deployment")
    last: UpstreamError | None = None
    skipped: list[str] = []
    for index, deployment in enumerate(deployments):
        admission = await breaker.admit(deployment)
        if admission is None:
            skipped.append(f"{deployment.provider.slug}:{deployment.upstream_model}")
            continue
        breaker.budget_deposit(admission)
        # The half-open probe is one request: it is not retried (its failure reopens the breaker).
        retries = 0 if admission.probe else deployment.provider.max_retries
        fallback = any(not breaker.known_open(d) for d in deployments[index + 1 :])
        attempt = 0
        while True:
            ctx.attempts += 1
            ctx.deployment = deployment
            try:
                result = await attempt_fn(deployment)
            except UpstreamError as exc:
                last = exc
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
                    break
                await asyncio.sleep(wait)
                attempt += 1
                continue
            except BaseException:
                await asyncio.shield(breaker.release(admission))  # cancelled: let another request probe
                raise
            if admission.probe or not stream:
                await breaker.record(deployment, admission, None)
            ctx.route_reason = "primary" if index == 0 else f"fallback:{index}"
            if skipped:
                ctx.route_reason += f" (breaker open: {', '.join(skipped)})"
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
        return await _call_once(provider, operation, make_call(ctx, deployment))

    result: Json = await _attempts(ctx, attempt)
    return result


async def open_stream(ctx: RequestContext, operation: Operation) -> tuple[Json, AsyncIterator[Json]]:
    """Start a stream on the first deployment that sends a first item; returns it and the rest."""

    async def attempt(deployment: DeploymentRoute) -> tuple[Json, AsyncIterator[Json]]:
        provider = get_provider(deployment.provider.kind)
        ctx.reached_provider = True
        stream = _stream_once(provider, operation, make_call(ctx, deployment))
        try:
            first = await anext(stream)
        except StopAsyncIteration:
            raise UpstreamError("upstream closed the stream without sending anything", retryable=True) from None
        except BaseException:
            await close_stream(stream)
            raise
        return first, stream

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
