"""Response and usage translation both ways, on recorded bodies (no I/O)."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import pytest

from core import money
from core.money import PriceInfo
from gateway.translate import usage as usage_tr
from gateway.translate.responses import chat_completion_to_message, message_to_chat_completion
from tests.conftest import time_zero

# A real-shaped Claude answer with text, two parallel tool calls and prompt-cache usage.
CLAUDE_TOOL_MESSAGE: dict[str, Any] = {
    "id": "msg_01XFDUDYJgAACzvnptvVoYEL",
    "type": "message",
    "role": "assistant",
    "model": "claude-sonnet-4-20250514",
    "content": [
        {"type": "text", "text": "I'll check both."},
        {"type": "tool_use", "id": "toolu_01A", "name": "get_weather", "input": {"city": "Paris"}},
        {"type": "tool_use", "id": "toolu_01B", "name": "get_time", "input": {"tz": "Europe/Paris"}},
    ],
    "stop_reason": "tool_use",
    "stop_sequence": None,
    "usage": {
        "input_tokens": 12,
        "cache_creation_input_tokens": 1000,
        "cache_read_input_tokens": 3000,
        "cache_creation": {"ephemeral_5m_input_tokens": 1000, "ephemeral_1h_input_tokens": 0},
        "output_tokens": 40,
        "service_tier": "standard",
    },
}


def test_anthropic_message_with_parallel_tools_and_cache_to_chat_completion():
    out = message_to_chat_completion(CLAUDE_TOOL_MESSAGE)
    choice = out["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "I'll check both."
    calls = choice["message"]["tool_calls"]
    assert [(c["id"], c["function"]["name"]) for c in calls] == [
        ("toolu_01A", "get_weather"),
        ("toolu_01B", "get_time"),
    ]
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [{"city": "Paris"}, {"tz": "Europe/Paris"}]
    usage = out["usage"]
    assert usage["prompt_tokens"] == 4012  # 12 + 1000 written + 3000 read
    assert usage["prompt_tokens_details"]["cached_tokens"] == 3000
    assert usage["prompt_tokens_details"]["cache_write_tokens"] == 1000
    assert usage["completion_tokens"] == 40 and usage["total_tokens"] == 4052


def test_cached_token_accounting_prices_each_part_once():
    """Not double-charged (cache writes counted once) and not under-reported (reads included)."""
    ledger = usage_tr.from_anthropic(CLAUDE_TOOL_MESSAGE["usage"])
    assert (ledger.prompt_tokens, ledger.cached_tokens, ledger.cache_write_tokens) == (4012, 3000, 1000)
    price = PriceInfo(time_zero(), *(Decimal(p) for p in ("3.00", "0.30", "3.75", "15.00")))
    # 12 x 3.00 + 3000 x 0.30 + 1000 x 3.75 + 40 x 15.00 = 36 + 900 + 3750 + 600
    assert money.cost_micro(price, ledger) == 5286


@pytest.mark.parametrize(
    ("stop", "finish"),
    [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("max_tokens", "length"),
        ("tool_use", "tool_calls"),
        ("refusal", "content_filter"),
        ("model_context_window_exceeded", "length"),
        ("pause_turn", "stop"),
    ],
)
def test_stop_reason_to_finish_reason(stop, finish):
    message = {**CLAUDE_TOOL_MESSAGE, "content": [{"type": "text", "text": "x"}], "stop_reason": stop}
    assert message_to_chat_completion(message)["choices"][0]["finish_reason"] == finish


def test_max_token_stop_without_text_has_empty_content():
    message = {**CLAUDE_TOOL_MESSAGE, "content": [], "stop_reason": "max_tokens"}
    choice = message_to_chat_completion(message)["choices"][0]
    assert choice["message"]["content"] == "" and "tool_calls" not in choice["message"]
    assert choice["finish_reason"] == "length"


# A recorded vLLM answer: parallel tool calls, a cached prefix, and one argument string that is not JSON.
VLLM_COMPLETION = {
    "id": "chatcmpl-9f",
    "object": "chat.completion",
    "created": 1731000000,
    "model": "llama-3.3-70b",
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "a", "arguments": '{"x": 1}'}},
                    {"id": "call_2", "type": "function", "function": {"name": "b", "arguments": "not json"}},
                ],
            },
            "finish_reason": "tool_calls",
        }
    ],
    "usage": {
        "prompt_tokens": 100,
        "completion_tokens": 20,
        "total_tokens": 120,
        "prompt_tokens_details": {"cached_tokens": 64},
    },
}


def test_chat_completion_with_tools_to_anthropic_message():
    out = chat_completion_to_message(VLLM_COMPLETION)
    assert out["type"] == "message" and out["role"] == "assistant" and out["id"].startswith("msg_")
    assert out["stop_reason"] == "tool_use" and out["stop_sequence"] is None
    assert out["content"] == [
        {"type": "tool_use", "id": "call_1", "name": "a", "input": {"x": 1}},
        {"type": "tool_use", "id": "call_2", "name": "b", "input": {"_raw": "not json"}},  # never dropped
    ]
    assert out["usage"] == {
        "input_tokens": 36,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 64,
        "output_tokens": 20,
    }


@pytest.mark.parametrize(
    ("finish", "stop"),
    [("stop", "end_turn"), ("length", "max_tokens"), ("tool_calls", "tool_use"), ("content_filter", "refusal")],
)
def test_finish_reason_to_stop_reason(finish, stop):
    completion = {
        "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": finish}],
    }
    assert chat_completion_to_message(completion)["stop_reason"] == stop


def test_matched_stop_sequence_reported_by_vllm():
    completion = {
        "model": "m",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "1, 2"},
                "finish_reason": "stop",
                "stop_reason": "3",
            }
        ],
    }
    out = chat_completion_to_message(completion, stop_sequences=["3"])
    assert (out["stop_reason"], out["stop_sequence"]) == ("stop_sequence", "3")
    assert chat_completion_to_message(completion, stop_sequences=["9"])["stop_reason"] == "end_turn"


def test_empty_text_makes_no_block():
    completion = {"model": "m", "choices": [{"message": {"role": "assistant", "content": ""}, "finish_reason": "stop"}]}
    assert chat_completion_to_message(completion)["content"] == []


def test_usage_round_trip_is_exact():
    anthropic = {"input_tokens": 5, "cache_creation_input_tokens": 7, "cache_read_input_tokens": 11, "output_tokens": 3}
    assert usage_tr.openai_to_anthropic(usage_tr.anthropic_to_openai(anthropic)) == anthropic
