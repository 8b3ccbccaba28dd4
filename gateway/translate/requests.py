"""Requests both ways: Chat Completions (OpenAI) <-> Messages (Anthropic).

``chat_to_messages`` serves an OpenAI client from an Anthropic upstream; ``messages_to_chat``
serves an Anthropic client (``/v1/messages``) from an OpenAI-compatible upstream. What would
change the answer and cannot be expressed on the other side (``n`` > 1, logprobs, ``logit_bias``,
``seed``, unsupported content or tool types) is refused with a 400 naming the parameter; sampling
hints without an equivalent (penalties, ``top_k``, ``reasoning_effort``, ``thinking``) are dropped.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from gateway.errors import InvalidRequest
from gateway.translate.responses import assistant_from_blocks

Json = dict[str, Any]

_DATA_URI = re.compile(r"^data:(?P<media>[\w.+-]+/[\w.+-]+);base64,(?P<data>.*)$", re.DOTALL)
_EMPTY_SCHEMA: Json = {"type": "object", "properties": {}}


# --- OpenAI -> Anthropic -------------------------------------------------------------------------


def _reject_unsupported(body: Json) -> None:
    n = body.get("n")
    if n is not None and n != 1:
        raise InvalidRequest("n > 1 is not supported by Anthropic models; send n=1.", param="n")
    if body.get("logprobs") or body.get("top_logprobs") is not None:
        param = "logprobs" if body.get("logprobs") else "top_logprobs"
        raise InvalidRequest("logprobs are not supported by Anthropic models.", param=param)
    if body.get("logit_bias"):
        raise InvalidRequest("logit_bias is not supported by Anthropic models.", param="logit_bias")
    if body.get("seed") is not None:
        raise InvalidRequest("seed is not supported by Anthropic models.", param="seed")


def _text_of(content: Any) -> str:
    """The text of an OpenAI ``content`` (string or array of text parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(p.get("text") or "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def image_block(url: str) -> Json:
    """An OpenAI ``image_url`` as an Anthropic ``image`` block: data URI -> base64, else url."""
    match = _DATA_URI.match(url)
    if match:
        source = {"type": "base64", "media_type": match["media"], "data": match["data"]}
    else:
        source = {"type": "url", "url": url}
    return {"type": "image", "source": source}


def _user_blocks(content: Any, where: str) -> list[Json]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    blocks: list[Json] = []
    for i, part in enumerate(content if isinstance(content, list) else []):
        if not isinstance(part, dict):
            continue
        kind = part.get("type")
        if kind == "text":
            text = str(part.get("text") or "")
            if text:  # Anthropic refuses empty text blocks
                block: Json = {"type": "text", "text": text}
                if "cache_control" in part:
                    block["cache_control"] = part["cache_control"]
                blocks.append(block)
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if not isinstance(url, str) or not url:
                raise InvalidRequest("image_url.url must be a non-empty string", param=f"{where}.content.[{i}]")
            blocks.append(image_block(url))
        else:
            raise InvalidRequest(
                f"Content parts of type {kind!r} are not supported by Anthropic models.", param=f"{where}.content.[{i}]"
            )
    return blocks


def _tool_use_blocks(calls: Any, where: str) -> list[Json]:
    blocks: list[Json] = []
    for j, call in enumerate(calls if isinstance(calls, list) else []):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict):
            continue
        raw = fn.get("arguments") or "{}"
        try:
            arguments = orjson.loads(raw) if isinstance(raw, str) else raw
        except orjson.JSONDecodeError:
            arguments = None
        if not isinstance(arguments, dict):
            raise InvalidRequest(
                "Tool call arguments must be a JSON object to be sent to an Anthropic model.",
                param=f"{where}.tool_calls.[{j}].function.arguments",
            )
        blocks.append({"type": "tool_use", "id": str(call.get("id") or ""), "name": fn.get("name"), "input": arguments})
    return blocks


def _append(out: list[Json], role: str, blocks: list[Json]) -> None:
    """Add a turn; consecutive turns of one role (e.g. several tool results) become one."""
    if out and out[-1]["role"] == role:
        out[-1]["content"].extend(blocks)
    else:
        out.append({"role": role, "content": blocks})


def _split_messages(messages: list[Any]) -> tuple[list[Json], list[Json]]:
    """(system blocks, Anthropic turns) from OpenAI messages."""
    system: list[Json] = []
    turns: list[Json] = []
    for i, message in enumerate(messages):
        where = f"messages.[{i}]"
        role = message.get("role")
        content = message.get("content")
        if role in ("system", "developer"):
            system.extend(_user_blocks(content, where))
        elif role == "user":
            _append(turns, "user", _user_blocks(content, where))
        elif role == "assistant":
            text = _text_of(content)
            blocks = [{"type": "text", "text": text}] if text else []
            blocks.extend(_tool_use_blocks(message.get("tool_calls"), where))
            _append(turns, "assistant", blocks)
        elif role in ("tool", "function"):
            tool_id = message.get("tool_call_id") or message.get("name") or ""
            result = {"type": "tool_result", "tool_use_id": str(tool_id), "content": _text_of(content)}
            _append(turns, "user", [result])
    return system, turns


def _anthropic_tools(tools: Any) -> list[Json]:
    out: list[Json] = []
    for i, tool in enumerate(tools if isinstance(tools, list) else []):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(fn, dict):
            raise InvalidRequest("Only function tools can be sent to Anthropic models.", param=f"tools.[{i}]")
        converted: Json = {"name": fn.get("name"), "input_schema": fn.get("parameters") or dict(_EMPTY_SCHEMA)}
        if fn.get("description"):
            converted["description"] = fn["description"]
        out.append(converted)
    return out


def _anthropic_tool_choice(choice: Any, parallel: Any) -> Json | None:
    result: Json | None
    if choice is None or choice == "auto":
        result = {"type": "auto"}
    elif choice == "required":
        result = {"type": "any"}
    elif choice == "none":
        return {"type": "none"}
    elif isinstance(choice, dict) and choice.get("type") == "function":
        result = {"type": "tool", "name": (choice.get("function") or {}).get("name")}
    elif isinstance(choice, dict) and choice.get("type") == "allowed_tools":
        mode = (choice.get("allowed_tools") or {}).get("mode")
        result = {"type": "any" if mode == "required" else "auto"}
    else:
        raise InvalidRequest("tool_choice is not one of none, auto, required or a function.", param="tool_choice")
    if parallel is False:
        result["disable_parallel_tool_use"] = True
    return result


def chat_to_messages(body: Json, *, default_max_tokens: int) -> Json:
    """An OpenAI Chat Completions body as an Anthropic Messages body."""
    _reject_unsupported(body)
    system, turns = _split_messages(body.get("messages") or [])
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or default_max_tokens
    out: Json = {"model": body.get("model"), "messages": turns, "max_tokens": max_tokens}
    if system:
        out["system"] = system
    tools = _anthropic_tools(body.get("tools"))
    if tools:
        out["tools"] = tools
        out["tool_choice"] = _anthropic_tool_choice(body.get("tool_choice"), body.get("parallel_tool_calls"))
    stop = body.get("stop")
    if stop:
        out["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
    temperature = body.get("temperature")
    if temperature is not None:
        out["temperature"] = min(float(temperature), 1.0)  # OpenAI allows 0-2, Anthropic 0-1
    if body.get("top_p") is not None:
        out["top_p"] = body["top_p"]
    user = body.get("user") or body.get("safety_identifier")
    if isinstance(user, str) and user:
        out["metadata"] = {"user_id": user}
    schema = _json_schema(body.get("response_format"))
    if schema is not None:
        out["output_config"] = {"format": {"type": "json_schema", "schema": schema}}
    if body.get("stream"):
        out["stream"] = True
    return out


def _json_schema(response_format: Any) -> Any:
    if isinstance(response_format, dict) and response_format.get("type") == "json_schema":
        return (response_format.get("json_schema") or {}).get("schema")
    return None


# --- Anthropic -> Anthropic ----------------------------------------------------------------------


def hoist_system_messages(body: Json) -> Json:
    """Move ``{"role": "system"}`` messages (modelled by the 2.x SDK) into the top-level ``system``.

    Upstreams expect only user and assistant turns; the blocks keep their ``cache_control``.
    """
    turns = body.get("messages") or []
    if not any(isinstance(t, dict) and t.get("role") == "system" for t in turns):
        return body
    system = body.get("system")
    blocks: list[Json] = [{"type": "text", "text": system}] if isinstance(system, str) and system else []
    if isinstance(system, list):
        blocks.extend(system)
    kept: list[Any] = []
    for turn in turns:
        if isinstance(turn, dict) and turn.get("role") == "system":
            content = turn.get("content")
            blocks.extend([{"type": "text", "text": content}] if isinstance(content, str) else content or [])
        else:
            kept.append(turn)
    return {**body, "system": blocks, "messages": kept}


# --- Anthropic -> OpenAI -------------------------------------------------------------------------


def _system_text(system: Any) -> str:
    if isinstance(system, str):
        return system
    if isinstance(system, list):
        return "\n".join(str(b.get("text") or "") for b in system if isinstance(b, dict) and b.get("type") == "text")
    return ""


def _image_url(block: Json, where: str) -> Json:
    source = block.get("source") or {}
    if source.get("type") == "base64":
        url = f"data:{source.get('media_type')};base64,{source.get('data')}"
    elif source.get("type") == "url":
        url = str(source.get("url"))
    else:
        raise InvalidRequest("Only base64 and url image sources can be translated.", param=f"{where}.source")
    return {"type": "image_url", "image_url": {"url": url}}


def _tool_result_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(b.get("text") or "") for b in content if isinstance(b, dict) and b.get("type") == "text")
    return ""


def _user_messages(content: Any, where: str) -> list[Json]:
    """One Anthropic user turn as OpenAI messages: tool results first (as ``tool``), then the rest."""
    if isinstance(content, str):
        return [{"role": "user", "content": content}]
    tool_messages: list[Json] = []
    parts: list[Json] = []
    for i, block in enumerate(content if isinstance(content, list) else []):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "tool_result":
            text = _tool_result_text(block.get("content"))
            if block.get("is_error"):
                text = f"Error: {text}"
            tool_messages.append({"role": "tool", "tool_call_id": str(block.get("tool_use_id")), "content": text})
        elif kind == "text":
            if block.get("text"):
                parts.append({"type": "text", "text": block["text"]})
        elif kind == "image":
            parts.append(_image_url(block, f"{where}.content.[{i}]"))
        elif kind in ("thinking", "redacted_thinking"):
            continue
        else:
            raise InvalidRequest(
                f"Content blocks of type {kind!r} cannot be sent to this model.", param=f"{where}.content.[{i}]"
            )
    messages = tool_messages
    if parts:
        simple = all(p["type"] == "text" for p in parts)
        messages.append({"role": "user", "content": "\n".join(p["text"] for p in parts) if simple else parts})
    return messages


def _assistant_message(content: Any) -> Json:
    if isinstance(content, str):
        return {"role": "assistant", "content": content}
    return assistant_from_blocks(content)


def _openai_tools(tools: Any) -> list[Json]:
    out: list[Json] = []
    for i, tool in enumerate(tools if isinstance(tools, list) else []):
        if not isinstance(tool, dict) or tool.get("type") not in (None, "custom"):
            kind = tool.get("type") if isinstance(tool, dict) else None
            raise InvalidRequest(f"Server tools ({kind}) are only available on Anthropic models.", param=f"tools.[{i}]")
        fn: Json = {"name": tool.get("name"), "parameters": tool.get("input_schema") or dict(_EMPTY_SCHEMA)}
        if tool.get("description"):
            fn["description"] = tool["description"]
        out.append({"type": "function", "function": fn})
    return out


def _openai_tool_choice(choice: Any) -> tuple[Any, bool | None]:
    """(tool_choice, parallel_tool_calls) from an Anthropic ``tool_choice``."""
    if not isinstance(choice, dict):
        return None, None
    kind = choice.get("type")
    mapped: Any = {"auto": "auto", "any": "required", "none": "none"}.get(str(kind))
    if kind == "tool":
        mapped = {"type": "function", "function": {"name": choice.get("name")}}
    if mapped is None:
        raise InvalidRequest("tool_choice.type must be auto, any, tool or none.", param="tool_choice")
    return mapped, (False if choice.get("disable_parallel_tool_use") else None)


def messages_to_chat(body: Json) -> Json:
    """An Anthropic Messages body as an OpenAI Chat Completions body."""
    messages: list[Json] = []
    system = _system_text(body.get("system"))
    if system:
        messages.append({"role": "system", "content": system})
    for i, turn in enumerate(body.get("messages") or []):
        role, content = turn.get("role"), turn.get("content")
        if role == "system":
            messages.append({"role": "system", "content": _system_text(content)})
        elif role == "assistant":
            messages.append(_assistant_message(content))
        else:
            messages.extend(_user_messages(content, f"messages.[{i}]"))
    out: Json = {"model": body.get("model"), "messages": messages, "max_tokens": body.get("max_tokens")}
    tools = _openai_tools(body.get("tools"))
    if tools:
        out["tools"] = tools
    choice, parallel = _openai_tool_choice(body.get("tool_choice"))
    if choice is not None and tools:
        out["tool_choice"] = choice
    if parallel is not None and tools:
        out["parallel_tool_calls"] = parallel
    for name in ("temperature", "top_p"):
        if body.get(name) is not None:
            out[name] = body[name]
    if body.get("stop_sequences"):
        out["stop"] = list(body["stop_sequences"])
    user = (body.get("metadata") or {}).get("user_id")
    if isinstance(user, str) and user:
        out["user"] = user
    schema = ((body.get("output_config") or {}).get("format") or {}).get("schema")
    if schema is not None:
        out["response_format"] = {"type": "json_schema", "json_schema": {"name": "output", "schema": schema}}
    if body.get("stream"):
        out["stream"] = True
    return out
