"""The OpenAI Responses API <-> Chat Completions: requests, answers, usage and streams.

Upstreams that do not serve ``/v1/responses`` (Anthropic through its chat face, Ollama, the mock,
OpenAI-compatible servers without it) are asked in Chat Completions; this module builds that
request from a Responses request and turns the answer (or the chunk stream) back into a
``response`` object (or the typed event sequence the SDKs parse). PROTOCOLS.md section 1.8.

- ``to_chat``              Responses request -> Chat Completions request
- ``from_chat_completion`` ``chat.completion`` -> ``response``
- ``EventsFromChunks``     ``chat.completion.chunk`` stream -> ``response.*`` events
- ``explode``              a complete ``response`` -> the events that stream it (cache replays)
- ``usage_from_chat`` / ``ledger_usage``  the two usage shapes, and the ledger's ``Usage``
"""

from __future__ import annotations

import os
import time
from typing import Any

from core.money import Usage
from gateway.errors import InvalidRequest
from gateway.translate.streams import ESTIMATED_MARK  # an answer whose usage was counted offline

Json = dict[str, Any]

__all__ = [
    "ESTIMATED_MARK",
    "EventsFromChunks",
    "assemble",
    "complete_stream",
    "explode",
    "from_chat_completion",
    "input_items",
    "ledger_usage",
    "new_id",
    "output_text",
    "response_object",
    "to_chat",
    "usage_from_chat",
]

_MESSAGE_ROLES = frozenset({"user", "assistant", "system", "developer"})
_TEXT_PARTS = frozenset({"input_text", "output_text", "text"})


def new_id(prefix: str) -> str:
    return f"{prefix}_{os.urandom(16).hex()}"


def _int(value: Any) -> int:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0


# --- requests ----------------------------------------------------------------------------------------


def input_items(value: Any) -> list[Json]:
    """The request's ``input`` as a list of items (a string is one user message)."""
    if isinstance(value, str):
        return [{"type": "message", "role": "user", "content": value}]
    return [dict(item) for item in value] if isinstance(value, list) else []


def item_type(item: Json) -> str:
    """An item's type; an "easy" input message (``{"role", "content"}``) has none and is a message."""
    kind = item.get("type")
    return str(kind) if isinstance(kind, str) else "message" if "role" in item else ""


def _part_text(part: Any) -> str | None:
    if isinstance(part, str):
        return part
    if isinstance(part, dict):
        if part.get("type") in _TEXT_PARTS:
            return str(part.get("text") or "")
        if part.get("type") == "refusal":
            return str(part.get("refusal") or "")
    return None


def content_text(content: Any) -> str:
    """The text of a message's content (string or parts); other parts count as nothing."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(t for t in (_part_text(p) for p in content) if t is not None)
    return ""


def _user_content(content: Any, where: str) -> Any:
    """A user message's content as Chat Completions content (text and images)."""
    if isinstance(content, str):
        return content
    parts: list[Json] = []
    for i, part in enumerate(content if isinstance(content, list) else ()):
        text = _part_text(part)
        if text is not None:
            parts.append({"type": "text", "text": text})
        elif isinstance(part, dict) and part.get("type") == "input_image" and isinstance(part.get("image_url"), str):
            image: Json = {"url": part["image_url"]}
            if part.get("detail") in ("low", "high", "auto"):
                image["detail"] = part["detail"]
            parts.append({"type": "image_url", "image_url": image})
        else:
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise InvalidRequest(
                f"{where}.content.{i}: content of type '{kind}' is not supported by this model "
                "(it is served through the Chat Completions translation: text and image URLs only)",
                param=f"{where}.content",
            )
    return parts


