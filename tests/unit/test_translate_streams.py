"""The streaming state machines, fed recorded streams one item at a time (no I/O)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from gateway.errors import UpstreamError
from gateway.translate.streams import ESTIMATED_MARK, ChunksFromEvents, EventsFromChunks

# --- Anthropic events -> OpenAI chunks --------------------------------------------------------------

# A recorded Claude stream: text, then two parallel tool calls whose JSON is split mid-token, pings
# anywhere, cache usage in message_start and cumulative output in message_delta.
CLAUDE_STREAM: list[dict[str, Any]] = [
    {
        "type": "message_start",
        "message": {
            "id": "msg_01",
            "type": "message",
            "role": "assistant",
            "model": "claude-sonnet-4-20250514",
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {
                "input_tokens": 25,
                "cache_creation_input_tokens": 100,
                "cache_read_input_tokens": 200,
                "output_tokens": 1,
            },
        },
    },
    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    {"type": "ping"},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Checking"}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": ""}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": " both."}},
    {"type": "content_block_stop", "index": 0},
    {
        "type": "content_block_start",
        "index": 1,
        "content_block": {"type": "tool_use", "id": "toolu_A", "name": "get_weather", "input": {}},
    },
    {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": ""}},
    {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": '{"ci'}},
    {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": 'ty": "Par'}},
    {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": 'is"}'}},
    {"type": "content_block_stop", "index": 1},
    {
        "type": "content_block_start",
        "index": 2,
        "content_block": {"type": "tool_use", "id": "toolu_B", "name": "get_time", "input": {}},
    },
    {"type": "ping"},
    {"type": "content_block_delta", "index": 2, "delta": {"type": "input_json_delta", "partial_json": '{"tz":'}},
    {"type": "content_block_delta", "index": 2, "delta": {"type": "input_json_delta", "partial_json": ' "UTC"}'}},
    {"type": "content_block_stop", "index": 2},
    {
        "type": "message_delta",
        "delta": {"stop_reason": "tool_use", "stop_sequence": None},
        "usage": {"output_tokens": 40},
    },
    {"type": "message_stop"},
]


def _chunks(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    machine = ChunksFromEvents("fallback-model")
    return [chunk for event in events for chunk in machine.feed(event)]


def accumulate(chunks: list[dict[str, Any]]) -> dict[str, Any]:
    """What an OpenAI client assembles: text, tool calls by index, finish reason, usage."""
    text, finish, usage = "", None, None
    calls: dict[int, dict[str, Any]] = {}
    for chunk in chunks:
        usage = chunk.get("usage") or usage
        for choice in chunk["choices"]:
            delta = choice["delta"]
            text += delta.get("content") or ""
            for call in delta.get("tool_calls") or []:
                slot = calls.setdefault(call["index"], {"id": None, "name": "", "arguments": ""})
                slot["id"] = call.get("id") or slot["id"]
                slot["name"] += (call.get("function") or {}).get("name") or ""
                slot["arguments"] += (call.get("function") or {}).get("arguments") or ""
            finish = choice["finish_reason"] or finish
    return {"text": text, "calls": calls, "finish": finish, "usage": usage}


def test_claude_stream_to_openai_chunks():
    chunks = _chunks(CLAUDE_STREAM)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["id"] == "msg_01" and c["model"] == "claude-sonnet-4-20250514" for c in chunks)
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    # no chunk for pings, empty deltas or block stops; finish only on one chunk
    assert all(c["choices"] == [] or c["choices"][0]["delta"] != {} or c["choices"][0]["finish_reason"] for c in chunks)
    result = accumulate(chunks)
    assert result["text"] == "Checking both."
    assert result["calls"] == {
        0: {"id": "toolu_A", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        1: {"id": "toolu_B", "name": "get_time", "arguments": '{"tz": "UTC"}'},
    }
    assert result["finish"] == "tool_calls"
    assert chunks[-1]["choices"] == []
    assert result["usage"]["prompt_tokens"] == 325
    assert result["usage"]["prompt_tokens_details"]["cached_tokens"] == 200
    assert result["usage"]["prompt_tokens_details"]["cache_write_tokens"] == 100
    assert result["usage"]["completion_tokens"] == 40  # cumulative, not 1 + 40


def test_tool_call_ids_and_names_appear_once_per_index():
    starts = [
        call
        for c in _chunks(CLAUDE_STREAM)
        for choice in c["choices"]
        for call in choice["delta"].get("tool_calls") or []
        if "id" in call
    ]
    assert [(s["index"], s["id"], s["type"]) for s in starts] == [
        (0, "toolu_A", "function"),
        (1, "toolu_B", "function"),
    ]


def test_max_tokens_stop_is_length():
    events = [
        CLAUDE_STREAM[0],
        CLAUDE_STREAM[1],
        CLAUDE_STREAM[3],
        {"type": "message_delta", "delta": {"stop_reason": "max_tokens"}, "usage": {"output_tokens": 2}},
        {"type": "message_stop"},
    ]
    assert accumulate(_chunks(events))["finish"] == "length"


def test_in_stream_error_event_raises_with_the_mapped_status():
    machine = ChunksFromEvents("m")
    machine.feed(CLAUDE_STREAM[0])
    with pytest.raises(UpstreamError) as exc:
        machine.feed({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
    assert exc.value.retryable and exc.value.code == "overloaded_error" and exc.value.message == "Overloaded"
    assert not machine.finished


def test_thinking_deltas_are_not_content():
    events = [
        CLAUDE_STREAM[0],
        {"type": "content_block_start", "index": 0, "content_block": {"type": "thinking", "thinking": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "hmm"}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "signature_delta", "signature": "sig"}},
    ]
    assert accumulate(_chunks(events))["text"] == ""


# --- OpenAI chunks -> Anthropic events --------------------------------------------------------------


def _chunk(delta: dict[str, Any] | None = None, finish: str | None = None, **extra: Any) -> dict[str, Any]:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": "gpt-4o", "choices": choices, **extra}


def _events(
    chunks: list[dict[str, Any]], fallback: dict[str, Any] | None = None, **kwargs: Any
) -> list[dict[str, Any]]:
    machine = EventsFromChunks("requested", input_tokens=kwargs.pop("input_tokens", 9), **kwargs)
    events = [e for c in chunks for e in machine.feed(c)]
    return events + machine.finish(fallback)


def assemble(events: list[dict[str, Any]]) -> dict[str, Any]:
    """What the anthropic SDK's accumulator builds from the events, strictly checking the order."""
    assert events[0]["type"] == "message_start" and events[-1]["type"] == "message_stop"
    assert events[-2]["type"] == "message_delta"
    blocks: list[dict[str, Any]] = []
    open_index = None
    for event in events[1:-2]:
        kind = event["type"]
        if kind == "content_block_start":
            assert open_index is None and event["index"] == len(blocks)
            open_index = event["index"]
            blocks.append({**event["content_block"], "_json": ""})
        elif kind == "content_block_delta":
            assert event["index"] == open_index
            delta = event["delta"]
            if delta["type"] == "text_delta":
                assert delta["text"] != ""
                blocks[open_index]["text"] += delta["text"]
            else:
                assert blocks[open_index]["type"] == "tool_use"
                blocks[open_index]["_json"] += delta["partial_json"]
        elif kind == "content_block_stop":
            assert event["index"] == open_index
            open_index = None
    assert open_index is None
    for block in blocks:
        raw = block.pop("_json")
        if block["type"] == "tool_use":
            block["input"] = json.loads(raw) if raw else {}
    final = events[-2]
    return {
        "content": blocks,
        "stop_reason": final["delta"]["stop_reason"],
        "usage": final["usage"],
        "start": events[0],
    }


