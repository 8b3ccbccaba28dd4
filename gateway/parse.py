"""Stage 1, parse: the body as JSON, checked just enough to route and bill it.

Unknown fields are kept untouched so OpenAI-compatible upstreams see exactly what the client sent.
"""

from __future__ import annotations

from typing import Any

import orjson

from gateway.errors import InvalidRequest

_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})


def json_object(body: bytes) -> dict[str, Any]:
    if not body.strip():
        raise InvalidRequest("The request body is empty; send a JSON object.", code="invalid_json")
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(
            f"We could not parse the JSON body of your request: {exc.msg} at position {exc.pos}.",
            code="invalid_json",
        ) from None
    if not isinstance(data, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_json")
    return data


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def model_name(data: dict[str, Any]) -> str:
    model = data.get("model")
    if not isinstance(model, str) or not model.strip():
        raise InvalidRequest("you must provide a model parameter", param="model", code="missing_model")
    if len(model) > 256:
        raise InvalidRequest("model must be at most 256 characters", param="model")
    return model


def stream_flags(data: dict[str, Any]) -> tuple[bool, bool]:
    """(stream, client asked for the usage chunk)."""
    stream = data.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise InvalidRequest("stream must be a boolean", param="stream")
    options = data.get("stream_options")
    if options is not None:
        if not stream:
            raise InvalidRequest(
                "The 'stream_options' parameter is only allowed when 'stream' is enabled.", param="stream_options"
            )
        if not isinstance(options, dict):
            raise InvalidRequest("stream_options must be an object", param="stream_options")
    wants_usage = bool(stream and options and options.get("include_usage") is True)
    return stream, wants_usage


def _positive_int(data: dict[str, Any], name: str, *, maximum: int | None = None, minimum: int = 1) -> None:
    value = data.get(name)
    if value is None:
        return
    if not _is_int(value) or value < minimum or (maximum is not None and value > maximum):
        bound = f" and at most {maximum}" if maximum is not None else ""
        raise InvalidRequest(f"{name} must be an integer of at least {minimum}{bound}", param=name)


def _number_in(data: dict[str, Any], name: str, low: float, high: float) -> None:
    value = data.get(name)
    if value is None:
        return
    if not _is_number(value) or not low <= value <= high:
        raise InvalidRequest(f"{name} must be a number between {low:g} and {high:g}", param=name)


def _common_sampling(data: dict[str, Any]) -> None:
    _positive_int(data, "n", maximum=128)
    _positive_int(data, "max_tokens")
    _positive_int(data, "max_completion_tokens")
    _number_in(data, "temperature", 0, 2)
    _number_in(data, "top_p", 0, 1)
    _number_in(data, "frequency_penalty", -2, 2)
    _number_in(data, "presence_penalty", -2, 2)
    stop = data.get("stop")
    if stop is not None and not isinstance(stop, str):
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise InvalidRequest("stop must be a string or a list of strings", param="stop")


def chat(data: dict[str, Any]) -> None:
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages must be a non-empty array", param="messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidRequest(f"messages[{i}] must be an object", param=f"messages.[{i}]")
        role = message.get("role")
        if role not in _ROLES:
            raise InvalidRequest(
                f"messages[{i}].role must be one of {', '.join(sorted(_ROLES))}", param=f"messages.[{i}].role"
            )
        content = message.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise InvalidRequest(
                f"messages[{i}].content must be a string or an array of parts", param=f"messages.[{i}].content"
            )
    tools = data.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise InvalidRequest("tools must be an array", param="tools")
    response_format = data.get("response_format")
    if response_format is not None and not isinstance(response_format, dict):
        raise InvalidRequest("response_format must be an object", param="response_format")
    _common_sampling(data)


def completions(data: dict[str, Any]) -> None:
    prompt = data.get("prompt")
    if prompt is None or not isinstance(prompt, (str, list)):
        raise InvalidRequest("prompt must be a string, an array of strings or an array of tokens", param="prompt")
    _common_sampling(data)


def embeddings(data: dict[str, Any]) -> None:
    value = data.get("input")
    if isinstance(value, str):
        ok = True
    elif isinstance(value, list) and value:
        ok = (
            all(isinstance(v, str) for v in value)
            or all(_is_int(v) for v in value)
            or all(isinstance(v, list) and v and all(_is_int(t) for t in v) for v in value)
        )
    else:
        ok = False
    if not ok:
        raise InvalidRequest(
            "input must be a string, an array of strings, or an array of token arrays, and not empty", param="input"
        )
    fmt = data.get("encoding_format")
    if fmt is not None and fmt not in ("float", "base64"):
        raise InvalidRequest("encoding_format must be 'float' or 'base64'", param="encoding_format")
    _positive_int(data, "dimensions")