def _chat_messages(items: list[Json]) -> list[Json]:
    messages: list[Json] = []
    for i, item in enumerate(items):
        where = f"input.{i}"
        kind = item_type(item)
        if kind == "message":
            role = item.get("role")
            content = item.get("content")
            if role in ("system", "developer"):
                messages.append({"role": "system", "content": content_text(content)})
            elif role == "assistant":
                messages.append({"role": "assistant", "content": content_text(content)})
            else:
                messages.append({"role": "user", "content": _user_content(content, where)})
        elif kind == "function_call":
            call = {
                "id": str(item.get("call_id") or ""),
                "type": "function",
                "function": {"name": str(item.get("name") or ""), "arguments": str(item.get("arguments") or "")},
            }
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)  # parallel calls: one assistant turn
                if last.get("content") == "":
                    last["content"] = None
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            text = output if isinstance(output, str) else content_text(output) if isinstance(output, list) else ""
            messages.append({"role": "tool", "tool_call_id": str(item.get("call_id") or ""), "content": text})
        elif kind == "reasoning":
            continue  # a model's own reasoning: no Chat Completions equivalent, dropped
        else:
            raise InvalidRequest(
                f"{where}.type: items of type '{kind}' are not supported by this model "
                "(served through the Chat Completions translation)",
                param=f"{where}.type",
            )
    return messages


def _chat_tools(tools: Any) -> list[Json]:
    out: list[Json] = []
    for i, tool in enumerate(tools if isinstance(tools, list) else ()):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else None
            raise InvalidRequest(
                f"tools.{i}.type: '{kind}' tools are not supported by this model (served through the Chat "
                "Completions translation: function tools only)",
                param=f"tools.{i}.type",
            )
        function: Json = {"name": tool.get("name"), "parameters": tool.get("parameters") or {"type": "object"}}
        if tool.get("description"):
            function["description"] = tool["description"]
        if tool.get("strict") is not None:
            function["strict"] = tool["strict"]
        out.append({"type": "function", "function": function})
    return out


def _chat_tool_choice(choice: Any) -> Any:
    if isinstance(choice, dict) and choice.get("type") == "function":
        return {"type": "function", "function": {"name": choice.get("name")}}
    return choice


def _response_format(text: Any) -> Json | None:
    fmt = text.get("format") if isinstance(text, dict) else None
    if not isinstance(fmt, dict) or fmt.get("type") in (None, "text"):
        return None
    if fmt.get("type") == "json_schema":
        schema: Json = {"name": fmt.get("name") or "response", "schema": fmt.get("schema") or {}}
        for key in ("description", "strict"):
            if fmt.get(key) is not None:
                schema[key] = fmt[key]
        return {"type": "json_schema", "json_schema": schema}
    return {"type": str(fmt.get("type"))}


def to_chat(body: Json) -> Json:
    """A Chat Completions request asking what the Responses request asks (its ``input`` already
    holds any earlier turns of the conversation)."""
    messages: list[Json] = []
    if isinstance(body.get("instructions"), str) and body["instructions"]:
        messages.append({"role": "system", "content": body["instructions"]})
    messages.extend(_chat_messages(input_items(body.get("input"))))
    chat: Json = {"model": body.get("model"), "messages": messages}
    if body.get("max_output_tokens") is not None:
        chat["max_tokens"] = body["max_output_tokens"]
    for key in ("temperature", "top_p", "parallel_tool_calls", "user", "safety_identifier", "seed"):
        if body.get(key) is not None:
            chat[key] = body[key]
    if body.get("tools"):
        chat["tools"] = _chat_tools(body["tools"])
        if body.get("tool_choice") is not None:
            chat["tool_choice"] = _chat_tool_choice(body["tool_choice"])
    fmt = _response_format(body.get("text"))
    if fmt is not None:
        chat["response_format"] = fmt
    reasoning = body.get("reasoning")
    if isinstance(reasoning, dict) and isinstance(reasoning.get("effort"), str):
        chat["reasoning_effort"] = reasoning["effort"]  # to the models that take it; translations drop it
    return chat


def flat_messages(body: Json) -> list[Json]:
    """The request as plain ``{"role", "content"}`` text messages, for counting tokens offline."""
    flat: list[Json] = []
    if isinstance(body.get("instructions"), str):
        flat.append({"role": "system", "content": body["instructions"]})
    for item in input_items(body.get("input")):
        kind = item_type(item)
        if kind == "message":
            flat.append({"role": str(item.get("role") or "user"), "content": content_text(item.get("content"))})
        elif kind == "function_call":
            flat.append({"role": "assistant", "content": f"{item.get('name') or ''}{item.get('arguments') or ''}"})
        elif kind == "function_call_output":
            output = item.get("output")
            flat.append({"role": "tool", "content": output if isinstance(output, str) else content_text(output)})
    return flat


