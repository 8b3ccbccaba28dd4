"""The offline ``mock`` model: deterministic, realistic usage, tools and streaming."""

from __future__ import annotations

import json
import re
from decimal import ROUND_HALF_UP, Decimal

import openai
import pytest

from gateway import tokens
from tests.conftest import add_model, exact_usage

HELLO = [{"role": "user", "content": "Say hello in 3 words."}]


@pytest.fixture
def mock_client(transactional_db, gateway_server, make_tenant, make_key):
    from gateway.models import Provider

    provider = Provider.objects.create(slug="mock", kind="mock")
    add_model("mock-gpt", provider, prices=("2.50", "1.25", "10.00"))
    tenant = make_tenant("mocked")
    client = openai.OpenAI(base_url=f"{gateway_server.url}/v1", api_key=make_key(tenant), max_retries=0)
    return client, tenant


def test_playbook_hello_and_determinism(mock_client):
    client, tenant = mock_client
    res = client.chat.completions.with_raw_response.create(model="mock-gpt", messages=HELLO, temperature=0)
    first = res.parse()
    assert re.search(r"hello", first.choices[0].message.content, re.I)
    assert first.id.startswith("chatcmpl-") and first.object == "chat.completion" and first.created > 0
    assert first.choices[0].finish_reason == "stop"
    second = client.chat.completions.create(model="mock-gpt", messages=HELLO, temperature=0)
    assert second.choices[0].message.content == first.choices[0].message.content
    other = client.chat.completions.create(model="mock-gpt", messages=[{"role": "user", "content": "Count to 3."}])
    assert other.choices[0].message.content != first.choices[0].message.content
    # Usage is what the real tokenizer says, so cost behaves as with a paid model.
    expected_prompt = tokens.count_messages(HELLO, "mock-gpt")
    expected_completion = tokens.count_text(first.choices[0].message.content, "mock-gpt")
    assert first.usage.prompt_tokens == expected_prompt
    assert first.usage.completion_tokens == expected_completion
    assert first.usage.total_tokens == expected_prompt + expected_completion
    rows = exact_usage(tenant, 3)
    row = next(r for r in rows if r.request_id == res.headers["x-request-id"])
    assert (row.prompt_tokens, row.completion_tokens) == (expected_prompt, expected_completion)
    # 2.50 $/M in, 10 $/M out: micro-USD, rounded once, half up
    exact = Decimal(expected_prompt) * Decimal("2.5") + Decimal(expected_completion) * 10
    assert row.cost_micro == int(exact.quantize(Decimal(1), rounding=ROUND_HALF_UP))
    assert res.headers["x-chittycan-provider"] == "mock"


def test_max_tokens_cuts_with_length(mock_client):
    client, _ = mock_client
    short = client.chat.completions.create(model="mock-gpt", messages=HELLO, max_tokens=3)
    assert short.choices[0].finish_reason == "length"
    assert len(short.choices[0].message.content.split(" ")) == 3


def test_stream_matches_non_stream(mock_client):
    client, tenant = mock_client
    whole = client.chat.completions.create(model="mock-gpt", messages=HELLO).choices[0].message.content
    parts = list(
        client.chat.completions.create(
            model="mock-gpt", messages=HELLO, stream=True, stream_options={"include_usage": True}
        )
    )
    assert parts[0].choices[0].delta.role == "assistant"
    assert len(parts) > 5  # word by word, not one blob
    assert "".join(p.choices[0].delta.content or "" for p in parts if p.choices) == whole
    assert parts[-1].choices == [] and parts[-1].usage.completion_tokens == tokens.count_text(whole, "mock-gpt")
    rows = exact_usage(tenant, 2)
    assert rows[1].stream and rows[1].usage_source == "upstream"


def test_tools_are_called_with_schema_shaped_arguments(mock_client):
    client, _ = mock_client
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {
                    "type": "object",
                    "properties": {
                        "city": {"type": "string"},
                        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                        "days": {"type": "integer"},
                    },
                    "required": ["city", "unit", "days"],
                },
            },
        }
    ]
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    completion = client.chat.completions.create(model="mock-gpt", messages=messages, tools=tools)
    [call] = completion.choices[0].message.tool_calls
    assert completion.choices[0].finish_reason == "tool_calls"
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "example", "unit": "celsius", "days": 1}
    # Streamed, the arguments arrive in pieces that add up to the same JSON.
    args = ""
    for part in client.chat.completions.create(model="mock-gpt", messages=messages, tools=tools, stream=True):
        for delta in part.choices[0].delta.tool_calls or []:
            args += delta.function.arguments or ""
    assert args == call.function.arguments
    # After the tool result, it answers in text; tool_choice="none" never calls.
    follow = [
        *messages,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny"},
    ]
    assert client.chat.completions.create(model="mock-gpt", messages=follow, tools=tools).choices[0].message.content
    none = client.chat.completions.create(model="mock-gpt", messages=messages, tools=tools, tool_choice="none")
    assert none.choices[0].message.tool_calls is None


def test_n_choices_are_billed(mock_client):
    client, _ = mock_client
    one = client.chat.completions.create(model="mock-gpt", messages=HELLO)
    three = client.chat.completions.create(model="mock-gpt", messages=HELLO, n=3)
    assert len(three.choices) == 3
    assert three.usage.completion_tokens == 3 * one.usage.completion_tokens
