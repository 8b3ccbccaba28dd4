"""The two streaming state machines.

``ChunksFromEvents``: Anthropic stream events in, OpenAI ``chat.completion.chunk`` objects out
(role chunk first, text and tool-call deltas, ``finish_reason``, then a usage chunk the pipeline
strips when the client did not ask for it). An ``error`` event raises ``UpstreamError``.

``EventsFromChunks``: OpenAI chunks in, the exact Anthropic event sequence out
(``message_start``, ``content_block_start``/``_delta``/``_stop`` per block, ``message_delta`` with
cumulative usage, ``message_stop``). Empty text is skipped and ``tool_calls: []`` opens nothing.

Both are plain objects fed one item at a time, so they are tested without any I/O.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from typing import Any

import orjson

from gateway.errors import UpstreamError, upstream_status_error
from gateway.translate import usage as usage_tr
from gateway.translate.responses import finish_reason, new_message_id, stop_reason

Json = dict[str, Any]

#: Set on a translated ``message_delta`` whose usage is a tokenizer estimate; removed before sending.
ESTIMATED_MARK = "x_chittycan_estimated"

ERROR_STATUS = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "billing_error": 402,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "timeout_error": 504,
    "overloaded_error": 529,
}


def error_from_event(event: Mapping[str, Any]) -> UpstreamError:
    """An Anthropic ``error`` (event or body) as the ``UpstreamError`` its status would give."""
    error = event.get("error") if isinstance(event.get("error"), dict) else {}
    assert isinstance(error, dict)
    kind = str(error.get("type") or "api_error")
    message = str(error.get("message") or kind)
    return upstream_status_error(ERROR_STATUS.get(kind, 500), message, code=kind)


def _merge_usage(into: Json, reported: Any) -> None:
    if isinstance(reported, dict):
        for name, value in reported.items():
            if isinstance(value, int) and not isinstance(value, bool):
                into[name] = value


class ChunksFromEvents:
    """Anthropic events -> OpenAI chunks."""

    def __init__(self, model: str) -> None:
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.model = model
        self.created = int(time.time())
        self.usage: Json = {}  # Anthropic's numbers, last value wins (they are cumulative)
        self.finished = False
        self._tool_index: dict[int, int] = {}  # Anthropic block index -> OpenAI tool-call index

    def _chunk(self, delta: Json, finish: str | None = None) -> Json:
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
        }

    def feed(self, event: Json) -> list[Json]:
        kind = event.get("type")
        if kind == "message_start":
            return self._message_start(event.get("message") or {})
        if kind == "content_block_start":
            return self._block_start(int(event.get("index") or 0), event.get("content_block") or {})
        if kind == "content_block_delta":
            return self._block_delta(int(event.get("index") or 0), event.get("delta") or {})
        if kind == "message_delta":
            _merge_usage(self.usage, event.get("usage"))
            reason = (event.get("delta") or {}).get("stop_reason")
            return [self._chunk({}, finish_reason(reason))]
        if kind == "message_stop":
            self.finished = True
            usage_chunk = self._chunk({})
            usage_chunk["choices"] = []
            usage_chunk["usage"] = usage_tr.anthropic_to_openai(self.usage)
            return [usage_chunk]
        if kind == "error":
            raise error_from_event(event)
        return []  # ping, content_block_stop, and event types added later

    def _message_start(self, message: Json) -> list[Json]:
        self.id = str(message.get("id") or self.id)
        self.model = str(message.get("model") or self.model)
        _merge_usage(self.usage, message.get("usage"))
        return [self._chunk({"role": "assistant", "content": ""})]

    def _block_start(self, index: int, block: Json) -> list[Json]:
        if block.get("type") == "text" and block.get("text"):
            return [self._chunk({"content": block["text"]})]
        if block.get("type") != "tool_use":
            return []
        position = self._tool_index[index] = len(self._tool_index)
        initial = block.get("input")
        arguments = orjson.dumps(initial).decode() if initial else ""
        call = {
            "index": position,
            "id": block.get("id"),
            "type": "function",
            "function": {"name": block.get("name"), "arguments": arguments},
        }
        return [self._chunk({"tool_calls": [call]})]

    def _block_delta(self, index: int, delta: Json) -> list[Json]:
        kind = delta.get("type")
        if kind == "text_delta" and delta.get("text"):
            return [self._chunk({"content": delta["text"]})]
        if kind == "input_json_delta" and delta.get("partial_json") and index in self._tool_index:
            call = {"index": self._tool_index[index], "function": {"arguments": delta["partial_json"]}}
            return [self._chunk({"tool_calls": [call]})]
        return []  # thinking, signature and citations deltas have no Chat Completions equivalent


class EventsFromChunks:
    """OpenAI chunks -> Anthropic events (first choice only; ``/v1/messages`` has one)."""

    def __init__(self, model: str, *, input_tokens: int, stop_sequences: list[str] | None = None) -> None:
        self.id = new_message_id()
        self.model = model
        self.input_tokens = input_tokens  # estimate for message_start; the real one is in message_delta
        self.stop_sequences = stop_sequences or []
        self.usage: Json | None = None  # the OpenAI usage object, when the upstream sent one
        self.text: list[str] = []  # everything generated, for an estimate if usage never arrives
        self._started = False
        self._index = -1
        self._open: int | None = None  # the open Anthropic block index
        self._tools: dict[int, int] = {}  # OpenAI tool-call index -> Anthropic block index
        self._stop: str | None = None
        self._stop_sequence: str | None = None

    def feed(self, chunk: Json) -> list[Json]:
        events = self._start(chunk)
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or []:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            content = delta.get("content")
            if isinstance(content, str) and content:
                events.extend(self._text(content))
            for call in delta.get("tool_calls") or []:
                if isinstance(call, dict):
                    events.extend(self._tool(call))
            if choice.get("finish_reason"):
                events.extend(self._close())
                self._set_stop(choice)
        return events

    def finish(self, fallback_usage: Json | None = None) -> list[Json]:
        """Close the message: ``message_delta`` with the final usage, then ``message_stop``.

        ``fallback_usage`` (an OpenAI usage object) is used, and marked, when the upstream sent none.
        """
        events = self._start({})
        events.extend(self._close())
        usage = self.usage if self.usage is not None else fallback_usage
        delta: Json = {
            "type": "message_delta",
            "delta": {"stop_reason": self._stop or "end_turn", "stop_sequence": self._stop_sequence},
            "usage": usage_tr.openai_to_anthropic(usage),
        }
        if self.usage is None:
            delta[ESTIMATED_MARK] = True
        events.append(delta)
        events.append({"type": "message_stop"})
        return events

    def _start(self, chunk: Json) -> list[Json]:
        if self._started:
            return []
        self._started = True
        self.model = str(chunk.get("model") or self.model)
        message: Json = {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {
                "input_tokens": self.input_tokens,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0,
                "output_tokens": 1,
            },
        }
        return [{"type": "message_start", "message": message}]

    def _open_block(self, block: Json) -> list[Json]:
        events = self._close()
        self._index += 1
        self._open = self._index
        events.append({"type": "content_block_start", "index": self._index, "content_block": block})
        return events

    def _close(self) -> list[Json]:
        if self._open is None:
            return []
        index, self._open = self._open, None
        return [{"type": "content_block_stop", "index": index}]

    def _text(self, text: str) -> list[Json]:
        self.text.append(text)
        events: list[Json] = []
        if self._open is None or self._open in self._tools.values():
            events = self._open_block({"type": "text", "text": ""})
        delta = {"type": "text_delta", "text": text}
        events.append({"type": "content_block_delta", "index": self._index, "delta": delta})
        return events

    def _tool(self, call: Json) -> list[Json]:
        position = int(call.get("index") or 0)
        fn = call.get("function") or {}
        events: list[Json] = []
        if position not in self._tools:
            name = str(fn.get("name") or "")
            tool_id = str(call.get("id") or f"toolu_{uuid.uuid4().hex[:24]}")
            events = self._open_block({"type": "tool_use", "id": tool_id, "name": name, "input": {}})
            self._tools[position] = self._index
            self.text.append(name)
        arguments = fn.get("arguments")
        if isinstance(arguments, str) and arguments:
            self.text.append(arguments)
            delta = {"type": "input_json_delta", "partial_json": arguments}
            events.append({"type": "content_block_delta", "index": self._tools[position], "delta": delta})
        return events

    def _set_stop(self, choice: Json) -> None:
        finish = choice.get("finish_reason")
        matched = choice.get("stop_reason")
        if finish == "stop" and isinstance(matched, str) and matched in self.stop_sequences:
            self._stop, self._stop_sequence = "stop_sequence", matched
        else:
            self._stop = stop_reason(finish)
