"""Ollama's native API: ``/api/chat`` (NDJSON streaming), ``/api/generate`` and ``/api/embed``.

The gateway speaks OpenAI internally, so this adapter translates both ways:

- request: messages (system/developer -> ``system``; image parts -> ``images`` as base64; assistant
  tool calls with JSON-string arguments -> object arguments; tool results -> ``tool_name``),
  sampling parameters -> ``options`` (``max_tokens``/``max_completion_tokens`` -> ``num_predict``,
  ``temperature``, ``top_p``, ``seed``, ``stop``, penalties, and Ollama's own ``top_k``,
  ``min_p``, ``num_ctx``, ``repeat_penalty``), ``response_format`` -> ``format``;
- response: ``message`` -> ``choices[0].message`` (tool-call arguments back to JSON strings),
  ``done_reason`` -> ``finish_reason``, ``prompt_eval_count``/``eval_count`` -> ``usage``;
- stream: one JSON object per line, no ``[DONE]``; the final line (``done: true``) carries the
  counts and becomes the finish chunk plus the usage chunk;
- errors: ``{"error": "..."}`` (a string), on an HTTP error status or as a line mid-stream;
- legacy ``/v1/completions`` go to ``/api/generate`` (one text prompt, ``suffix`` kept).

Ollama's OpenAI-compatible ``/v1`` is served by the ``openai`` kind instead; use this one for what
only the native API offers (``num_ctx``, ``keep_alive``, ``think``).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import orjson

from core.money import Usage
from gateway import tokens
from gateway.errors import InvalidRequest, UpstreamError
from gateway.providers.base import Provider, UpstreamCall, post_json, streamed_post

#: OpenAI request fields that become Ollama ``options`` under the same name.
_SAME_NAME_OPTIONS = (
    "temperature",
    "top_p",
    "seed",
    "stop",
    "frequency_penalty",
    "presence_penalty",
    # Ollama's own sampling knobs, accepted at the top level as vLLM-style extensions.
    "top_k",
    "min_p",
    "num_ctx",
    "repeat_penalty",
    "repeat_last_n",
    "typical_p",
)
_FINISH = {"stop": "stop", "length": "length", "load": "stop", "unload": "stop"}


def _obj(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _image(part: dict[str, Any], where: str) -> str:
    image = part.get("image_url")
    url = image.get("url") if isinstance(image, dict) else image
    if not isinstance(url, str) or not url.startswith("data:") or "," not in url:
        raise InvalidRequest("Ollama accepts images only as base64 data URIs (data:image/png;base64,...).", param=where)
    return url.split(",", 1)[1]


def _content(content: Any, where: str) -> tuple[str, list[str]]:
    """OpenAI content (string or parts) -> Ollama text and base64 images."""
    if content is None:
        return "", []
    if isinstance(content, str):
        return content, []
    texts: list[str] = []
    images: list[str] = []
    for part in content if isinstance(content, list) else ():
        if not isinstance(part, dict):
            continue
        kind = part.get("type")
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            images.append(_image(part, where))
        else:
            raise InvalidRequest(f"Ollama does not accept content parts of type {kind!r}.", param=where)
    return "\n".join(texts), images


def _arguments(raw: Any, where: str) -> Any:
    if not isinstance(raw, str):
        return raw if raw is not None else {}
    if not raw.strip():
        return {}
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidRequest("Tool call arguments must be valid JSON for Ollama.", param=where) from None


def to_ollama_messages(messages: list[Any]) -> list[dict[str, Any]]:
    names_by_call_id: dict[str, str] = {}
    out: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            continue
        role = message.get("role")
        where = f"messages.[{i}]"
        text, images = _content(message.get("content"), f"{where}.content")
        item: dict[str, Any] = {"role": "system" if role == "developer" else role, "content": text}
        if images:
            item["images"] = images
        calls = []
        for call in message.get("tool_calls") or ():
            if not isinstance(call, dict):
                continue
            fn = _obj(call.get("function"))
            name = str(fn.get("name") or "")
            if isinstance(call.get("id"), str):
                names_by_call_id[call["id"]] = name
            calls.append({"function": {"name": name, "arguments": _arguments(fn.get("arguments"), where)}})
        if calls:
            item["tool_calls"] = calls
        if role == "tool":
            tool_name = names_by_call_id.get(str(message.get("tool_call_id")))
            if tool_name:
                item["tool_name"] = tool_name
        elif role == "function" and isinstance(message.get("name"), str):
            item["role"] = "tool"
            item["tool_name"] = message["name"]
        out.append(item)
    return out


def to_ollama_chat(body: dict[str, Any], model: str, *, stream: bool) -> dict[str, Any]:
    """An OpenAI chat body -> an ``/api/chat`` body."""
    options: dict[str, Any] = dict(body["options"]) if isinstance(body.get("options"), dict) else {}
    for name in _SAME_NAME_OPTIONS:
        if body.get(name) is not None:
            options[name] = body[name]
    if isinstance(options.get("stop"), str):
        options["stop"] = [options["stop"]]
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    if limit is not None:
        options["num_predict"] = limit
    out: dict[str, Any] = {
        "model": model,
        "messages": to_ollama_messages(body.get("messages") or []),
        "stream": stream,
    }
    if options:
        out["options"] = options
    tools = body.get("tools")
    if tools and body.get("tool_choice") != "none":
        out["tools"] = [t for t in tools if isinstance(t, dict) and t.get("type", "function") == "function"]
    fmt = body.get("response_format")
    if isinstance(fmt, dict):
        if fmt.get("type") == "json_object":
            out["format"] = "json"
        elif fmt.get("type") == "json_schema":
            schema = (fmt.get("json_schema") or {}).get("schema")
            out["format"] = schema if isinstance(schema, dict) else "json"
    for name in ("keep_alive", "think"):
        if name in body:
            out[name] = body[name]
    if "think" not in out and body.get("reasoning_effort") in ("low", "medium", "high"):
        out["think"] = body["reasoning_effort"]
    return out


def _openai_tool_calls(message: dict[str, Any]) -> list[dict[str, Any]]:
    calls = []
    for position, call in enumerate(message.get("tool_calls") or ()):
        if not isinstance(call, dict):
            continue
        fn = _obj(call.get("function"))
        args = fn.get("arguments")
        calls.append(
            {
                "index": fn.get("index", position) if isinstance(fn.get("index"), int) else position,
                "id": call["id"] if isinstance(call.get("id"), str) else f"call_{uuid.uuid4().hex[:24]}",
                "type": "function",
                "function": {
                    "name": str(fn.get("name") or ""),
                    "arguments": args if isinstance(args, str) else orjson.dumps(args or {}).decode(),
                },
            }
        )
    return calls


def _usage(data: dict[str, Any], body: dict[str, Any], model: str) -> dict[str, Any]:
    prompt = data.get("prompt_eval_count")
    if not isinstance(prompt, int):
        # Ollama leaves prompt_eval_count out when the whole prompt came from its cache.
        prompt = tokens.count_messages(body.get("messages") or [], model, body.get("tools"))
    completion = data.get("eval_count")
    completion = completion if isinstance(completion, int) else 0
    return Usage(prompt_tokens=prompt, completion_tokens=completion).to_openai()


def _finish(data: dict[str, Any], had_tool_calls: bool) -> str:
    if had_tool_calls:
        return "tool_calls"
    return _FINISH.get(str(data.get("done_reason") or "stop"), "stop")


def _error(data: Any) -> UpstreamError | None:
    if isinstance(data, dict) and "error" in data and not data.get("message"):
        err = data["error"]
        message = err if isinstance(err, str) else str(err.get("message") if isinstance(err, dict) else err)
        return UpstreamError(message, retryable=False, code="upstream_error")
    return None


class OllamaProvider(Provider):
    kind = "ollama"

    def _url(self, call: UpstreamCall, path: str) -> str:
        base = call.provider.base_url.rstrip("/")
        return (base[:-3] if base.endswith("/v1") else base) + path

    def _headers(self, call: UpstreamCall) -> dict[str, str]:
        headers = {"content-type": "application/json", **call.provider.extra_headers, **call.headers}
        if call.key:  # Ollama itself needs none; a reverse proxy in front of it may
            headers["authorization"] = f"Bearer {call.key}"
        return headers

    async def _post(self, call: UpstreamCall, path: str, body: dict[str, Any]) -> dict[str, Any]:
        data = await post_json(self._url(call, path), body, self._headers(call), call.timeout)
        err = _error(data)
        if err is not None:
            raise err
        return data

    async def _one_choice(self, call: UpstreamCall) -> dict[str, Any]:
        return await self._post(call, "/api/chat", to_ollama_chat(call.body, call.upstream_model, stream=False))

    async def chat(self, call: UpstreamCall) -> dict[str, Any]:
        n = call.body.get("n") or 1
        n = n if isinstance(n, int) and n > 0 else 1
        # Ollama has no ``n``: ask n times at once; every answer is billed, as OpenAI bills n choices.
        answers = await asyncio.gather(*(self._one_choice(call) for _ in range(n)))
        choices = []
        prompt = completion = 0
        for index, data in enumerate(answers):
            message = _obj(data.get("message"))
            calls = _openai_tool_calls(message)
            for tool_call in calls:
                tool_call.pop("index", None)
            out: dict[str, Any] = {"role": "assistant", "content": message.get("content") or None, "refusal": None}
            if calls:
                out["tool_calls"] = calls
            if message.get("thinking"):
                out["reasoning_content"] = message["thinking"]
            choices.append(
                {"index": index, "message": out, "finish_reason": _finish(data, bool(calls)), "logprobs": None}
            )
            usage = _usage(data, call.body, call.upstream_model)
            completion += usage["completion_tokens"]
            prompt = max(prompt, usage["prompt_tokens"])
        first = answers[0]
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": str(first.get("model") or call.upstream_model),
            "system_fingerprint": None,
            "choices": choices,
            "usage": _usage({"prompt_eval_count": prompt, "eval_count": completion}, call.body, call.upstream_model),
        }

    async def _lines(self, call: UpstreamCall, path: str, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """POST and yield each NDJSON line as an object; raise on error statuses and error lines."""
        async with streamed_post(self._url(call, path), body, self._headers(call), call.timeout) as response:
            buffer = b""
            async for chunk in response.aiter_bytes():
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    item = _parse_line(line)
                    if item is not None:
                        yield item
            item = _parse_line(buffer)
            if item is not None:
                yield item

    async def chat_stream(self, call: UpstreamCall) -> AsyncIterator[dict[str, Any]]:
        n = call.body.get("n")
        if isinstance(n, int) and n > 1:
            raise InvalidRequest("Ollama streams one choice per request; use n=1 or stream=false.", param="n")
        body = to_ollama_chat(call.body, call.upstream_model, stream=True)
        base = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": call.upstream_model,
            "system_fingerprint": None,
        }

        def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
            return {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}

        started = False
        tool_calls = 0
        async for data in self._lines(call, "/api/chat", body):
            if isinstance(data.get("model"), str):
                base["model"] = data["model"]
            if not started:
                started = True
                yield chunk({"role": "assistant", "content": ""})
            message = _obj(data.get("message"))
            if message.get("thinking"):
                yield chunk({"reasoning_content": message["thinking"]})
            if message.get("content"):
                yield chunk({"content": message["content"]})
            calls = _openai_tool_calls(message)
            if calls:
                for tool_call in calls:
                    tool_call["index"] = tool_calls
                    tool_calls += 1
                yield chunk({"tool_calls": calls})
            if data.get("done"):
                yield chunk({}, _finish(data, tool_calls > 0))
                yield {**base, "choices": [], "usage": _usage(data, call.body, call.upstream_model)}
                return
        raise UpstreamError("Ollama ended the stream before its final message", retryable=False)

    # --- legacy completions: /api/generate --------------------------------------------------

    @staticmethod
    def _generate_body(call: UpstreamCall, *, stream: bool) -> dict[str, Any]:
        prompt = call.body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise InvalidRequest("Ollama completes one text prompt per request.", param="prompt")
        n = call.body.get("n")
        if isinstance(n, int) and n > 1:
            raise InvalidRequest("Ollama returns one completion per request; use n=1.", param="n")
        chat = to_ollama_chat({**call.body, "messages": []}, call.upstream_model, stream=stream)
        body: dict[str, Any] = {"model": call.upstream_model, "prompt": prompt, "stream": stream}
        for name in ("options", "format", "keep_alive", "think"):
            if name in chat:
                body[name] = chat[name]
        if isinstance(call.body.get("suffix"), str):
            body["suffix"] = call.body["suffix"]
        return body

    @staticmethod
    def _generate_usage(data: dict[str, Any], prompt: str, model: str) -> dict[str, Any]:
        given = data.get("prompt_eval_count")
        prompt_tokens = given if isinstance(given, int) else tokens.count_text(prompt, model)
        counted = data.get("eval_count")
        completion = counted if isinstance(counted, int) else 0
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion,
        }

    async def completions(self, call: UpstreamCall) -> dict[str, Any]:
        body = self._generate_body(call, stream=False)
        data = await self._post(call, "/api/generate", body)
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": str(data.get("model") or call.upstream_model),
            "choices": [
                {
                    "index": 0,
                    "text": str(data.get("response") or ""),
                    "finish_reason": _finish(data, False),
                    "logprobs": None,
                }
            ],
            "usage": self._generate_usage(data, body["prompt"], call.upstream_model),
        }

    async def completions_stream(self, call: UpstreamCall) -> AsyncIterator[dict[str, Any]]:
        body = self._generate_body(call, stream=True)
        base = {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": call.upstream_model,
        }
        async for data in self._lines(call, "/api/generate", body):
            text = data.get("response")
            if isinstance(text, str) and text:
                yield {**base, "choices": [{"index": 0, "text": text, "finish_reason": None, "logprobs": None}]}
            if data.get("done"):
                finish = _finish(data, False)
                yield {**base, "choices": [{"index": 0, "text": "", "finish_reason": finish, "logprobs": None}]}
                yield {**base, "choices": [], "usage": self._generate_usage(data, body["prompt"], call.upstream_model)}
                return
        raise UpstreamError("Ollama ended the stream before its final message", retryable=False)

    async def embeddings(self, call: UpstreamCall) -> dict[str, Any]:
        raw = call.body.get("input")
        if isinstance(raw, list) and raw and not all(isinstance(v, str) for v in raw):
            raise InvalidRequest("Ollama embeds text only; token arrays are not supported.", param="input")
        body: dict[str, Any] = {"model": call.upstream_model, "input": raw}
        for name in ("dimensions", "truncate", "keep_alive", "options"):
            if call.body.get(name) is not None:
                body[name] = call.body[name]
        data = await self._post(call, "/api/embed", body)
        vectors = data.get("embeddings")
        if not isinstance(vectors, list):
            raise UpstreamError("Ollama returned no embeddings", retryable=False)
        prompt = data.get("prompt_eval_count")
        if not isinstance(prompt, int):
            texts = raw if isinstance(raw, list) else [raw]
            prompt = sum(tokens.count_text(str(t), call.upstream_model) for t in texts)
        return {
            "object": "list",
            "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)],
            "model": str(data.get("model") or call.upstream_model),
            "usage": {"prompt_tokens": prompt, "total_tokens": prompt},
        }


def _parse_line(line: bytes) -> dict[str, Any] | None:
    line = line.strip()
    if not line:
        return None
    try:
        data = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise UpstreamError("Ollama sent a malformed stream line", retryable=False) from exc
    if not isinstance(data, dict):
        return None
    err = _error(data)
    if err is not None:
        raise err
    return data
