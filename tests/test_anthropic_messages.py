"""/v1/messages through the real gateway with the official anthropic SDK (2.x), both upstream kinds.

- native: an Anthropic upstream, body and events passed through untouched (prompt caching kept);
- translated: ``claude-sonnet-4`` is an alias of a model on an OpenAI-compatible upstream.
"""

from __future__ import annotations

import json
import time
from typing import Any

import anthropic
import httpx
import pytest

from tests import anthropic_support as support
from tests.conftest import wait_usage
from tests.fakes.anthropic_upstream import error_body, event
from tests.fakes.openai_upstream import Reply, sse

fake_anthropic_server = support.fake_anthropic_server
anthropic_upstream = support.anthropic_upstream
openai_backed_claude = support.openai_backed_claude
anthropic_client = support.anthropic_client

WEATHER: dict[str, Any] = {
    "name": "get_weather",
    "description": "Weather for a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
TIME: dict[str, Any] = {"name": "get_time", "input_schema": {"type": "object", "properties": {}}}
HI: Any = [{"role": "user", "content": "Hi"}]


def body_of(exc: Any) -> Any:
    """The parsed error body the SDK attached to the exception."""
    return exc.value.body


def raw_stream(
    url: str, key: str, body: dict[str, Any], **headers: str
) -> tuple[httpx.Response, list[tuple[str, Any]]]:
    """POST a streaming request and return every SSE frame as (event name, parsed data).

    The response's ``comments`` extension holds the SSE comment lines (the gateway's cost line).
    """
    frames: list[tuple[str, Any]] = []
    comments: list[str] = []
    with httpx.stream(
        "POST", f"{url}/v1/messages", json={**body, "stream": True}, headers={"x-api-key": key, **headers}, timeout=10
    ) as response:
        text = "".join(response.iter_text())
    for block in text.strip().split("\n\n"):
        comments.extend(line for line in block.split("\n") if line.startswith(":"))
        lines = dict(line.split(": ", 1) for line in block.split("\n") if not line.startswith(":"))
        if "data" in lines:
            frames.append((lines.get("event", ""), json.loads(lines["data"])))
    response.extensions["comments"] = comments
    return response, frames


# --- native: Anthropic upstream ----------------------------------------------------------------------


def test_native_passthrough_keeps_cache_control_and_forwards_betas(anthropic_upstream, anthropic_client):
    anthropic_upstream.cache_read, anthropic_upstream.cache_creation = 100, 50
    system = [{"type": "text", "text": "Long policy...", "cache_control": {"type": "ephemeral"}}]
    raw = anthropic_client.messages.with_raw_response.create(
        model="claude-sonnet-4",
        max_tokens=100,
        system=system,
        messages=HI,
        metadata={"user_id": "u-42"},
        extra_headers={"anthropic-beta": "prompt-caching-2024-07-31"},
    )
    message = raw.parse()
    assert message.content[0].text == "Hello from the fake Anthropic!"
    assert message.stop_reason == "end_turn"
    assert (message.usage.input_tokens, message.usage.cache_read_input_tokens) == (10, 100)
    assert message.usage.cache_creation_input_tokens == 50
    assert raw.headers["request-id"] == raw.headers["x-request-id"]
    sent = anthropic_upstream.requests[-1]
    expected = {
        "model": "claude-sonnet-4-20250514",
        "max_tokens": 100,
        "system": system,
        "messages": HI,
        "metadata": {"user_id": "u-42"},
    }
    assert sent.body == expected
    assert sent.headers["anthropic-beta"] == "prompt-caching-2024-07-31"
    assert sent.headers["x-api-key"] == "sk-ant-upstream-secret"
    assert sent.headers["anthropic-version"]
    [row] = wait_usage(1, request_id=raw.headers["request-id"])
    assert row.endpoint == "messages" and row.requested_model == "claude-sonnet-4" and row.end_user == "u-42"
    assert (row.prompt_tokens, row.cached_tokens, row.cache_write_tokens, row.completion_tokens) == (160, 100, 50, 7)
    assert row.cost_micro == 353  # 10 x 3.00 + 100 x 0.30 + 50 x 3.75 + 7 x 15.00 = 352.5, half up


def test_native_stream_with_the_sdk_stream_helper(anthropic_upstream, anthropic_client):
    anthropic_upstream.cache_read = 40
    with anthropic_client.messages.stream(model="claude-sonnet-4", max_tokens=100, messages=HI) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
        request_id = stream.response.headers["request-id"]
    assert text == "Hello from the fake Anthropic!"
    assert final.content[0].text == text and final.stop_reason == "end_turn"
    assert (final.usage.input_tokens, final.usage.cache_read_input_tokens, final.usage.output_tokens) == (10, 40, 7)
    [row] = wait_usage(1, request_id=request_id)
    assert row.stream and (row.prompt_tokens, row.cached_tokens, row.completion_tokens) == (50, 40, 7)
    assert row.cost_micro == 30 + 12 + 105 and row.usage_source == "upstream"


def test_native_stream_tools_accumulate(anthropic_upstream, anthropic_client):
    with anthropic_client.messages.stream(
        model="claude-sonnet-4", max_tokens=100, messages=HI, tools=[WEATHER, TIME]
    ) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use"
    assert [b.type for b in final.content] == ["text", "tool_use", "tool_use"]
    assert [(b.id, b.name, b.input) for b in final.content[1:]] == [
        ("toolu_fake0", "get_weather", {"city": "Paris", "n": 0}),
        ("toolu_fake1", "get_time", {"city": "Paris", "n": 1}),
    ]


def test_native_stream_frames_are_relayed_with_event_lines(anthropic_upstream, gateway_server, tenant_key):
    body = {"model": "claude-sonnet-4", "max_tokens": 50, "messages": HI}
    response, frames = raw_stream(gateway_server.url, tenant_key[1], body)
    assert response.headers["content-type"].startswith("text/event-stream")
    assert all(name == data["type"] for name, data in frames)
    names = [name for name, _ in frames]
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]


