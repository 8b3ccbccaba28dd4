"""Stages and wire formats without PostgreSQL, Redis or a server: dispatch, relay and the formats
driven with the offline mock provider and with an OpenAI-kind provider over an injected httpx
transport that answers in the real wire format."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import httpx
import orjson
import pytest

from core.money import PriceInfo
from gateway import formats, http
from gateway.context import Headers, RequestContext
from gateway.errors import UpstreamError
from gateway.formats.anthropic import EventTracker
from gateway.pipeline import dispatch, relay
from gateway.providers.base import ProviderConfig
from gateway.routing.table import DeploymentRoute, ModelRoute

PRICE = PriceInfo(datetime(2024, 1, 1, tzinfo=UTC), Decimal("1.00"), Decimal("0.50"), Decimal("1.25"), Decimal("2.00"))


class Captured:
    """A Responder that keeps what the pipeline wrote."""

    def __init__(self) -> None:
        self.headers: dict[bytes, bytes] = {}
        self.status = 0
        self.sent_headers: Headers = []
        self.body = b""
        self.finished = False

    async def send_json(self, status: int, body: bytes, headers: Headers) -> None:
        self.status, self.body, self.sent_headers = status, body, headers

    async def start_stream(self, headers: Headers) -> None:
        self.status, self.sent_headers = 200, headers

    async def write(self, data: bytes) -> None:
        self.body += data

    async def finish(self) -> None:
        self.finished = True


def _route(*deployments: DeploymentRoute) -> ModelRoute:
    return ModelRoute(
        id=1,
        name="gpt-test",
        kind="chat",
        owned_by="test",
        created=0,
        context_window=128_000,
        max_output_tokens=4096,
        deployments=deployments,
        prices=(PRICE,),
    )


def _ctx(endpoint: str, body: dict[str, Any], *deployments: DeploymentRoute) -> RequestContext:
    ctx = RequestContext(request_id="req_test", endpoint=endpoint, body=body, requested_model="gpt-test")
    ctx.route = _route(*deployments)
    ctx.estimated_prompt_tokens = 9
    return ctx


MOCK = DeploymentRoute(id=1, provider=ProviderConfig(id=1, slug="mock", kind="mock", base_url=""), upstream_model="m")
HI = [{"role": "user", "content": "Say hi"}]


def _openai(slug: str, retries: int = 0, priority: int = 0) -> DeploymentRoute:
    config = ProviderConfig(id=2, slug=slug, kind="openai", base_url=f"http://{slug}.invalid/v1", max_retries=retries)
    return DeploymentRoute(id=2, provider=config, upstream_model="up-model", priority=priority)


class Upstream:
    """Scripted upstream replies by host; every request is kept."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []
        self.replies: dict[str, list[httpx.Response]] = {}

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        queue = self.replies.get(request.url.host, [])
        return queue.pop(0) if queue else httpx.Response(200, json=_completion("fine"))


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    """Every upstream request the providers make goes to ``Upstream.handle``, not the network."""
    fake = Upstream()
    with http.use_transport(lambda: httpx.MockTransport(fake.handle)):
        yield fake


def _completion(text: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "up-model",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10},
    }


def test_chat_through_the_mock_is_read_priced_and_sent_with_its_cost() -> None:
    ctx = _ctx("chat", {"model": "gpt-test", "messages": HI})
    ctx.route = _route(MOCK)

    async def go() -> Captured:
        out = Captured()
        result = await dispatch.call(ctx, formats.CHAT.operation)
        await relay.send_result(out, ctx, formats.CHAT, result)
        return out

    out = asyncio.run(go())
    body = orjson.loads(out.body)
    assert out.status == 200 and body["object"] == "chat.completion"
    assert ctx.usage is not None and ctx.usage.prompt_tokens == body["usage"]["prompt_tokens"]
    headers = dict(out.sent_headers)
    assert headers[b"x-chittycan-provider"] == b"mock" and ctx.reached_provider
    # $1/Mtok in, $2/Mtok out: cost in micro-USD is exactly prompt + 2 * completion tokens
    assert ctx.cost_micro == ctx.usage.prompt_tokens + 2 * ctx.usage.completion_tokens
    assert headers[b"x-chittycan-cost"] == f"{ctx.cost_micro / 1e6:.6f}".encode()


