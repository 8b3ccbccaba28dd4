"""A deterministic offline model: the quickstart, dev mode and CI cost nothing.

The same request always gets the same answer. Token usage is counted with the real tokenizer, so
costs and budgets behave as they would against a paid model. If the request offers tools (and
``tool_choice`` is not ``none``) and the last message is not a tool result, the mock calls the
first tool (or the named one) with arguments built from the tool's JSON schema.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import math
import re
import struct
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import orjson

from core.money import Usage
from gateway import tokens
from gateway.errors import InvalidRequest
from gateway.providers import media
from gateway.providers.base import Provider, Upload, UpstreamCall

_WORDS = (
    "the gateway answers offline with a deterministic reply so tests and demos cost nothing "
    "while tokens usage and cost are counted as for a real model"
).split()


def _last_user_text(messages: list[Any]) -> str:
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                return " ".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


#: How much of the prompt the reply quotes, so a test can see its question was the one answered.
SNIPPET_CHARS = 60


def _reply_text(seed: str, max_tokens: int | None, prompt: str = "") -> tuple[str, str]:
    """The reply and its finish reason; ``length`` when max_tokens cut it short.

    The reply quotes the start of the prompt ("Say hello in 3 words." gets a reply that says
    hello), then adds words picked deterministically from a hash of the whole request.
    """
    digest = hashlib.sha256(seed.encode()).digest()
    n_words = 12 + digest[0] % 12
    words = [_WORDS[(digest[i % len(digest)] + i) % len(_WORDS)] for i in range(n_words)]
    snippet = " ".join(prompt.split())[:SNIPPET_CHARS]
    lead = f'Mock reply to "{snippet}":' if snippet else "Mock reply:"
    text = lead + " " + " ".join(words) + "."
    if max_tokens is not None and max_tokens > 0:
        enc_words = text.split(" ")
        if len(enc_words) > max_tokens:
            return " ".join(enc_words[:max_tokens]), "length"
    return text, "stop"


def _example_for(schema: Any) -> Any:
    if not isinstance(schema, dict):
        return "example"
    kind = schema.get("type")
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        return enum[0]
    if kind == "object":
        props = schema.get("properties")
        props = props if isinstance(props, dict) else {}
        required = schema.get("required")
        names = required if isinstance(required, list) else list(props)
        return {name: _example_for(props[name]) for name in names if isinstance(name, str) and name in props}
    if kind == "array":
        return [_example_for(schema.get("items"))]
    if kind in ("integer", "number"):
        return 1
    if kind == "boolean":
        return True
    return "example"


def _tool_to_call(body: dict[str, Any]) -> dict[str, Any] | None:
    tools = [t for t in body.get("tools") or [] if isinstance(t, dict) and t.get("type", "function") == "function"]
    choice = body.get("tool_choice")
    if not tools or choice == "none":
        return None
    messages = body.get("messages") or []
    if messages and isinstance(messages[-1], dict) and messages[-1].get("role") == "tool":
        return None
    chosen = tools[0]
    if isinstance(choice, dict) and choice.get("type") == "function":
        wanted = (choice.get("function") or {}).get("name")
        chosen = next((t for t in tools if (t.get("function") or {}).get("name") == wanted), chosen)
    fn = chosen.get("function") or {}
    digest = hashlib.sha256(orjson.dumps(messages)).hexdigest()[:24]
    return {
        "id": f"call_{digest}",
        "type": "function",
        "function": {
            "name": fn.get("name", "tool"),
            "arguments": orjson.dumps(_example_for(fn.get("parameters"))).decode(),
        },
    }


class MockProvider(Provider):
    kind = "mock"
    #: Seconds between streamed chunks; 0 in tests and benchmarks.
    chunk_delay = 0.0

    def _answer(self, call: UpstreamCall) -> tuple[dict[str, Any], str, int, int]:
        body = call.body
        messages = body.get("messages")
        if not isinstance(messages, list):
            raise InvalidRequest("messages must be a list", param="messages")
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
        prompt_tokens = tokens.count_messages(messages, call.upstream_model, body.get("tools"))
        tool_call = _tool_to_call(body)
        if tool_call is not None:
            message = {"role": "assistant", "content": None, "refusal": None, "tool_calls": [tool_call]}
            completion = tokens.count_text(tool_call["function"]["name"] + tool_call["function"]["arguments"])
            return message, "tool_calls", prompt_tokens, completion
        seed = orjson.dumps(messages).decode()
        text, finish = _reply_text(seed, max_tokens if isinstance(max_tokens, int) else None, _last_user_text(messages))
        message = {"role": "assistant", "content": text, "refusal": None}
        return message, finish, prompt_tokens, tokens.count_text(text, call.upstream_model)

    @staticmethod
    def _usage(prompt: int, completion: int) -> dict[str, Any]:
        return Usage(prompt_tokens=prompt, completion_tokens=completion).to_openai()

    async def chat(self, call: UpstreamCall) -> dict[str, Any]:
        n = int(call.body.get("n") or 1)
        message, finish, prompt, completion = self._answer(call)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": call.upstream_model,
            "system_fingerprint": "fp_chittycan_mock",
            "choices": [{"index": i, "message": message, "finish_reason": finish, "logprobs": None} for i in range(n)],
            "usage": self._usage(prompt, completion * n),
        }

    async def chat_stream(self, call: UpstreamCall) -> AsyncIterator[dict[str, Any]]:
        message, finish, prompt, completion = self._answer(call)
        base = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": call.upstream_model,
            "system_fingerprint": "fp_chittycan_mock",
        }

        def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
            return {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]}

        yield chunk({"role": "assistant", "content": ""})
        if message.get("tool_calls"):
            tc = message["tool_calls"][0]
            yield chunk(
                {
                    "tool_calls": [
                        {
                            "index": 0,
                            "id": tc["id"],
                            "type": "function",
                            "function": {"name": tc["function"]["name"], "arguments": ""},
                        }
                    ]
                }
            )
            args = tc["function"]["arguments"]
            for i in range(0, len(args), 8):
                await self._pause()
                yield chunk({"tool_calls": [{"index": 0, "function": {"arguments": args[i : i + 8]}}]})
        else:
            words = message["content"].split(" ")
            for i, word in enumerate(words):
                await self._pause()
                yield chunk({"content": word if i == 0 else " " + word})
        yield chunk({}, finish)
        yield {**base, "choices": [], "usage": self._usage(prompt, completion)}

    async def _pause(self) -> None:
        if self.chunk_delay:
            await asyncio.sleep(self.chunk_delay)

    async def completions(self, call: UpstreamCall) -> dict[str, Any]:
        prompt = call.body.get("prompt", "")
        prompt_text = prompt if isinstance(prompt, str) else orjson.dumps(prompt).decode()
        max_tokens = call.body.get("max_tokens")
        text, finish = _reply_text(prompt_text, max_tokens if isinstance(max_tokens, int) else 16, prompt_text)
        p, c = tokens.count_text(prompt_text), tokens.count_text(text)
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": call.upstream_model,
            "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}],
            "usage": {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c},
        }

    async def completions_stream(self, call: UpstreamCall) -> AsyncIterator[dict[str, Any]]:
        full = await self.completions(call)
        base = {k: full[k] for k in ("id", "object", "created", "model")}
        words = full["choices"][0]["text"].split(" ")
        for i, word in enumerate(words):
            await self._pause()
            yield {
                **base,
                "choices": [
                    {"index": 0, "text": word if i == 0 else " " + word, "finish_reason": None, "logprobs": None}
                ],
            }
        yield {
            **base,
            "choices": [
                {"index": 0, "text": "", "finish_reason": full["choices"][0]["finish_reason"], "logprobs": None}
            ],
        }
        yield {**base, "choices": [], "usage": full["usage"]}

    async def embeddings(self, call: UpstreamCall) -> dict[str, Any]:
        raw = call.body.get("input")
        inputs: list[Any] = raw if isinstance(raw, list) and raw and not isinstance(raw[0], int) else [raw]
        dims = int(call.body.get("dimensions") or 1536)
        data = []
        total = 0
        for index, item in enumerate(inputs):
            text = item if isinstance(item, str) else orjson.dumps(item).decode()
            total += len(item) if isinstance(item, list) else tokens.count_text(text, call.upstream_model)
            data.append({"object": "embedding", "index": index, "embedding": _vector(text, dims)})
        return {
            "object": "list",
            "data": data,
            "model": call.upstream_model,
            "usage": {"prompt_tokens": total, "total_tokens": total},
        }

    # --- the media routes: a small generated PNG, a WAV tone, a transcript, moderation verdicts ---

    def _images(self, call: UpstreamCall, seed: str) -> dict[str, Any]:
        body = call.body
        n = int(body.get("n") or 1)
        size = str(body.get("size") or "1024x1024")
        quality = str(body.get("quality") or "standard")
        width, _, height = size.partition("x")
        # A small picture whatever the size asked (the mock's answers stay tiny); its shape follows it.
        w, h = (16, 16) if not (width.isdigit() and height.isdigit()) else _small(int(width), int(height))
        data = []
        for index in range(n):
            encoded = base64.b64encode(media.png(w, h, f"{seed}:{index}")).decode()
            if body.get("response_format") == "url":
                data.append({"url": f"data:image/png;base64,{encoded}", "revised_prompt": body.get("prompt")})
            else:
                data.append({"b64_json": encoded, "revised_prompt": body.get("prompt")})
        return {"created": int(time.time()), "data": data, "size": size, "quality": quality, "output_format": "png"}

    async def images(self, call: UpstreamCall) -> dict[str, Any]:
        prompt = call.body.get("prompt")
        if not isinstance(prompt, str):
            raise InvalidRequest("prompt: must be a string", param="prompt")
        return self._images(call, prompt)

    async def image_edits(self, call: UpstreamCall) -> dict[str, Any]:
        images = call.body.get("image")
        first = images[0] if isinstance(images, list) and images else images
        if not isinstance(first, Upload):
            raise InvalidRequest("image: an image file is required", param="image")
        return self._images(call, f"{call.body.get('prompt')}:{hashlib.sha256(first.data).hexdigest()}")

    async def transcriptions(self, call: UpstreamCall) -> dict[str, Any]:
        upload = call.body.get("file")
        if not isinstance(upload, Upload):
            raise InvalidRequest("file: an audio file is required", param="file")
        ms = media.wav_milliseconds(upload.data)
        if ms is None:
            raise InvalidRequest("file: the mock provider transcribes WAV files only", param="file")
        seconds = ms / 1000
        text = f"This is the mock transcript of {upload.filename}, {seconds:g} seconds of audio."
        if call.body.get("response_format") == "verbose_json":
            return {
                "task": "transcribe",
                "language": str(call.body.get("language") or "english"),
                "duration": seconds,
                "text": text,
                "segments": [
                    {
                        "id": 0,
                        "seek": 0,
                        "start": 0.0,
                        "end": seconds,
                        "text": text,
                        "tokens": [],
                        "temperature": 0.0,
                        "avg_logprob": -0.1,
                        "compression_ratio": 1.0,
                        "no_speech_prob": 0.0,
                    }
                ],
            }
        return {"text": text, "usage": {"type": "duration", "seconds": math.ceil(seconds)}}

    async def speech_stream(self, call: UpstreamCall) -> AsyncIterator[dict[str, Any]]:
        text = call.body.get("input")
        if not isinstance(text, str):
            raise InvalidRequest("input: must be a string", param="input")
        # A tone of 50 ms per character (at most 10 s): a real WAV whatever format was asked.
        audio = media.wav(min(50 * len(text), 10_000) or 50, pitch=220.0 + len(text) % 200)
        for start in range(0, len(audio), 4096):
            yield {"audio": audio[start : start + 4096], "content_type": "audio/wav"}
            await self._pause()

    async def moderations(self, call: UpstreamCall) -> dict[str, Any]:
        raw = call.body.get("input")
        items = raw if isinstance(raw, list) else [raw]
        texts = [
            item if isinstance(item, str) else str(item.get("text") or "") if isinstance(item, dict) else ""
            for item in items
        ]
        digest = hashlib.sha256(orjson.dumps(texts)).hexdigest()[:24]
        return {
            "id": f"modr-{digest}",
            "model": call.upstream_model,
            "results": [media.moderation_result(text) for text in texts],
        }


def _small(width: int, height: int) -> tuple[int, int]:
    """The mock's picture size: the asked shape, the longer side 32 pixels."""
    longer = max(width, height, 1)
    return max(1, width * 32 // longer), max(1, height * 32 // longer)


def _features(text: str) -> list[tuple[str, float]]:
    """Lower-cased words (weight 1) and their character trigrams (weight 0.5)."""
    words = re.findall(r"\w+", text.lower())
    found: list[tuple[str, float]] = [(f"w:{w}", 1.0) for w in words]
    for word in words:
        padded = f"^{word}$"
        found.extend((f"t:{padded[i : i + 3]}", 0.5) for i in range(len(padded) - 2))
    return found


def _vector(text: str, dims: int) -> list[float]:
    """A unit vector derived from the text: same text, same vector; similar texts, close vectors.

    A hashed bag of words and character trigrams (each feature adds its weight, signed, to one
    of ``dims`` buckets), so the semantic cache can be shown offline: "What is the capital of
    France?" and "what is the capital of france" get the same vector, a reworded question a
    close one. A text without words gets a vector hashed from its bytes.
    """
    out = [0.0] * dims
    for feature, weight in _features(text):
        digest = hashlib.blake2b(feature.encode(), digest_size=8).digest()
        bucket = int.from_bytes(digest[:7], "little") % dims
        out[bucket] += weight if digest[7] & 1 else -weight
    norm = math.sqrt(sum(v * v for v in out))
    if norm == 0.0:
        counter = 0
        out = []
        while len(out) < dims:
            block = hashlib.sha256(f"{counter}:{text}".encode()).digest()
            out.extend(v / 2**31 - 1.0 for v in struct.unpack("<8I", block))
            counter += 1
        out = out[:dims]
        norm = math.sqrt(sum(v * v for v in out)) or 1.0
    return [v / norm for v in out]