def test_native_in_stream_error_is_relayed_as_an_error_event(anthropic_upstream, anthropic_client):
    message = {"id": "msg_x", "type": "message", "role": "assistant", "model": "m", "content": []}
    start = {"type": "message_start", "message": {**message, "usage": {"input_tokens": 10, "output_tokens": 1}}}
    frames = [
        event("message_start", start),
        event(
            "content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        ),
        event("error", error_body("overloaded_error", "Overloaded")),
    ]
    anthropic_upstream.push("/v1/messages", Reply(frames=frames))
    with pytest.raises(anthropic.APIStatusError) as exc:
        with anthropic_client.messages.stream(model="claude-sonnet-4", max_tokens=100, messages=HI) as stream:
            request_id = stream.response.headers["request-id"]
            for _ in stream:
                pass
    assert "overloaded_error" in str(exc.value)
    [row] = wait_usage(1, request_id=request_id)
    assert row.status == "upstream_error" and row.error_type == "overloaded_error"
    assert row.usage_source == "estimated" and row.prompt_tokens == 10


def test_native_error_before_the_stream_starts_is_retried(anthropic_upstream, anthropic_client):
    anthropic_upstream.push("/v1/messages", Reply(frames=[event("error", error_body("overloaded_error", "Busy"))]))
    with anthropic_client.messages.stream(model="claude-sonnet-4", max_tokens=100, messages=HI) as stream:
        assert stream.get_final_message().content[0].text == "Hello from the fake Anthropic!"
    assert len(anthropic_upstream.requests) == 2


def test_native_upstream_400_keeps_its_status_in_the_anthropic_envelope(anthropic_upstream, anthropic_client):
    anthropic_upstream.push(
        "/v1/messages", Reply(status=400, json=error_body("invalid_request_error", "messages.0: bad block"))
    )
    with pytest.raises(anthropic.BadRequestError) as exc:
        anthropic_client.messages.create(model="claude-sonnet-4", max_tokens=10, messages=HI)
    body = body_of(exc)
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert "bad block" in body["error"]["message"]
    assert exc.value.response.headers["request-id"] == body["request_id"]
    assert len(anthropic_upstream.requests) == 1


def test_native_persistent_overload_is_a_server_error(anthropic_upstream, anthropic_client):
    busy = Reply(status=529, json=error_body("overloaded_error", "Overloaded"))
    anthropic_upstream.push("/v1/messages", busy, busy)
    with pytest.raises(anthropic.InternalServerError) as exc:
        anthropic_client.messages.create(model="claude-sonnet-4", max_tokens=10, messages=HI)
    assert exc.value.status_code == 502 and body_of(exc)["error"]["type"] == "api_error"
    assert len(anthropic_upstream.requests) == 2


def test_count_tokens_asks_the_anthropic_upstream(anthropic_upstream, anthropic_client):
    raw = anthropic_client.messages.with_raw_response.count_tokens(model="claude-sonnet-4", messages=HI)
    assert raw.parse().input_tokens == 10
    sent = anthropic_upstream.requests[-1]
    assert sent.path == "/v1/messages/count_tokens" and sent.body["model"] == "claude-sonnet-4-20250514"
    assert wait_usage(1, timeout=0.3, request_id=raw.headers["request-id"]) == []  # counting is not billed


# --- translated: OpenAI-compatible upstream behind a Claude alias ------------------------------------


def test_alias_served_by_openai_upstream_non_streaming(openai_backed_claude, anthropic_client):
    openai_backed_claude.cached_tokens = 4
    message = anthropic_client.messages.create(
        model="claude-sonnet-4", max_tokens=200, system="Be brief.", messages=HI, stop_sequences=["END"]
    )
    assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")
    assert message.content[0].type == "text" and message.content[0].text == "Hello from the fake upstream!"
    assert message.stop_reason == "end_turn"
    assert (message.usage.input_tokens, message.usage.cache_read_input_tokens, message.usage.output_tokens) == (
        16,
        4,
        7,
    )
    sent = openai_backed_claude.requests[-1]
    assert sent.path == "/v1/chat/completions"
    assert sent.body == {
        "model": "llama-3.3-70b-versatile",
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        "max_tokens": 200,
        "stop": ["END"],
    }
    assert sent.headers["authorization"] == "Bearer sk-upstream-secret"
    assert "anthropic-version" not in sent.headers
    [row] = wait_usage(1, request_id=message._request_id)
    assert (row.requested_model, row.served_model) == ("claude-sonnet-4", "llama-3.3-70b-versatile")
    assert (row.prompt_tokens, row.cached_tokens, row.completion_tokens) == (20, 4, 7)
    assert row.cost_micro == 154  # 16 x 3.00 + 4 x 0.30 + 7 x 15.00 = 154.2


def test_translated_stream_emits_the_exact_event_sequence(openai_backed_claude, gateway_server, tenant_key):
    body = {"model": "claude-sonnet-4", "max_tokens": 50, "messages": HI}
    response, frames = raw_stream(gateway_server.url, tenant_key[1], body)
    assert response.headers["request-id"].startswith("req_")
    assert all(name == data["type"] for name, data in frames)
    names = [name for name, _ in frames]
    words = len("Hello from the fake upstream!".split(" "))
    assert names == [
        "message_start",
        "content_block_start",
        *["content_block_delta"] * words,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    start = frames[0][1]["message"]
    assert start["role"] == "assistant" and start["content"] == [] and start["usage"]["output_tokens"] == 1
    assert frames[1][1]["content_block"] == {"type": "text", "text": ""}
    delta = frames[-2][1]
    assert delta["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert delta["usage"] == {
        "input_tokens": 10,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "output_tokens": 7,
    }
    assert openai_backed_claude.requests[-1].body["stream_options"] == {"include_usage": True}
    assert response.extensions["comments"] == [": x-chittycan-cost=0.000135"]  # 10 x 3.00 + 7 x 15.00


def test_translated_stream_with_the_sdk_stream_helper(openai_backed_claude, anthropic_client):
    with anthropic_client.messages.stream(model="claude-sonnet-4", max_tokens=100, messages=HI) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
        request_id = stream.response.headers["request-id"]
    assert text == "Hello from the fake upstream!"
    assert final.content[0].text == text and final.stop_reason == "end_turn"
    assert (final.usage.input_tokens, final.usage.output_tokens) == (10, 7)
    [row] = wait_usage(1, request_id=request_id)
    assert row.stream and (row.prompt_tokens, row.completion_tokens, row.usage_source) == (10, 7, "upstream")
    assert row.cost_micro == 135


def test_translated_stream_parallel_tools_and_the_round_trip(openai_backed_claude, anthropic_client):
    with anthropic_client.messages.stream(
        model="claude-sonnet-4", max_tokens=100, messages=HI, tools=[WEATHER, TIME]
    ) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use"
    assert [(b.type, b.id, b.name, b.input) for b in final.content] == [
        ("tool_use", "call_fake0", "get_weather", {"city": "Paris", "n": 0}),
        ("tool_use", "call_fake1", "get_time", {"city": "Paris", "n": 1}),
    ]
    follow_up = [
        *HI,
        {"role": "assistant", "content": [b.model_dump() for b in final.content]},
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "call_fake0", "content": "sunny"},
                {"type": "tool_result", "tool_use_id": "call_fake1", "content": "noon"},
            ],
        },
    ]
    answer = anthropic_client.messages.create(
        model="claude-sonnet-4", max_tokens=100, messages=follow_up, tools=[WEATHER, TIME]
    )
    assert answer.content[0].text == "Hello from the fake upstream!"
    sent = openai_backed_claude.requests[-1].body["messages"]
    assert sent[1]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city":"Paris","n":0}'}
    assert sent[2:] == [
        {"role": "tool", "tool_call_id": "call_fake0", "content": "sunny"},
        {"role": "tool", "tool_call_id": "call_fake1", "content": "noon"},
    ]