def test_openai_stream_drops_the_forced_usage_chunk_and_ends_with_done_and_cost() -> None:
    ctx = _ctx("chat", {"model": "gpt-test", "messages": HI, "stream": True}, MOCK)
    ctx.stream = True

    async def go() -> Captured:
        out = Captured()
        first, rest = await dispatch.open_stream(ctx, formats.CHAT.operation)
        await relay.send_stream(out, ctx, formats.CHAT, first, rest)
        return out

    out = asyncio.run(go())
    frames = [f for f in out.body.split(b"\n\n") if f]
    assert frames[-2] == b"data: [DONE]" and frames[-1].startswith(b": x-chittycan-cost=")
    chunks = [orjson.loads(f[len(b"data: ") :]) for f in frames[:-2]]
    assert all("usage" not in c for c in chunks)  # the client did not ask for include_usage
    assert ctx.usage is not None and ctx.usage.source == "upstream" and ctx.usage.completion_tokens > 0
    assert out.finished and ctx.ttft_ms is not None


def test_messages_through_a_chat_only_provider_is_translated_both_ways() -> None:
    body = {"model": "gpt-test", "max_tokens": 50, "messages": HI}
    ctx = _ctx("messages", body, MOCK)

    async def go() -> Captured:
        out = Captured()
        result = await dispatch.call(ctx, formats.MESSAGES.operation)
        await relay.send_result(out, ctx, formats.MESSAGES, result)
        return out

    out = asyncio.run(go())
    message = orjson.loads(out.body)
    assert message["type"] == "message" and message["content"][0]["type"] == "text"
    assert dict(out.sent_headers)[b"request-id"] == b"req_test"


def test_an_anthropic_in_stream_error_is_relayed_and_ends_the_stream() -> None:
    ctx = _ctx("messages", {"max_tokens": 5}, MOCK)
    tracker = EventTracker(ctx)
    frame = tracker.frame({"type": "error", "error": {"type": "overloaded_error", "message": "busy"}})
    assert frame is not None and frame.startswith(b"event: error\n")
    assert tracker.stopped and ctx.status == "upstream_error" and ctx.error_type == "overloaded_error"
    # Nothing reported: the usage is the estimate (the prompt as counted, nothing relayed).
    usage = tracker.usage()
    assert usage.source == "estimated" and usage.prompt_tokens == 9 and usage.completion_tokens == 0


def test_openai_kind_over_an_injected_transport_fails_over_on_a_retryable_status(upstream: Upstream) -> None:
    upstream.replies["primary.invalid"] = [httpx.Response(503, json={"error": {"message": "overloaded"}})]
    ctx = _ctx("chat", {"model": "gpt-test", "messages": HI}, _openai("primary"), _openai("secondary", priority=1))
    result = asyncio.run(dispatch.call(ctx, formats.CHAT.operation))
    assert result["choices"][0]["message"]["content"] == "fine"
    assert [r.url.host for r in upstream.requests] == ["primary.invalid", "secondary.invalid"]
    assert ctx.attempts == 2 and ctx.route_reason == "fallback:1"
    sent = orjson.loads(upstream.requests[-1].content)
    assert sent["model"] == "up-model" and sent["messages"] == HI  # only the model is rewritten


def test_a_non_retryable_upstream_error_is_not_retried(upstream: Upstream) -> None:
    upstream.replies["primary.invalid"] = [httpx.Response(400, json={"error": {"message": "bad", "code": "x"}})]
    ctx = _ctx(
        "chat", {"model": "gpt-test", "messages": HI}, _openai("primary", retries=2), _openai("secondary", priority=1)
    )
    with pytest.raises(UpstreamError) as caught:
        asyncio.run(dispatch.call(ctx, formats.CHAT.operation))
    assert caught.value.status == 400 and len(upstream.requests) == 1


def test_a_successful_upstream_call_writes_no_log_line_at_info(upstream: Upstream, caplog: Any) -> None:
    """httpx logs every request at INFO; on the hot path that line cost a third of the throughput."""
    ctx = _ctx("chat", {"model": "gpt-test", "messages": HI}, _openai("primary"))
    with caplog.at_level(logging.INFO):
        asyncio.run(dispatch.call(ctx, formats.CHAT.operation))
    assert len(upstream.requests) == 1
    assert [r.getMessage() for r in caplog.records] == []
