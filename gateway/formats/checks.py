"""Request bodies in the OpenAI wire format, checked just enough to route and bill them.

Unknown fields are kept untouched so OpenAI-compatible upstreams see exactly what the client sent.
"""

from __future__ import annotations

from typing import Any

import orjson

from gateway.errors import InvalidRequest

#: Larger than any model's output limit; keeps integers within what every upstream parses.
_MAX_TOKENS = 2**31 - 1
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
    if not model.isprintable():
        # Control characters (CR/LF above all) would end up in logs and response headers.
        raise InvalidRequest("model must not contain control characters", param="model")
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
    _positive_int(data, "max_tokens", maximum=_MAX_TOKENS)
    _positive_int(data, "max_completion_tokens", maximum=_MAX_TOKENS)
    _typed(data, "seed", _is_int, "an integer")
    _typed(data, "user", lambda v: isinstance(v, str), "a string")
    _number_in(data, "temperature", 0, 2)
    _number_in(data, "top_p", 0, 1)
    _number_in(data, "frequency_penalty", -2, 2)
    _number_in(data, "presence_penalty", -2, 2)
    stop = data.get("stop")
    if stop is not None and not isinstance(stop, str):
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise InvalidRequest("stop must be a string or a list of strings", param="stop")


def _content_parts(content: list[Any], where: str) -> None:
    for j, part in enumerate(content):
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise InvalidRequest(f"{where}[{j}] must be an object with a string 'type'", param=f"{where}.[{j}]")
        if part["type"] == "text" and not isinstance(part.get("text"), str):
            raise InvalidRequest(f"{where}[{j}].text must be a string", param=f"{where}.[{j}].text")


def _tool_calls(calls: Any, where: str) -> None:
    if calls is None:
        return
    if not isinstance(calls, list):
        raise InvalidRequest(f"{where} must be an array", param=where)
    for j, call in enumerate(calls):
        fn = call.get("function", {}) if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name", ""), str):
            raise InvalidRequest(f"{where}[{j}] must be an object with a 'function' object", param=f"{where}.[{j}]")


def _tools(data: dict[str, Any]) -> None:
    tools = data.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise InvalidRequest("tools must be an array", param="tools")
        for j, tool in enumerate(tools):
            if not isinstance(tool, dict) or not isinstance(tool.get("type", "function"), str):
                raise InvalidRequest(f"tools[{j}] must be an object with a string 'type'", param=f"tools.[{j}]")
            if tool.get("type", "function") != "function":
                continue
            fn = tool.get("function")
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
                raise InvalidRequest(
                    f"tools[{j}].function must be an object with a name", param=f"tools.[{j}].function"
                )
            parameters = fn.get("parameters")
            if parameters is not None and not isinstance(parameters, dict):
                raise InvalidRequest(
                    f"tools[{j}].function.parameters must be a JSON Schema object",
                    param=f"tools.[{j}].function.parameters",
                )
    choice = data.get("tool_choice")
    if choice is not None:
        fn = choice.get("function") if isinstance(choice, dict) else None
        if not (
            choice in ("none", "auto", "required")
            or (
                isinstance(choice, dict)
                and isinstance(choice.get("type"), str)
                and (fn is None or isinstance(fn, dict))
            )
        ):
            raise InvalidRequest(
                "tool_choice must be 'none', 'auto', 'required' or an object naming a tool", param="tool_choice"
            )


def _typed(data: dict[str, Any], name: str, check: Any, what: str) -> None:
    value = data.get(name)
    if value is not None and not check(value):
        raise InvalidRequest(f"{name} must be {what}", param=name)


def chat(data: dict[str, Any]) -> None:
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages must be a non-empty array", param="messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidRequest(f"messages[{i}] must be an object", param=f"messages.[{i}]")
        role = message.get("role")
        if not isinstance(role, str) or role not in _ROLES:
            raise InvalidRequest(
                f"messages[{i}].role must be one of {', '.join(sorted(_ROLES))}", param=f"messages.[{i}].role"
            )
        content = message.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise InvalidRequest(
                f"messages[{i}].content must be a string or an array of parts", param=f"messages.[{i}].content"
            )
        if isinstance(content, list):
            _content_parts(content, f"messages[{i}].content")
        _tool_calls(message.get("tool_calls"), f"messages[{i}].tool_calls")
    _tools(data)
    response_format = data.get("response_format")
    if response_format is not None and not isinstance(response_format, dict):
        raise InvalidRequest("response_format must be an object", param="response_format")
    _typed(data, "logprobs", lambda v: isinstance(v, bool), "a boolean")
    _typed(data, "parallel_tool_calls", lambda v: isinstance(v, bool), "a boolean")
    _positive_int(data, "top_logprobs", minimum=0, maximum=20)
    _typed(data, "metadata", lambda v: isinstance(v, dict), "an object")
    _common_sampling(data)


def completions(data: dict[str, Any]) -> None:
    prompt = data.get("prompt")
    if isinstance(prompt, list):
        ok = bool(prompt) and (
            all(isinstance(p, str) for p in prompt)
            or all(_is_int(p) for p in prompt)
            or all(isinstance(p, list) and all(_is_int(t) for t in p) for p in prompt)
        )
    else:
        ok = isinstance(prompt, str)
    if not ok:
        raise InvalidRequest(
            "prompt must be a string, an array of strings, an array of tokens or an array of token arrays",
            param="prompt",
        )
    _positive_int(data, "logprobs", minimum=0, maximum=5)
    _positive_int(data, "best_of", maximum=128)
    _typed(data, "echo", lambda v: isinstance(v, bool), "a boolean")
    _typed(data, "suffix", lambda v: isinstance(v, str), "a string")
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