def test_translated_non_streaming_tools(openai_backed_claude, anthropic_client):
    message = anthropic_client.messages.create(
        model="claude-sonnet-4",
        max_tokens=100,
        messages=HI,
        tools=[WEATHER, TIME],
        tool_choice={"type": "any", "disable_parallel_tool_use": True},
    )
    assert message.stop_reason == "tool_use"
    assert [(b.name, b.input) for b in message.content] == [("get_weather", {"city": "Paris", "n": 0})]
    sent = openai_backed_claude.requests[-1].body
    assert sent["tool_choice"] == "required" and sent["parallel_tool_calls"] is False


def test_translated_mid_stream_error_becomes_an_error_event(openai_backed_claude, gateway_server, tenant_key):
    chunk = {"id": "c", "object": "chat.completion.chunk", "model": "m"}
    frames = [
        sse({**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hel"}}]}),
        sse({"error": {"message": "backend exploded", "type": "server_error", "code": "boom"}}),
    ]
    openai_backed_claude.push("/v1/chat/completions", Reply(frames=frames))
    body = {"model": "claude-sonnet-4", "max_tokens": 50, "messages": HI}
    _, received = raw_stream(gateway_server.url, tenant_key[1], body)
    names = [name for name, _ in received]
    assert names[:3] == ["message_start", "content_block_start", "content_block_delta"]
    assert names[-1] == "error" and "message_stop" not in names
    error = received[-1][1]
    assert error["type"] == "error" and "backend exploded" in error["error"]["message"]


def test_translated_upstream_without_usage_is_estimated(openai_backed_claude, anthropic_client):
    reply = {
        "id": "x",
        "object": "chat.completion",
        "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "length"}],
    }
    openai_backed_claude.push("/v1/chat/completions", Reply(json=reply))
    message = anthropic_client.messages.create(model="claude-sonnet-4", max_tokens=1, messages=HI)
    assert message.stop_reason == "max_tokens" and message.usage.output_tokens == 1
    [row] = wait_usage(1, request_id=message._request_id)
    assert row.usage_source == "estimated" and row.completion_tokens == 1 and row.prompt_tokens > 0


def test_count_tokens_offline_for_a_translated_model(openai_backed_claude, anthropic_client):
    short = anthropic_client.messages.count_tokens(model="claude-sonnet-4", messages=HI)
    longer = anthropic_client.messages.count_tokens(
        model="claude-sonnet-4", messages=[{"role": "user", "content": "Hi " * 50}], tools=[WEATHER]
    )
    assert 0 < short.input_tokens < longer.input_tokens
    assert openai_backed_claude.requests == []


# --- the front door: auth, validation, errors -------------------------------------------------------


def test_x_api_key_and_bearer_both_authenticate(openai_backed_claude, gateway_server, tenant_key):
    body = {"model": "claude-sonnet-4", "max_tokens": 10, "messages": HI}
    for headers in ({"x-api-key": tenant_key[1]}, {"authorization": f"Bearer {tenant_key[1]}"}):
        response = httpx.post(f"{gateway_server.url}/v1/messages", json=body, headers=headers, timeout=10)
        assert response.status_code == 200 and response.json()["type"] == "message"


def test_bad_key_is_an_anthropic_401(openai_backed_claude, gateway_server):
    client = anthropic.Anthropic(base_url=gateway_server.url, api_key="chitty_wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as exc:
        client.messages.create(model="claude-sonnet-4", max_tokens=10, messages=HI)
    assert body_of(exc)["error"]["type"] == "authentication_error"
    assert exc.value.response.headers["request-id"].startswith("req_")


def test_unknown_model_is_an_anthropic_404(openai_backed_claude, anthropic_client):
    with pytest.raises(anthropic.NotFoundError) as exc:
        anthropic_client.messages.create(model="claude-nope", max_tokens=10, messages=HI)
    assert body_of(exc)["error"]["type"] == "not_found_error"


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"model": "claude-sonnet-4", "messages": HI}, "max_tokens"),
        ({"model": "claude-sonnet-4", "max_tokens": 0, "messages": HI}, "max_tokens"),
        ({"model": "claude-sonnet-4", "max_tokens": 5, "messages": []}, "messages"),
        ({"model": "claude-sonnet-4", "max_tokens": 5, "messages": [{"role": "bot", "content": "x"}]}, "role"),
        ({"max_tokens": 5, "messages": HI}, "model"),
    ],
)
def test_invalid_bodies_are_400_in_the_anthropic_envelope(
    openai_backed_claude, gateway_server, tenant_key, body, fragment
):
    response = httpx.post(
        f"{gateway_server.url}/v1/messages", json=body, headers={"x-api-key": tenant_key[1]}, timeout=10
    )
    assert response.status_code == 400
    payload = response.json()
    assert payload["type"] == "error" and payload["error"]["type"] == "invalid_request_error"
    assert fragment in payload["error"]["message"]
    assert payload["request_id"] == response.headers["request-id"]


