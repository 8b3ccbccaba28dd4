"""A cached answer in any of its route's two shapes: the complete body and the stream's items.

An answer is stored as it was sent: the complete body of a non-streamed miss, or the items of a
streamed one (recorded as relayed). A hit is served in the shape the request asks for: a stored
stream replays item for item (its own chunk structure, ids and finish reasons); a stored body
becomes the items the upstream would have streamed, and a stored stream becomes the body. The
OpenAI shapes (chat and legacy completions, the Responses API) and the Anthropic Messages shape
are covered.
"""

from __future__ import annotations

import copy
from typing import Any

import orjson

from gateway.translate import responses_api

Json = dict[str, Any]

__all__ = ["assemble", "complete_stream", "explode"]


def complete_stream(endpoint: str, items: list[Json]) -> bool:
    """Whether a relayed stream ended as a finished answer (never a cut or failed stream)."""
    if endpoint == "responses":
        return responses_api.complete_stream(items)
    if endpoint == "messages":
        kinds = [str(item.get("type") or "") for item in items]
        return "message_start" in kinds and "message_delta" in kinds and "error" not in kinds
    seen: dict[int, bool] = {}
    for chunk in items:
        if "error" in chunk:
            return False
        for choice in chunk.get("choices") or ():
            if isinstance(choice, dict):
                index = int(choice.get("index") or 0)
                seen[index] = seen.get(index, False) or bool(choice.get("finish_reason"))
    return bool(seen) and all(seen.values())


def assemble(endpoint: str, items: list[Json]) -> Json:
    """The complete body a stream's items add up to."""
    if endpoint == "responses":
        return responses_api.assemble(items)
    if endpoint == "messages":
        return _assemble_message(items)
    return _assemble_chunks(items, legacy=endpoint == "completions")


def explode(endpoint: str, body: Json) -> list[Json]:
    """The stream items that carry a complete body (the usage chunk included; the relay drops it
    unless the client asked for it)."""
    if endpoint == "responses":
        return responses_api.explode(body)
    if endpoint == "messages":
        return _explode_message(body)
    return _explode_chunks(body, legacy=endpoint == "completions")


# --- OpenAI chat and legacy completions ------------------------------------------------------------


def _new_choice(index: int, legacy: bool) -> Json:
    if legacy:
        return {"index": index, "text": "", "logprobs": None, "finish_reason": None}
    return {"index": index, "message": {"role": "assistant", "content": None}, "logprobs": None, "finish_reason": None}


def _add_tool_calls(message: Json, fragments: Any) -> None:
    calls: list[Json] = message.setdefault("tool_calls", [])
    for fragment in fragments or ():
        index = int(fragment.get("index") or 0)
        while len(calls) <= index:
            calls.append({"id": "", "type": "function", "function": {"name": "", "arguments": ""}})
        call = calls[index]
        if fragment.get("id"):
            call["id"] = fragment["id"]
        if fragment.get("type"):
            call["type"] = fragment["type"]
        function = fragment.get("function") or {}
        call["function"]["name"] += str(function.get("name") or "")
        call["function"]["arguments"] += str(function.get("arguments") or "")


def _assemble_chunks(items: list[Json], *, legacy: bool) -> Json:
    first = items[0] if items else {}
    choices: dict[int, Json] = {}
    usage: Any = None
    for chunk in items:
        if chunk.get("usage"):
            usage = chunk["usage"]
        for part in chunk.get("choices") or ():
            index = int(part.get("index") or 0)
            choice = choices.setdefault(index, _new_choice(index, legacy))
            if part.get("finish_reason"):
                choice["finish_reason"] = part["finish_reason"]
            if legacy:
                choice["text"] += str(part.get("text") or "")
                continue
            delta = part.get("delta") or {}
            message = choice["message"]
            if delta.get("role"):
                message["role"] = delta["role"]
            if isinstance(delta.get("content"), str):
                message["content"] = (message["content"] or "") + delta["content"]
            if isinstance(delta.get("refusal"), str):
                message["refusal"] = (message.get("refusal") or "") + delta["refusal"]
            if delta.get("tool_calls"):
                _add_tool_calls(message, delta["tool_calls"])
    body: Json = {
        "id": first.get("id"),
        "object": "text_completion" if legacy else "chat.completion",
        "created": first.get("created"),
        "model": first.get("model"),
        "choices": [choices[i] for i in sorted(choices)],
    }
    if first.get("system_fingerprint"):
        body["system_fingerprint"] = first["system_fingerprint"]
    if usage:
        body["usage"] = usage
    return body


