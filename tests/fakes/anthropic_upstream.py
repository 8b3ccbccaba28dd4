"""A fake Anthropic Messages API on loopback, speaking the real wire format.

``POST /v1/messages`` answers JSON, or SSE with an ``event:`` line on every frame (``message_start``,
``content_block_start``, ``ping``, ``content_block_delta`` with ``text_delta`` / ``input_json_delta``
split mid-token, ``content_block_stop``, ``message_delta`` with cumulative usage, ``message_stop``).
When tools are offered and the last turn is not a tool result it calls up to two of them (one if
``disable_parallel_tool_use``). Usage: 10 input tokens per message, ``cache_read`` /
``cache_creation`` as set on the instance, 7 output tokens. ``POST /v1/messages/count_tokens``
answers 10 per message. Tests queue ``Reply`` objects (shared with the OpenAI fake) for errors,
in-stream ``error`` events and resets.
"""

from __future__ import annotations

from typing import Any

import orjson

from tests.fakes.openai_upstream import FakeOpenAI, Reply


def event(name: str, data: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def error_body(kind: str, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": kind, "message": message}, "request_id": "req_fake"}


class FakeAnthropic(FakeOpenAI):
    default_text = "Hello from the fake Anthropic!"

    def __init__(self) -> None:
        super().__init__()
        self.cache_read = 0
        self.cache_creation = 0

    def reset(self) -> None:
        super().reset()
        self.cache_read = 0
        self.cache_creation = 0

    def default_reply(self, path: str, body: dict[str, Any]) -> Reply:
        if path == "/v1/messages/count_tokens":
            return Reply(json={"input_tokens": self.prompt_tokens(body)})
        if path == "/v1/messages":
            if not isinstance(body.get("max_tokens"), int):
                return Reply(status=400, json=error_body("invalid_request_error", "max_tokens: Field required"))
            return self.stream_reply(body) if body.get("stream") else Reply(json=self.message_json(body))
        return Reply(status=404, json=error_body("not_found_error", f"no route {path}"))

    # --- the answer ---------------------------------------------------------------------------

    def tool_uses(self, body: dict[str, Any]) -> list[dict[str, Any]]:
        tools = body.get("tools") or []
        choice = body.get("tool_choice") or {}
        if not tools or choice.get("type") == "none":
            return []
        last = (body.get("messages") or [{}])[-1]
        content = last.get("content")
        if isinstance(content, list) and any(b.get("type") == "tool_result" for b in content):
            return []
        count = 1 if choice.get("disable_parallel_tool_use") else 2
        return [
            {"type": "tool_use", "id": f"toolu_fake{i}", "name": tool["name"], "input": {"city": "Paris", "n": i}}
            for i, tool in enumerate(tools[:count])
        ]

    def usage(self, body: dict[str, Any]) -> dict[str, Any]:
        return {
            "input_tokens": self.prompt_tokens(body),
            "cache_creation_input_tokens": self.cache_creation,
            "cache_read_input_tokens": self.cache_read,
            "cache_creation": {"ephemeral_5m_input_tokens": self.cache_creation, "ephemeral_1h_input_tokens": 0},
            "output_tokens": 7,
            "service_tier": "standard",
        }

    def content(self, body: dict[str, Any]) -> tuple[list[dict[str, Any]], str]:
        uses = self.tool_uses(body)
        if uses:
            return [{"type": "text", "text": "Let me check."}, *uses], "tool_use"
        return [{"type": "text", "text": self.text}], "end_turn"

    def message_json(self, body: dict[str, Any]) -> dict[str, Any]:
        content, stop = self.content(body)
        return {
            "id": "msg_fake123",
            "type": "message",
            "role": "assistant",
            "model": body.get("model"),
            "content": content,
            "stop_reason": stop,
            "stop_sequence": None,
            "usage": self.usage(body),
        }

    def stream_reply(self, body: dict[str, Any]) -> Reply:
        content, stop = self.content(body)
        start = {**self.message_json(body), "content": [], "stop_reason": None}
        start["usage"] = {**self.usage(body), "output_tokens": 1}
        frames = [event("message_start", {"type": "message_start", "message": start})]
        for index, block in enumerate(content):
            block_frames = self.block_frames(index, block)
            if index == 0:  # where the real API sends its first ping
                block_frames.insert(1, event("ping", {"type": "ping"}))
            frames.extend(block_frames)
        delta = {"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": None}}
        frames.append(event("message_delta", {**delta, "usage": {"output_tokens": 7}}))
        frames.append(event("message_stop", {"type": "message_stop"}))
        return Reply(frames=frames)

    @staticmethod
    def block_frames(index: int, block: dict[str, Any]) -> list[bytes]:
        start: dict[str, Any]
        if block["type"] == "text":
            start = {"type": "text", "text": ""}
            pieces = [("text_delta", "text", block["text"][i : i + 6]) for i in range(0, len(block["text"]), 6)]
        else:
            start = {**block, "input": {}}
            args = orjson.dumps(block["input"]).decode()
            pieces = [("input_json_delta", "partial_json", "")]
            pieces += [("input_json_delta", "partial_json", args[i : i + 5]) for i in range(0, len(args), 5)]
        frames = [event("content_block_start", {"type": "content_block_start", "index": index, "content_block": start})]
        for kind, field, value in pieces:
            data = {"type": "content_block_delta", "index": index, "delta": {"type": kind, field: value}}
            frames.append(event("content_block_delta", data))
        frames.append(event("content_block_stop", {"type": "content_block_stop", "index": index}))
        return frames