# A recorded vLLM stream: role chunk, text, then two parallel tool calls, arguments split mid-token,
# an empty `tool_calls: []` beside content (LiteLLM #29286), and the usage chunk.
VLLM_STREAM = [
    _chunk({"role": "assistant", "content": ""}),
    _chunk({"content": "Let me ", "tool_calls": []}),
    _chunk({"content": ""}),
    _chunk({"content": "check."}),
    _chunk(
        {
            "tool_calls": [
                {"index": 0, "id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": ""}}
            ]
        }
    ),
    _chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"ci'}}]}),
    _chunk({"tool_calls": [{"index": 0, "function": {"arguments": 'ty": "Pa'}}]}),
    _chunk({"tool_calls": [{"index": 0, "function": {"arguments": 'ris"}'}}]}),
    _chunk(
        {
            "tool_calls": [
                {"index": 1, "id": "call_b", "type": "function", "function": {"name": "get_time", "arguments": ""}}
            ]
        }
    ),
    _chunk({"tool_calls": [{"index": 1, "function": {"arguments": "{}"}}]}),
    _chunk({}, "tool_calls"),
    _chunk(
        None,
        usage={
            "prompt_tokens": 120,
            "completion_tokens": 30,
            "total_tokens": 150,
            "prompt_tokens_details": {"cached_tokens": 100},
        },
    ),
]


