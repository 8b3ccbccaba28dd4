"""Responses both ways: ``chat.completion`` (OpenAI) <-> ``message`` (Anthropic)."""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

import orjson

from gateway.translate import usage as usage_tr

log = logging.getLogger(__name__)

Json = dict[str, Any]

FINISH_FROM_STOP = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}
STOP_FROM_FINISH = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}


def finish_reason(stop_reason: str | None) -> str:
    if stop_reason == "pause_turn":
        log.info("anthropic stop_reason pause_turn reported as finish_reason stop")
    return FINISH_FROM_STOP.get(stop_reason or "", "stop")


def stop_reason(finish: str | None) -> str:
    return STOP_FROM_FINISH.get(finish or "", "end_turn")


def new_message_id() -> str:
    return f"msg_{uuid.uuid4().hex[:24]}"


def tool_input(arguments: Any) -> Json:
    """OpenAI's ``arguments`` string as Anthropic's ``input`` object; never drop what we cannot parse."""
    if isinstance(arguments, dict):
        return arguments
    text = arguments if isinstance(arguments, str) else ""
    if not text.strip():
        return {}
    try:
        parsed = orjson.loads(text)
    except orjson.JSONDecodeError:
        parsed = None
    if isinstance(parsed, dict):
        return parsed
    log.warning("tool call arguments are not a JSON object; wrapped as _raw")
    return {"_raw": text}


# --- Anthropic -> OpenAI -------------------------------------------------------------------------


def assistant_from_blocks(blocks: Any) -> Json:
    """Anthropic assistant content blocks as an OpenAI assistant message: text blocks joined,
    ``tool_use`` blocks as ``tool_calls`` with JSON-string arguments."""
    texts: list[str] = []
    calls: list[Json] = []
    for block in blocks if isinstance(blocks, list) else []:
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            texts.append(str(block.get("text") or ""))
        elif kind == "tool_use":
            arguments = orjson.dumps(block.get("input") or {}).decode()
            calls.append(
                {
                    "id": block.get("id"),
                    "type": "function",
                    "function": {"name": block.get("name"), "arguments": arguments},
                }
            )
    message: Json = {"role": "assistant", "content": "".join(texts) or (None if calls else "")}
    if calls:
        message["tool_calls"] = calls
    return message


def message_to_chat_completion(message: Json) -> Json:
    """An Anthropic ``message`` as an OpenAI ``chat.completion``."""
    reply = assistant_from_blocks(message.get("content") or [])
    reply["refusal"] = None
    return {
        "id": str(message.get("id") or new_message_id()),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": message.get("model"),
        "choices": [
            {"index": 0, "message": reply, "finish_reason": finish_reason(message.get("stop_reason")), "logprobs": None}
        ],
        "usage": usage_tr.anthropic_to_openai(message.get("usage")),
    }


# --- OpenAI -> Anthropic -------------------------------------------------------------------------


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(p.get("text") or "") for p in content if isinstance(p, dict))
    return ""


def _stop(choice: Json, stop_sequences: list[str]) -> tuple[str, str | None]:
    """(stop_reason, stop_sequence). vLLM reports the matched stop string as ``stop_reason``."""
    finish = choice.get("finish_reason")
    matched = choice.get("stop_reason")
    if finish == "stop" and isinstance(matched, str) and matched in stop_sequences:
        return "stop_sequence", matched
    return stop_reason(finish), None


def chat_completion_to_message(completion: Json, *, stop_sequences: list[str] | None = None) -> Json:
    """An OpenAI ``chat.completion`` (first choice) as an Anthropic ``message``."""
    choices = completion.get("choices") or [{}]
    choice = choices[0] if isinstance(choices[0], dict) else {}
    reply = choice.get("message") or {}
    content: list[Json] = []
    text = _content_text(reply.get("content")) or str(reply.get("refusal") or "")
    if text:
        content.append({"type": "text", "text": text})
    for call in reply.get("tool_calls") or []:
        fn = call.get("function") or {}
        content.append(
            {
                "type": "tool_use",
                "id": str(call.get("id") or f"toolu_{uuid.uuid4().hex[:24]}"),
                "name": fn.get("name"),
                "input": tool_input(fn.get("arguments")),
            }
        )
    reason, sequence = _stop(choice, stop_sequences or [])
    if reply.get("refusal") and not reply.get("content"):
        reason = "refusal"
    return {
        "id": new_message_id(),
        "type": "message",
        "role": "assistant",
        "model": completion.get("model"),
        "content": content,
        "stop_reason": reason,
        "stop_sequence": sequence,
        "usage": usage_tr.openai_to_anthropic(completion.get("usage")),
    }
