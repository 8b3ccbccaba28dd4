"""OpenAI clients of Claude models: /v1/chat/completions served by an Anthropic upstream.

The official openai SDK drives the real gateway; the fake Anthropic upstream speaks the Messages
API. The ledger row is checked to the token and the micro-dollar.
"""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest

from tests import anthropic_support as support
from tests.conftest import wait_usage
from tests.fakes.anthropic_upstream import error_body, event
from tests.fakes.openai_upstream import Reply

fake_anthropic_server = support.fake_anthropic_server
anthropic_upstream = support.anthropic_upstream

WEATHER: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


def test_text_reply_translated_and_upstream_body_is_a_messages_request(anthropic_upstream, openai_client):
    res = openai_client.chat.completions.with_raw_response.create(
        model="claude-sonnet-4",
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "developer", "content": "Answer in English."},
            {"role": "user", "content": "Hi"},
        ],
        temperature=1.7,
        stop="END",
        user="alice",
    )
    completion = res.parse()
    assert completion.choices[0].message.content == "Hello from the fake Anthropic!"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.model == "claude-sonnet-4-20250514"
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (10, 7)
    sent = anthropic_upstream.requests[-1]
    assert sent.path == "/v1/messages"
    assert sent.headers["x-api-key"] == "sk-ant-upstream-secret"
    assert sent.headers["anthropic-version"] == "2023-06-01"
    assert "authorization" not in sent.headers
    assert sent.body == {
        "model": "claude-sonnet-4-20250514",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
        "max_tokens": 1024,  # the model's max_output_tokens: the client gave none
        "system": [{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Answer in English."}],
        "stop_sequences": ["END"],
        "temperature": 1.0,
        "metadata": {"user_id": "alice"},
    }
    [row] = wait_usage(1, request_id=res.headers["x-request-id"])
    # 10 input at $3/M + 7 output at $15/M = 30 + 105 micro-USD
    assert (row.prompt_tokens, row.completion_tokens, row.cost_micro) == (10, 7, 135)
    assert row.endpoint == "chat" and row.provider == "fake-anthropic" and row.usage_source == "upstream"


def test_cache_reads_and_writes_are_counted_and_priced_at_their_own_prices(anthropic_upstream, openai_client):
    anthropic_upstream.cache_read, anthropic_upstream.cache_creation = 100, 50
    completion = openai_client.chat.completions.create(
        model="claude-sonnet-4", messages=[{"role": "user", "content": "Hi"}], max_tokens=64
    )
    usage = completion.usage
    assert usage.prompt_tokens == 160  # 10 fresh + 100 read + 50 written: OpenAI counts them all
    assert usage.prompt_tokens_details.cached_tokens == 100
    assert usage.prompt_tokens_details.cache_write_tokens == 50
    assert anthropic_upstream.requests[-1].body["max_tokens"] == 64
    [row] = wait_usage(1, request_id=completion._request_id)
    assert (row.prompt_tokens, row.cached_tokens, row.cache_write_tokens, row.completion_tokens) == (160, 100, 50, 7)
    # 10 x 3.00 + 100 x 0.30 + 50 x 3.75 + 7 x 15.00 = 30 + 30 + 187.5 + 105 = 352.5 -> 353 (half up)
    assert row.cost_micro == 353


def test_parallel_tool_calls_non_streaming(anthropic_upstream, openai_client):
    completion = openai_client.chat.completions.create(
        model="claude-sonnet-4",
        messages=[{"role": "user", "content": "Weather and time in Paris?"}],
        tools=[WEATHER, TIME],
        tool_choice="required",
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me check."
    calls = choice.message.tool_calls
    assert [c.id for c in calls] == ["toolu_fake0", "toolu_fake1"]
    assert [c.function.name for c in calls] == ["get_weather", "get_time"]
    assert [json.loads(c.function.arguments) for c in calls] == [{"city": "Paris", "n": 0}, {"city": "Paris", "n": 1}]
    sent = anthropic_upstream.requests[-1].body
    assert sent["tool_choice"] == {"type": "any"}
    assert sent["tools"][0] == {
        "name": "get_weather",
        "input_schema": WEATHER["function"]["parameters"],
        "description": "Weather for a city",
    }


def test_tool_round_trip_sends_tool_use_and_one_user_turn_of_results(anthropic_upstream, openai_client):
    messages = [
        {"role": "user", "content": "Weather and time?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "toolu_a",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                },
                {"id": "toolu_b", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
            ],
        },
        {"role": "tool", "tool_call_id": "toolu_a", "content": "sunny"},
        {"role": "tool", "tool_call_id": "toolu_b", "content": "noon"},
    ]
    completion = openai_client.chat.completions.create(
        model="claude-sonnet-4", messages=messages, tools=[WEATHER, TIME], parallel_tool_calls=False
    )
    assert completion.choices[0].message.content == "Hello from the fake Anthropic!"
    sent = anthropic_upstream.requests[-1].body
    assert sent["messages"][1:] == [
        {
            "role": "assistant",
            "content": [
                {"type": "tool_use", "id": "toolu_a", "name": "get_weather", "input": {"city": "Paris"}},
                {"type": "tool_use", "id": "toolu_b", "name": "get_time", "input": {}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_a", "content": "sunny"},
                {"type": "tool_result", "tool_use_id": "toolu_b", "content": "noon"},
            ],
        },
    ]
    assert sent["tool_choice"] == {"type": "auto", "disable_parallel_tool_use": True}


def test_stream_text_with_usage_chunk(anthropic_upstream, openai_client):
    anthropic_upstream.cache_read = 20
    stream = openai_client.chat.completions.create(
        model="claude-sonnet-4",
        messages=[{"role": "user", "content": "Hi"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].id == "msg_fake123"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello from the fake Anthropic!"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    assert chunks[-1].choices == []
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (30, 7)
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == 20
    assert anthropic_upstream.requests[-1].body["stream"] is True
    [row] = wait_usage(1, request_id=stream.response.headers["x-request-id"])
    assert row.stream and (row.prompt_tokens, row.cached_tokens, row.completion_tokens) == (30, 20, 7)
    assert row.cost_micro == 30 + 6 + 105  # 10 x 3.00 + 20 x 0.30 + 7 x 15.00


def test_stream_without_include_usage_has_no_usage_chunk(anthropic_upstream, openai_client):
    stream = openai_client.chat.completions.create(
        model="claude-sonnet-4", messages=[{"role": "user", "content": "Hi"}], stream=True
    )
    chunks = list(stream)
    assert all(c.choices and c.usage is None for c in chunks)
    [row] = wait_usage(1, request_id=stream.response.headers["x-request-id"])
    assert (row.prompt_tokens, row.completion_tokens, row.usage_source) == (10, 7, "upstream")


def test_stream_parallel_tool_calls_accumulate_with_the_sdk_stream_helper(anthropic_upstream, openai_client):
    with openai_client.chat.completions.stream(
        model="claude-sonnet-4",
        messages=[{"role": "user", "content": "Weather and time?"}],
        tools=[WEATHER, TIME],
    ) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me check."
    assert [(c.index, c.id) for c in choice.message.tool_calls] == [(0, "toolu_fake0"), (1, "toolu_fake1")]
    assert [json.loads(c.function.arguments) for c in choice.message.tool_calls] == [
        {"city": "Paris", "n": 0},
        {"city": "Paris", "n": 1},
    ]


def test_in_stream_error_event_becomes_an_openai_stream_error(anthropic_upstream, openai_client):
    message = {"id": "msg_x", "type": "message", "role": "assistant", "model": "m", "content": []}
    start = {"type": "message_start", "message": {**message, "usage": {"input_tokens": 10, "output_tokens": 1}}}
    frames = [
        event("message_start", start),
        event(
            "content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        ),
        event(
            "content_block_delta",
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hel"}},
        ),
        event("error", error_body("overloaded_error", "Overloaded")),
    ]
    anthropic_upstream.push("/v1/messages", Reply(frames=frames))
    stream = openai_client.chat.completions.create(
        model="claude-sonnet-4", messages=[{"role": "user", "content": "Hi"}], stream=True
    )
    received = []
    with pytest.raises(openai.APIError) as exc:
        for chunk in stream:
            received.append(chunk.choices[0].delta.content if chunk.choices else None)
    assert "Overloaded" in str(exc.value)
    assert "Hel" in received
    [row] = wait_usage(1, request_id=stream.response.headers["x-request-id"])
    assert row.status == "upstream_error" and row.error_type == "overloaded_error"


def test_overloaded_529_is_retried(anthropic_upstream, openai_client):
    anthropic_upstream.push("/v1/messages", Reply(status=529, json=error_body("overloaded_error", "Overloaded")))
    completion = openai_client.chat.completions.create(
        model="claude-sonnet-4", messages=[{"role": "user", "content": "Hi"}]
    )
    assert completion.choices[0].message.content == "Hello from the fake Anthropic!"
    assert len(anthropic_upstream.requests) == 2


def test_persistent_529_is_a_502_after_retries(anthropic_upstream, openai_client):
    overloaded = Reply(status=529, json=error_body("overloaded_error", "Overloaded"))
    anthropic_upstream.push("/v1/messages", overloaded, overloaded)
    with pytest.raises(openai.InternalServerError) as exc:
        openai_client.chat.completions.create(model="claude-sonnet-4", messages=[{"role": "user", "content": "Hi"}])
    assert exc.value.status_code == 502 and exc.value.code == "overloaded_error"
    assert len(anthropic_upstream.requests) == 2


def test_400_from_anthropic_is_passed_on_and_not_retried(anthropic_upstream, openai_client):
    anthropic_upstream.push(
        "/v1/messages", Reply(status=400, json=error_body("invalid_request_error", "messages: roles must alternate"))
    )
    with pytest.raises(openai.BadRequestError) as exc:
        openai_client.chat.completions.create(model="claude-sonnet-4", messages=[{"role": "user", "content": "Hi"}])
    assert "roles must alternate" in exc.value.message
    assert len(anthropic_upstream.requests) == 1


@pytest.mark.parametrize("status", [401, 403])
def test_credential_errors_are_not_retried_on_the_same_deployment(anthropic_upstream, openai_client, status):
    kind = "authentication_error" if status == 401 else "permission_error"
    anthropic_upstream.push("/v1/messages", Reply(status=status, json=error_body(kind, "invalid x-api-key")))
    with pytest.raises(openai.InternalServerError) as exc:
        openai_client.chat.completions.create(model="claude-sonnet-4", messages=[{"role": "user", "content": "Hi"}])
    assert exc.value.status_code == 502 and exc.value.code == "upstream_auth_failed"
    assert len(anthropic_upstream.requests) == 1


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"n": 2}, "n"),
        ({"logprobs": True}, "logprobs"),
        ({"logit_bias": {"50256": -100}}, "logit_bias"),
        ({"seed": 7}, "seed"),
    ],
)
def test_unsupported_parameters_are_400_with_param(anthropic_upstream, openai_client, extra, param):
    with pytest.raises(openai.BadRequestError) as exc:
        openai_client.chat.completions.create(
            model="claude-sonnet-4", messages=[{"role": "user", "content": "Hi"}], **extra
        )
    assert exc.value.param == param
    assert anthropic_upstream.requests == []


def test_unsupported_parameter_on_a_stream_is_a_400_too(anthropic_upstream, openai_client):
    with pytest.raises(openai.BadRequestError) as exc:
        openai_client.chat.completions.create(
            model="claude-sonnet-4", messages=[{"role": "user", "content": "Hi"}], n=3, stream=True
        )
    assert exc.value.param == "n"


def test_anthropic_stream_cut_before_message_stop_is_an_error_not_a_clean_end(anthropic_upstream, openai_client):
    message = {"id": "msg_x", "type": "message", "role": "assistant", "model": "m", "content": []}
    frames = [
        event("message_start", {"type": "message_start", "message": {**message, "usage": {"input_tokens": 10}}}),
        event(
            "content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        ),
        event(
            "content_block_delta",
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hel"}},
        ),
    ]
    anthropic_upstream.push("/v1/messages", Reply(frames=frames))
    stream = openai_client.chat.completions.create(
        model="claude-sonnet-4", messages=[{"role": "user", "content": "Hi"}], stream=True
    )
    with pytest.raises(openai.APIError) as exc:
        list(stream)
    assert "before message_stop" in str(exc.value)
    [row] = wait_usage(1, request_id=stream.response.headers["x-request-id"])
    assert row.status == "upstream_error" and row.usage_source == "estimated" and row.completion_tokens >= 1