def test_vllm_stream_with_parallel_tools_to_anthropic_events():
    events = _events(VLLM_STREAM)
    message = assemble(events)
    assert message["content"] == [
        {"type": "text", "text": "Let me check."},
        {"type": "tool_use", "id": "call_a", "name": "get_weather", "input": {"city": "Paris"}},
        {"type": "tool_use", "id": "call_b", "name": "get_time", "input": {}},
    ]
    assert message["stop_reason"] == "tool_use"
    assert message["usage"] == {
        "input_tokens": 20,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 100,
        "output_tokens": 30,
    }
    start = message["start"]["message"]
    assert start["model"] == "gpt-4o" and start["id"].startswith("msg_") and start["content"] == []
    assert start["usage"] == {
        "input_tokens": 9,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "output_tokens": 1,
    }
    assert ESTIMATED_MARK not in events[-2]


def test_empty_tool_calls_list_never_opens_a_block():
    events = _events([_chunk({"role": "assistant", "content": "Hi", "tool_calls": []}), _chunk({}, "stop")])
    assert [e["type"] for e in events] == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert events[2]["delta"] == {"type": "text_delta", "text": "Hi"}


def test_done_only_tool_call_carries_whole_arguments_in_one_chunk():
    call = {"index": 0, "id": "c", "type": "function", "function": {"name": "f", "arguments": '{"a": [1, 2]}'}}
    message = assemble(_events([_chunk({"role": "assistant", "tool_calls": [call]}), _chunk({}, "tool_calls")]))
    assert message["content"] == [{"type": "tool_use", "id": "c", "name": "f", "input": {"a": [1, 2]}}]


def test_text_after_a_tool_block_opens_a_new_text_block():
    chunks = [
        _chunk({"tool_calls": [{"index": 0, "id": "c", "function": {"name": "f", "arguments": "{}"}}]}),
        _chunk({"content": "done"}),
        _chunk({}, "stop"),
    ]
    content = assemble(_events(chunks))["content"]
    assert [b["type"] for b in content] == ["tool_use", "text"]


def test_length_finish_is_max_tokens_and_stop_sequence_is_detected_when_reported():
    assert assemble(_events([_chunk({"content": "a"}), _chunk({}, "length")]))["stop_reason"] == "max_tokens"
    matched = {"index": 0, "delta": {}, "finish_reason": "stop", "stop_reason": "END"}
    chunks = [_chunk({"content": "a"}), {"model": "m", "choices": [matched]}]
    events = _events(chunks, stop_sequences=["END"])
    assert events[-2]["delta"] == {"stop_reason": "stop_sequence", "stop_sequence": "END"}


def test_no_usage_from_upstream_uses_the_fallback_and_marks_it_estimated():
    events = _events(
        [_chunk({"content": "hi"}), _chunk({}, "stop")], fallback={"prompt_tokens": 8, "completion_tokens": 1}
    )
    assert events[-2]["usage"]["input_tokens"] == 8 and events[-2]["usage"]["output_tokens"] == 1
    assert events[-2][ESTIMATED_MARK] is True


def test_usage_on_the_finish_chunk_is_taken_too():
    usage = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
    events = _events([_chunk({"content": "hi"}), _chunk({}, "stop", usage=usage)])
    assert events[-2]["usage"]["output_tokens"] == 2 and ESTIMATED_MARK not in events[-2]


def test_other_choices_are_ignored():
    second = {"index": 1, "delta": {"content": "other"}, "finish_reason": None}
    events = _events([{"model": "m", "choices": [{"index": 0, "delta": {"content": "mine"}}, second]}])
    assert assemble(events)["content"] == [{"type": "text", "text": "mine"}]