# --- answers -----------------------------------------------------------------------------------------


def usage_from_chat(usage: Any) -> Json:
    """A Chat Completions ``usage`` object in the Responses shape."""
    usage = usage if isinstance(usage, dict) else {}
    prompt, completion = _int(usage.get("prompt_tokens")), _int(usage.get("completion_tokens"))
    prompt_details = usage.get("prompt_tokens_details") or {}
    completion_details = usage.get("completion_tokens_details") or {}
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": _int(prompt_details.get("cached_tokens"))},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": _int(completion_details.get("reasoning_tokens"))},
        "total_tokens": prompt + completion,
    }


def ledger_usage(usage: Any) -> Usage | None:
    """The ledger's ``Usage`` from a Responses ``usage`` object (``input_tokens`` includes cached)."""
    if not isinstance(usage, dict) or "input_tokens" not in usage:
        return None
    input_details = usage.get("input_tokens_details") or {}
    output_details = usage.get("output_tokens_details") or {}
    return Usage(
        prompt_tokens=_int(usage.get("input_tokens")),
        cached_tokens=_int(input_details.get("cached_tokens")),
        cache_write_tokens=_int(input_details.get("cache_write_tokens")),
        completion_tokens=_int(usage.get("output_tokens")),
        reasoning_tokens=_int(output_details.get("reasoning_tokens")),
    )


def response_object(request: Json, **fields: Any) -> Json:
    """A ``response`` echoing the request's settings; ``fields`` (id, status, output, usage ...) win."""
    reasoning: Json = request["reasoning"] if isinstance(request.get("reasoning"), dict) else {}
    text = request.get("text") if isinstance(request.get("text"), dict) else {"format": {"type": "text"}}
    response: Json = {
        "id": "",
        "object": "response",
        "created_at": int(time.time()),
        "status": "completed",
        "background": False,
        "error": None,
        "incomplete_details": None,
        "instructions": request.get("instructions"),
        "max_output_tokens": request.get("max_output_tokens"),
        "model": request.get("model"),
        "output": [],
        "parallel_tool_calls": request.get("parallel_tool_calls", True),
        "previous_response_id": request.get("previous_response_id"),
        "reasoning": {"effort": reasoning.get("effort"), "summary": reasoning.get("summary")},
        "service_tier": "default",
        "store": request.get("store", True),
        "temperature": request.get("temperature", 1.0),
        "text": text,
        "tool_choice": request.get("tool_choice", "auto"),
        "tools": request.get("tools") or [],
        "top_p": request.get("top_p", 1.0),
        "truncation": request.get("truncation", "disabled"),
        "usage": None,
        "user": request.get("user"),
        "metadata": request.get("metadata") or {},
    }
    response.update(fields)
    return response


def _text_part(text: str) -> Json:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _message_item(item_id: str, text: str, *, status: str = "completed", refusal: str | None = None) -> Json:
    content = [_text_part(text)] if refusal is None else [{"type": "refusal", "refusal": refusal}]
    return {"id": item_id, "type": "message", "status": status, "role": "assistant", "content": content}


def _call_item(item_id: str, call_id: str, name: str, arguments: str, *, status: str = "completed") -> Json:
    return {
        "id": item_id,
        "type": "function_call",
        "status": status,
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
    }


def _ending(finish_reason: Any) -> tuple[str, Json | None]:
    """A chat ``finish_reason`` as a response's ``status`` and ``incomplete_details``."""
    if finish_reason == "length":
        return "incomplete", {"reason": "max_output_tokens"}
    if finish_reason == "content_filter":
        return "incomplete", {"reason": "content_filter"}
    return "completed", None


