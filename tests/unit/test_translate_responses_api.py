"""The Responses API <-> Chat Completions translation, and the bridge that serves the Responses
API through a provider's chat (fed recorded chunks; no I/O)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from gateway.errors import InvalidRequest
from gateway.providers.base import Provider, ProviderConfig, UpstreamCall
from gateway.providers.responses_bridge import ResponsesViaChat
from gateway.translate import responses_api
from gateway.translate.responses_api import ESTIMATED_MARK, EventsFromChunks

Json = dict[str, Any]


IMAGE: Json = {"type": "input_image", "image_url": "https://x/y.png", "detail": "low"}


def test_request_items_become_chat_turns() -> None:
    body = {
        "model": "m",
        "instructions": "Be brief.",
        "input": [
            {"role": "developer", "content": "Answer in French."},
            {"role": "user", "content": [{"type": "input_text", "text": "Look"}, IMAGE]},
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Check."}]},
            {"type": "function_call", "call_id": "c1", "name": "a", "arguments": "{}"},
            {"type": "function_call", "call_id": "c2", "name": "b", "arguments": '{"x":1}'},
            {"type": "reasoning", "id": "rs_1", "summary": []},
            {"type": "function_call_output", "call_id": "c1", "output": "one"},
            {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "two"}]},
        ],
        "tools": [{"type": "function", "name": "a", "parameters": {"type": "object"}, "strict": True}],
        "tool_choice": {"type": "function", "name": "a"},
        "text": {"format": {"type": "json_object"}},
        "max_output_tokens": 99,
        "top_p": 0.5,
        "store": True,
        "metadata": {"k": "v"},
    }
    chat = responses_api.to_chat(body)
    assert chat["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "system", "content": "Answer in French."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Look"},
                {"type": "image_url", "image_url": {"url": "https://x/y.png", "detail": "low"}},
            ],
        },
        {
            "role": "assistant",
            "content": "Check.",
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "a", "arguments": "{}"}},
                {"id": "c2", "type": "function", "function": {"name": "b", "arguments": '{"x":1}'}},
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "one"},
        {"role": "tool", "tool_call_id": "c2", "content": "two"},
    ]
    assert chat["tools"] == [
        {"type": "function", "function": {"name": "a", "parameters": {"type": "object"}, "strict": True}}
    ]
    assert chat["tool_choice"] == {"type": "function", "function": {"name": "a"}}
    assert chat["response_format"] == {"type": "json_object"}
    assert (chat["max_tokens"], chat["top_p"]) == (99, 0.5)
    assert "store" not in chat and "metadata" not in chat


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": "x", "tools": [{"type": "web_search"}]}, "tools.0.type"),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input.0.type"),
        ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}, "input.0.content"),
    ],
)
def test_what_chat_cannot_say_is_a_400(body: Json, param: str) -> None:
    with pytest.raises(InvalidRequest) as exc:
        responses_api.to_chat(body)
    assert exc.value.param == param


def test_chat_completion_becomes_a_response() -> None:
    completion = {
        "created": 7,
        "model": "m-1",
        "choices": [
            {
                "message": {
                    "role": "assistant",
                    "content": "Hi",
                    "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
                },
                "finish_reason": "length",
            }
        ],
        "usage": {
            "prompt_tokens": 12,
            "completion_tokens": 5,
            "prompt_tokens_details": {"cached_tokens": 4},
            "completion_tokens_details": {"reasoning_tokens": 2},
        },
    }
    response = responses_api.from_chat_completion(completion, {"model": "m", "metadata": {"a": "b"}})
    assert response["status"] == "incomplete" and response["incomplete_details"] == {"reason": "max_output_tokens"}
    assert [item["type"] for item in response["output"]] == ["message", "function_call"]
    assert response["output"][1]["call_id"] == "c1" and response["output"][0]["content"][0]["text"] == "Hi"
    assert response["usage"] == {
        "input_tokens": 12,
        "input_tokens_details": {"cached_tokens": 4},
        "output_tokens": 5,
        "output_tokens_details": {"reasoning_tokens": 2},
        "total_tokens": 17,
    }
    usage = responses_api.ledger_usage(response["usage"])
    assert usage is not None
    assert (usage.prompt_tokens, usage.cached_tokens, usage.completion_tokens, usage.reasoning_tokens) == (12, 4, 5, 2)
    assert response["metadata"] == {"a": "b"} and response["created_at"] == 7


def _chunk(delta: Json, finish: str | None = None) -> Json:
    return {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


CHUNKS = [
    _chunk({"role": "assistant", "content": ""}),
    _chunk({"content": "Let me "}),
    _chunk({"content": "look."}),
    _chunk({"tool_calls": [{"index": 0, "id": "c0", "function": {"name": "f", "arguments": '{"a"'}}]}),
    _chunk({"tool_calls": [{"index": 0, "function": {"arguments": ": 1}"}}]}),
    _chunk({"tool_calls": [{"index": 1, "id": "c1", "function": {"name": "g", "arguments": "{}"}}]}),
    _chunk({}, "tool_calls"),
    {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 3}},
]


def test_chunks_become_the_typed_event_sequence_and_explode_back() -> None:
    machine = EventsFromChunks({"model": "m"})
    events = machine.start()
    for chunk in CHUNKS:
        events.extend(machine.feed(chunk))
    events.extend(machine.finish())
    assert [e["type"] for e in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    final = events[-1]["response"]
    assert [(i["type"], i["status"]) for i in final["output"]] == [("message", "completed")] + [
        ("function_call", "completed")
    ] * 2
    assert final["output"][0]["content"][0]["text"] == "Let me look."
    assert json.loads(final["output"][1]["arguments"]) == {"a": 1} and final["output"][2]["call_id"] == "c1"
    assert final["usage"]["input_tokens"] == 9 and final["usage"]["output_tokens"] == 3
    assert [e["output_index"] for e in events if e["type"] == "response.output_item.done"] == [0, 1, 2]
    # A cached answer replays as a stream that assembles to the same response.
    replay = responses_api.explode(final)
    assert responses_api.complete_stream(replay) and responses_api.assemble(replay) == final
    assert [e["type"] for e in replay if e["type"].endswith(".done")] == [
        e["type"] for e in events if e["type"].endswith(".done")
    ]
    assert not responses_api.complete_stream(replay[:-1])


class _Chat(Provider):
    """A provider whose chat stream is recorded chunks and reports no usage."""

    kind = "recorded"

    def __init__(self, chunks: list[Json]) -> None:
        self.chunks = chunks
        self.sent: list[Json] = []

    async def chat(self, call: UpstreamCall) -> Json:
        self.sent.append(call.body)
        return {"model": "m", "choices": [{"message": {"role": "assistant", "content": "Hello there"}}]}

    async def _stream(self, call: UpstreamCall) -> AsyncIterator[Json]:
        self.sent.append(call.body)
        for chunk in self.chunks:
            yield chunk

    def chat_stream(self, call: UpstreamCall) -> AsyncIterator[Json]:
        return self._stream(call)


def _call() -> UpstreamCall:
    provider = ProviderConfig(id=1, slug="p", kind="recorded", base_url="")
    return UpstreamCall(provider=provider, upstream_model="up-1", body={"model": "m", "input": "Hi"})


def test_the_bridge_estimates_usage_an_upstream_did_not_report() -> None:
    chat = _Chat([c for c in CHUNKS if c.get("choices")])
    bridge = ResponsesViaChat(chat)
    response = asyncio.run(bridge.responses(_call()))
    assert response.pop(ESTIMATED_MARK) is True and response["usage"]["output_tokens"] > 0
    assert chat.sent[0]["model"] == "up-1" and chat.sent[0]["messages"] == [{"role": "user", "content": "Hi"}]

    async def collect() -> list[Json]:
        return [event async for event in bridge.responses_stream(_call())]

    events = asyncio.run(collect())
    assert chat.sent[1]["stream"] is True
    assert events[-1]["type"] == "response.completed" and events[-1].pop(ESTIMATED_MARK) is True
    assert events[-1]["response"]["usage"]["input_tokens"] > 0