def test_server_tools_on_a_translated_model_are_a_400(openai_backed_claude, anthropic_client):
    with pytest.raises(anthropic.BadRequestError) as exc:
        anthropic_client.messages.create(
            model="claude-sonnet-4",
            max_tokens=10,
            messages=HI,
            tools=[{"type": "web_search_20250305", "name": "web_search"}],
        )
    assert "Server tools" in body_of(exc)["error"]["message"]


# --- long streams: keepalive pings and client disconnects -------------------------------------------


def _openai_words(count: int) -> list[bytes]:
    chunk = {"id": "c", "object": "chat.completion.chunk", "model": "m"}
    frames = [sse({**chunk, "choices": [{"index": 0, "delta": {"content": "word "}}]}) for _ in range(count)]
    frames.append(sse({**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}))
    return [*frames, b"data: [DONE]\n\n"]


def test_silent_upstream_gets_keepalive_pings(openai_backed_claude, gateway_server, tenant_key, monkeypatch):
    from gateway.formats.anthropic import EventTracker

    monkeypatch.setattr(EventTracker, "keepalive", 0.05)
    openai_backed_claude.push("/v1/chat/completions", Reply(frames=_openai_words(3), frame_delay=0.3))
    body = {"model": "claude-sonnet-4", "max_tokens": 50, "messages": HI}
    _, frames = raw_stream(gateway_server.url, tenant_key[1], body)
    names = [name for name, _ in frames]
    assert names[0] == "message_start" and names[-1] == "message_stop"
    assert names.count("ping") >= 3
    assert [n for n in names if n != "ping"] == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]