def _explode_chunks(body: Json, *, legacy: bool) -> list[Json]:
    base: Json = {
        "id": body.get("id"),
        "object": "text_completion" if legacy else "chat.completion.chunk",
        "created": body.get("created"),
        "model": body.get("model"),
    }
    if body.get("system_fingerprint"):
        base["system_fingerprint"] = body["system_fingerprint"]
    items: list[Json] = []
    for choice in body.get("choices") or ():
        index = int(choice.get("index") or 0)
        finish = choice.get("finish_reason")
        if legacy:
            items.append(
                {
                    **base,
                    "choices": [
                        {"index": index, "text": choice.get("text") or "", "logprobs": None, "finish_reason": None}
                    ],
                }
            )
            items.append({**base, "choices": [{"index": index, "text": "", "logprobs": None, "finish_reason": finish}]})
            continue
        message = choice.get("message") or {}
        role = message.get("role") or "assistant"
        opening = {"role": role, "content": "" if isinstance(message.get("content"), str) else None}
        items.append({**base, "choices": [{"index": index, "delta": opening, "finish_reason": None}]})
        if message.get("content"):
            items.append(
                {**base, "choices": [{"index": index, "delta": {"content": message["content"]}, "finish_reason": None}]}
            )
        if message.get("refusal"):
            items.append(
                {**base, "choices": [{"index": index, "delta": {"refusal": message["refusal"]}, "finish_reason": None}]}
            )
        for position, call in enumerate(message.get("tool_calls") or ()):
            function = call.get("function") or {}
            fragment = {
                "index": position,
                "id": call.get("id"),
                "type": call.get("type") or "function",
                "function": {"name": function.get("name") or "", "arguments": function.get("arguments") or ""},
            }
            items.append(
                {**base, "choices": [{"index": index, "delta": {"tool_calls": [fragment]}, "finish_reason": None}]}
            )
        items.append({**base, "choices": [{"index": index, "delta": {}, "finish_reason": finish}]})
    if body.get("usage"):
        items.append({**base, "choices": [], "usage": body["usage"]})
    return items


# --- Anthropic Messages -----------------------------------------------------------------------------


def _assemble_message(items: list[Json]) -> Json:
    message: Json = {"type": "message", "role": "assistant", "content": []}
    blocks: dict[int, Json] = {}
    partial: dict[int, str] = {}
    usage: Json = {}
    for event in items:
        kind = event.get("type")
        if kind == "message_start":
            message = copy.deepcopy(event.get("message") or {})
            usage.update(message.get("usage") or {})
        elif kind == "content_block_start":
            index = int(event.get("index") or 0)
            blocks[index] = copy.deepcopy(event.get("content_block") or {})
        elif kind == "content_block_delta":
            index = int(event.get("index") or 0)
            block = blocks.setdefault(index, {"type": "text", "text": ""})
            delta = event.get("delta") or {}
            match delta.get("type"):
                case "text_delta":
                    block["text"] = str(block.get("text") or "") + str(delta.get("text") or "")
                case "input_json_delta":
                    partial[index] = partial.get(index, "") + str(delta.get("partial_json") or "")
                case "thinking_delta":
                    block["thinking"] = str(block.get("thinking") or "") + str(delta.get("thinking") or "")
                case "signature_delta":
                    block["signature"] = delta.get("signature")
        elif kind == "message_delta":
            delta = event.get("delta") or {}
            message["stop_reason"] = delta.get("stop_reason")
            message["stop_sequence"] = delta.get("stop_sequence")
            usage.update(event.get("usage") or {})
    for index, text in partial.items():
        blocks[index]["input"] = orjson.loads(text) if text.strip() else blocks[index].get("input") or {}
    message["content"] = [blocks[i] for i in sorted(blocks)]
    message["usage"] = usage
    return message


def _block_events(index: int, block: Json) -> list[Json]:
    kind = block.get("type")
    if kind == "text":
        start: Json = {"type": "text", "text": ""}
        deltas: list[Json] = [{"type": "text_delta", "text": block.get("text") or ""}]
    elif kind == "tool_use":
        start = {"type": "tool_use", "id": block.get("id"), "name": block.get("name"), "input": {}}
        deltas = [{"type": "input_json_delta", "partial_json": orjson.dumps(block.get("input") or {}).decode()}]
    elif kind == "thinking":
        start = {"type": "thinking", "thinking": "", "signature": ""}
        deltas = [{"type": "thinking_delta", "thinking": block.get("thinking") or ""}]
        if block.get("signature"):
            deltas.append({"type": "signature_delta", "signature": block["signature"]})
    else:
        start, deltas = block, []
    events: list[Json] = [{"type": "content_block_start", "index": index, "content_block": start}]
    events.extend({"type": "content_block_delta", "index": index, "delta": delta} for delta in deltas)
    events.append({"type": "content_block_stop", "index": index})
    return events


def _explode_message(body: Json) -> list[Json]:
    usage: Json = dict(body.get("usage") or {})
    start = {**body, "content": [], "stop_reason": None, "stop_sequence": None, "usage": {**usage, "output_tokens": 0}}
    events: list[Json] = [{"type": "message_start", "message": start}]
    for index, block in enumerate(body.get("content") or ()):
        events.extend(_block_events(index, block))
    delta = {"stop_reason": body.get("stop_reason"), "stop_sequence": body.get("stop_sequence")}
    events.append({"type": "message_delta", "delta": delta, "usage": usage})
    events.append({"type": "message_stop"})
    return events