def from_chat_completion(completion: Json, request: Json) -> Json:
    """A ``chat.completion`` as the ``response`` the Responses request asked for."""
    choices = completion.get("choices") or [{}]
    choice = choices[0] if isinstance(choices[0], dict) else {}
    message: Json = choice["message"] if isinstance(choice.get("message"), dict) else {}
    output: list[Json] = []
    if isinstance(message.get("refusal"), str) and message["refusal"]:
        output.append(_message_item(new_id("msg"), "", refusal=message["refusal"]))
    elif isinstance(message.get("content"), str) and message["content"]:
        output.append(_message_item(new_id("msg"), message["content"]))
    for call in message.get("tool_calls") or ():
        function = call.get("function") or {}
        output.append(
            _call_item(
                new_id("fc"),
                str(call.get("id") or ""),
                str(function.get("name") or ""),
                str(function.get("arguments") or ""),
            )
        )
    status, incomplete = _ending(choice.get("finish_reason"))
    return response_object(
        request,
        id=new_id("resp"),
        created_at=_int(completion.get("created")) or int(time.time()),
        model=completion.get("model") or request.get("model"),
        status=status,
        incomplete_details=incomplete,
        output=output,
        usage=usage_from_chat(completion.get("usage")),
    )


def output_text(response: Json) -> str:
    """Every output text (and function call) of a response, concatenated: for estimates."""
    parts: list[str] = []
    for item in response.get("output") or ():
        if not isinstance(item, dict):
            continue
        if item.get("type") == "message":
            parts.append(content_text(item.get("content")))
        elif item.get("type") == "function_call":
            parts.append(str(item.get("name") or "") + str(item.get("arguments") or ""))
    return "".join(parts)


# --- streams -----------------------------------------------------------------------------------------


class EventsFromChunks:
    """Turns a ``chat.completion.chunk`` stream into the Responses event sequence.

    ``start`` gives ``response.created`` and ``response.in_progress``; ``feed`` one chunk's
    events (an output item is opened at its first delta and closed when the next one opens);
    ``finish`` closes what is open and ends with ``response.completed`` (or
    ``response.incomplete``) carrying the usage. ``sequence_number`` is the wire format's to set.
    """

    def __init__(self, request: Json) -> None:
        self.request = request
        self.response = response_object(request, id=new_id("resp"), status="in_progress")
        self.output: list[Json] = []
        self.open: Json | None = None  # the output item being streamed
        self.calls: dict[int, Json] = {}  # chat tool-call index -> its function_call item
        self.finish_reason: Any = None
        self.usage: Json | None = None
        self.text: list[str] = []

    def start(self) -> list[Json]:
        snapshot = {**self.response, "output": []}
        return [
            {"type": "response.created", "response": snapshot},
            {"type": "response.in_progress", "response": snapshot},
        ]

    def _close(self) -> list[Json]:
        item, self.open = self.open, None
        if item is None:
            return []
        index = self.output.index(item)
        item["status"] = "completed"
        if item["type"] == "message":
            part = item["content"][0]
            return [
                {
                    "type": "response.output_text.done",
                    "item_id": item["id"],
                    "output_index": index,
                    "content_index": 0,
                    "text": part["text"],
                    "logprobs": [],
                },
                {
                    "type": "response.content_part.done",
                    "item_id": item["id"],
                    "output_index": index,
                    "content_index": 0,
                    "part": part,
                },
                {"type": "response.output_item.done", "output_index": index, "item": item},
            ]
        return [
            {
                "type": "response.function_call_arguments.done",
                "item_id": item["id"],
                "output_index": index,
                "name": item["name"],
                "arguments": item["arguments"],
            },
            {"type": "response.output_item.done", "output_index": index, "item": item},
        ]

    def _open(self, item: Json) -> list[Json]:
        events = self._close()
        self.open = item
        self.output.append(item)
        index = len(self.output) - 1
        added = {**item, "content": []} if item["type"] == "message" else {**item}
        events.append({"type": "response.output_item.added", "output_index": index, "item": added})
        if item["type"] == "message":
            events.append(
                {
                    "type": "response.content_part.added",
                    "item_id": item["id"],
                    "output_index": index,
                    "content_index": 0,
                    "part": _text_part(""),
                }
            )
        return events

    def feed(self, chunk: Json) -> list[Json]:
        events: list[Json] = []
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or ():
            if not isinstance(choice, dict) or int(choice.get("index") or 0) != 0:
                continue
            delta = choice.get("delta") or {}
            text = delta.get("content")
            if isinstance(text, str) and text:
                if self.open is None or self.open["type"] != "message":
                    events.extend(self._open(_message_item(new_id("msg"), "", status="in_progress")))
                item = self.open
                assert item is not None
                item["content"][0]["text"] += text
                self.text.append(text)
                events.append(
                    {
                        "type": "response.output_text.delta",
                        "item_id": item["id"],
                        "output_index": self.output.index(item),
                        "content_index": 0,
                        "delta": text,
                        "logprobs": [],
                    }
                )
            for fragment in delta.get("tool_calls") or ():
                events.extend(self._tool_fragment(fragment))
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
        return events

    def _tool_fragment(self, fragment: Json) -> list[Json]:
        events: list[Json] = []
        index = int(fragment.get("index") or 0)
        function = fragment.get("function") or {}
        item = self.calls.get(index)
        if item is None:
            item = _call_item(
                new_id("fc"), str(fragment.get("id") or ""), str(function.get("name") or ""), "", status="in_progress"
            )
            self.calls[index] = item
            events.extend(self._open(item))
        arguments = str(function.get("arguments") or "")
        if arguments:
            item["arguments"] += arguments
            self.text.append(arguments)
            events.append(
                {
                    "type": "response.function_call_arguments.delta",
                    "item_id": item["id"],
                    "output_index": self.output.index(item),
                    "delta": arguments,
                }
            )
        return events

    def finish(self, fallback_usage: Json | None = None) -> list[Json]:
        """The closing events; ``fallback_usage`` (chat shape) when the upstream reported none."""
        events = self._close()
        status, incomplete = _ending(self.finish_reason)
        usage = self.usage if self.usage is not None else fallback_usage
        final = {
            **self.response,
            "status": status,
            "incomplete_details": incomplete,
            "output": self.output,
            "usage": usage_from_chat(usage),
        }
        events.append({"type": f"response.{status}", "response": final})
        return events