def test_client_disconnect_cancels_the_upstream_and_records_partial_usage(
    openai_backed_claude, gateway_server, tenant_key
):
    openai_backed_claude.push("/v1/chat/completions", Reply(frames=_openai_words(50), frame_delay=0.1))
    body = {"model": "claude-sonnet-4", "max_tokens": 500, "messages": HI, "stream": True}
    with httpx.Client(timeout=10) as client:
        with client.stream(
            "POST", f"{gateway_server.url}/v1/messages", json=body, headers={"x-api-key": tenant_key[1]}
        ) as response:
            request_id = response.headers["request-id"]
            deltas = 0
            for line in response.iter_lines():
                deltas += line == "event: content_block_delta"
                if deltas == 3:
                    break
    left_at = time.monotonic()
    while openai_backed_claude.disconnects == 0 and time.monotonic() - left_at < 1.5:
        time.sleep(0.02)
    assert openai_backed_claude.disconnects == 1, "the upstream request was not cancelled"
    assert openai_backed_claude.completed_streams == 0
    [row] = wait_usage(1, request_id=request_id)
    assert row.status == "client_disconnected" and row.usage_source == "estimated"
    assert row.prompt_tokens > 0 and 2 <= row.completion_tokens < 50 and row.cost_micro > 0


# --- the other provider kinds: mock (dev mode, quickstart) and native Ollama -----------------------


def test_mock_provider_serves_messages_with_tools(transactional_db, anthropic_client):
    from gateway.models import Provider

    provider = Provider.objects.create(slug="mock", kind="mock")
    support.add_priced_model("claude-sonnet-4", provider, upstream="claude-sonnet-4")
    message = anthropic_client.messages.create(model="claude-sonnet-4", max_tokens=100, messages=HI)
    assert message.content[0].text.startswith("Mock reply") and message.stop_reason == "end_turn"
    with anthropic_client.messages.stream(
        model="claude-sonnet-4", max_tokens=100, messages=HI, tools=[WEATHER]
    ) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use"
    assert [(b.type, b.name, b.input) for b in final.content] == [("tool_use", "get_weather", {"city": "example"})]
    assert final.usage.output_tokens > 0 and final.usage.input_tokens > 0


def test_native_ollama_serves_messages_streaming(fake_ollama, anthropic_client):
    from gateway.models import Provider

    provider = Provider.objects.create(slug="local-ollama", kind="ollama", base_url=fake_ollama.url, max_retries=0)
    support.add_priced_model("claude-sonnet-4", provider, upstream="llama3.2")
    with anthropic_client.messages.stream(model="claude-sonnet-4", max_tokens=100, messages=HI) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
        request_id = stream.response.headers["request-id"]
    assert text == "Hello from fake Ollama!" and final.stop_reason == "end_turn"
    assert fake_ollama.requests[-1].path == "/api/chat"
    [row] = wait_usage(1, request_id=request_id)
    assert row.prompt_tokens == 26 and row.completion_tokens == final.usage.output_tokens


def test_translated_stream_without_upstream_usage_is_estimated(openai_backed_claude, anthropic_client):
    frames = [f for f in _openai_words(4) if b'"usage"' not in f]
    openai_backed_claude.push("/v1/chat/completions", Reply(frames=frames))
    with anthropic_client.messages.stream(model="claude-sonnet-4", max_tokens=100, messages=HI) as stream:
        final = stream.get_final_message()
        request_id = stream.response.headers["request-id"]
    assert final.content[0].text == "word " * 4 and final.usage.output_tokens > 0
    [row] = wait_usage(1, request_id=request_id)
    assert row.usage_source == "estimated" and row.status == "ok"
    assert (row.prompt_tokens, row.completion_tokens) == (final.usage.input_tokens, final.usage.output_tokens)


def test_system_role_messages_reach_a_native_upstream_as_top_level_system(anthropic_upstream, anthropic_client):
    anthropic_client.messages.create(
        model="claude-sonnet-4", max_tokens=10, messages=[{"role": "system", "content": "Be brief."}, *HI]
    )
    sent = anthropic_upstream.requests[-1].body
    assert sent["system"] == [{"type": "text", "text": "Be brief."}] and sent["messages"] == HI