def explode(response: Json) -> list[Json]:
    """The events that stream a complete ``response`` (a cached answer replayed as a stream)."""
    opening = {**response, "status": "in_progress", "output": [], "usage": None}
    events: list[Json] = [
        {"type": "response.created", "response": opening},
        {"type": "response.in_progress", "response": opening},
    ]
    for index, item in enumerate(response.get("output") or ()):
        kind = item.get("type")
        if kind == "message":
            events.append(
                {"type": "response.output_item.added", "output_index": index, "item": {**item, "content": []}}
            )
            for c, part in enumerate(item.get("content") or ()):
                base = {"item_id": item.get("id"), "output_index": index, "content_index": c}
                empty = {**part, "text": ""} if part.get("type") == "output_text" else part
                events.append({"type": "response.content_part.added", **base, "part": empty})
                if part.get("type") == "output_text":
                    text = str(part.get("text") or "")
                    events.append({"type": "response.output_text.delta", **base, "delta": text, "logprobs": []})
                    events.append({"type": "response.output_text.done", **base, "text": text, "logprobs": []})
                events.append({"type": "response.content_part.done", **base, "part": part})
        elif kind == "function_call":
            events.append(
                {"type": "response.output_item.added", "output_index": index, "item": {**item, "arguments": ""}}
            )
            base = {"item_id": item.get("id"), "output_index": index}
            arguments = str(item.get("arguments") or "")
            events.append({"type": "response.function_call_arguments.delta", **base, "delta": arguments})
            events.append(
                {
                    "type": "response.function_call_arguments.done",
                    **base,
                    "name": item.get("name"),
                    "arguments": arguments,
                }
            )
        else:
            events.append({"type": "response.output_item.added", "output_index": index, "item": item})
        events.append({"type": "response.output_item.done", "output_index": index, "item": item})
    status = response.get("status") if response.get("status") in ("completed", "incomplete") else "completed"
    events.append({"type": f"response.{status}", "response": response})
    return events


def assemble(items: list[Json]) -> Json:
    """The complete ``response`` a relayed event stream ended with (its terminal event's)."""
    for event in reversed(items):
        if event.get("type") in ("response.completed", "response.incomplete") and isinstance(
            event.get("response"), dict
        ):
            return dict(event["response"])
    return {}


def complete_stream(items: list[Json]) -> bool:
    kinds = {str(item.get("type") or "") for item in items}
    return bool(kinds & {"response.completed", "response.incomplete"}) and not kinds & {"error", "response.failed"}