def test_claude_code_style_request_through_an_openai_upstream(openai_backed_claude, gateway_server, tenant_key):
    """The shape Claude Code sends: ?beta=true, betas, cached system blocks and tools, thinking, metadata."""
    body = {
        "model": "claude-sonnet-4-20250514",
        "max_tokens": 32000,
        "stream": True,
        "system": [
            {"type": "text", "text": "You are Claude Code.", "cache_control": {"type": "ephemeral"}},
            {"type": "text", "text": "Working directory: /repo"},
        ],
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "<system-reminder>ctx</system-reminder>"},
                    {"type": "text", "text": "List the files", "cache_control": {"type": "ephemeral"}},
                ],
            }
        ],
        "tools": [
            {
                "name": "Bash",
                "description": "Run a command",
                "input_schema": {
                    "$schema": "http://json-schema.org/draft-07/schema#",
                    "type": "object",
                    "properties": {"command": {"type": "string"}},
                    "required": ["command"],
                    "additionalProperties": False,
                },
            },
            {"name": "Glob", "input_schema": {"type": "object", "properties": {"pattern": {"type": "string"}}}},
        ],
        "metadata": {"user_id": "user_abc_account_def_session_ghi"},
        "thinking": {"type": "enabled", "budget_tokens": 4000},
        "temperature": 1,
    }
    from gateway.models import LLMModel

    LLMModel.objects.filter(name="llama-3.3-70b").update(aliases=["claude-sonnet-4", "claude-sonnet-4-20250514"])
    headers = {
        "authorization": f"Bearer {tenant_key[1]}",
        "anthropic-version": "2023-06-01",
        "anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14",
        "x-app": "cli",
    }
    frames: list[tuple[str, Any]] = []
    with httpx.stream(
        "POST", f"{gateway_server.url}/v1/messages?beta=true", json=body, headers=headers, timeout=10
    ) as response:
        assert response.status_code == 200
        for block in "".join(response.iter_text()).strip().split("\n\n"):
            lines = dict(line.split(": ", 1) for line in block.split("\n") if not line.startswith(":"))
            if "data" in lines:
                frames.append((lines["event"], json.loads(lines["data"])))
    names = [name for name, _ in frames]
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
    starts = [data["content_block"] for name, data in frames if name == "content_block_start"]
    assert [(b["type"], b["name"]) for b in starts] == [("tool_use", "Bash"), ("tool_use", "Glob")]
    assert frames[-2][1]["delta"]["stop_reason"] == "tool_use"
    sent = openai_backed_claude.requests[-1].body
    assert sent["messages"] == [
        {"role": "system", "content": "You are Claude Code.\nWorking directory: /repo"},
        {"role": "user", "content": "<system-reminder>ctx</system-reminder>\nList the files"},
    ]
    assert [t["function"]["name"] for t in sent["tools"]] == ["Bash", "Glob"]
    assert sent["user"] == "user_abc_account_def_session_ghi" and "thinking" not in sent
    assert sent["max_tokens"] == 32000 and sent["stream"] is True


# --- budgets: /v1/messages reserves and settles like the OpenAI routes ------------------------------


def test_hard_budget_refuses_messages_with_a_billing_error(openai_backed_claude, gateway_server, make_tenant, make_key):
    from budgets import services
    from ledger.models import UsageRecord

    tenant = make_tenant("claude-team")
    key = make_key(tenant)
    # each request costs 135 micro-USD (10 x 3.00 + 7 x 15.00); the reservation is the worst case
    services.budget_set(tenant=tenant, period="month", limit_micro=1_000, hard=True)
    client = anthropic.Anthropic(base_url=gateway_server.url, api_key=key, max_retries=0)
    admitted = 0
    with pytest.raises(anthropic.APIStatusError) as exc:
        for _ in range(20):
            client.messages.create(model="claude-sonnet-4", max_tokens=10, messages=HI)
            admitted += 1
    assert exc.value.status_code == 402
    assert body_of(exc)["error"]["type"] == "billing_error"
    assert exc.value.response.headers["x-should-retry"] == "false"
    rows = wait_usage(admitted, tenant=tenant)
    assert len(rows) == admitted >= 1
    assert sum(UsageRecord.objects.filter(tenant=tenant).values_list("cost_micro", flat=True)) == 135 * admitted
    assert len(openai_backed_claude.requests) == admitted
