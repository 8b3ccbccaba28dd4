"""A fake OpenAI-compatible upstream speaking the real wire format, with scriptable misbehaviour.

By default it answers like OpenAI: chat completions (JSON or SSE with ``include_usage``), tool
calls when tools are offered, the Responses API (``/v1/responses``: a ``response`` object or its
typed ``event:`` stream, function calls when function tools are offered), legacy completions,
embeddings (float or base64), models, and the media routes: images (generations, and edits
from a multipart form), audio transcriptions (multipart; the WAV's length read from its header and
reported as ``usage.seconds``), speech (the audio streamed as raw bytes) and moderations. Tests
queue ``Reply`` objects to make the next request on a path fail, stall, stream custom frames or
reset mid-stream; every request is recorded, and so is every client disconnect.
"""

from __future__ import annotations

import asyncio
import base64
import email.parser
import email.policy
import io
import math
import random
import struct
import time
import wave
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson


@dataclass
class Reply:
    status: int = 200
    json: Any = None  # a whole JSON body (non-streaming)
    frames: list[bytes] | None = None  # raw SSE bytes to stream, sent one by one
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # before the response starts
    frame_delay: float = 0.0  # between frames
    reset_after: int | None = None  # abort the connection after this many frames
    raw_body: bytes | None = None  # exact bytes (e.g. an HTML error page)


@dataclass
class Fault:
    """A standing misbehaviour for every request (until cleared), unlike a queued ``Reply``.

    ``down``: every request gets a 500. ``flaky``: a share ``rate`` of requests get a 500 (seeded,
    so runs repeat). ``rate_limited``: a 429 with ``retry-after``. ``reset``: a stream is cut after
    ``after_frames`` frames (a non-stream request's connection is cut before any answer).
    ``stall``: no first byte for ``stall`` seconds.
    """

    kind: str  # down | flaky | rate_limited | reset | stall
    rate: float = 1.0
    retry_after: str = "10"
    after_frames: int = 3
    stall: float = 30.0
    seed: int = 1234


@dataclass
class Recorded:
    path: str
    headers: dict[str, str]
    body: Any


def usage_for(prompt: int, completion: int, cached: int = 0) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def sse(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


class FakeOpenAI:
    """The ASGI app. ``text`` is what it answers; usage is 10 prompt tokens per message + 7 out."""

    default_text = "Hello from the fake upstream!"  # what ``text`` is again after ``reset``

    def __init__(self) -> None:
        self.requests: list[Recorded] = []
        self.replies: dict[str, deque[Reply]] = defaultdict(deque)
        self.disconnects = 0
        self.completed_streams = 0
        self.text = self.default_text
        self.cached_tokens = 0
        self.fault: Fault | None = None
        self._random = random.Random(0)
        # Tests that need chosen vectors (the semantic cache) set this: input text -> its embedding.
        self.embedding_for: Callable[[str], list[float]] | None = None

    def set_fault(self, fault: Fault | None) -> None:
        self.fault = fault
        self._random = random.Random(fault.seed if fault is not None else 0)

    def push(self, path: str, *replies: Reply) -> None:
        self.replies[path].extend(replies)

    def reset(self) -> None:
        self.requests.clear()
        self.text = self.default_text
        self.replies.clear()
        self.disconnects = 0
        self.completed_streams = 0
        self.cached_tokens = 0
        self.embedding_for = None
        self.set_fault(None)

    def prompt_tokens(self, body: dict[str, Any]) -> int:
        return 10 * len(body.get("messages") or [1])

    # --- ASGI ---------------------------------------------------------------------------------

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        raw = b"".join(chunks)
        path = scope["path"]
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        body: Any
        if headers.get("content-type", "").startswith("multipart/form-data"):
            body = multipart_form(raw, headers["content-type"])
        else:
            try:
                body = orjson.loads(raw) if raw else None
            except orjson.JSONDecodeError:
                body = raw
        self.requests.append(Recorded(path, headers, body))
        queue = self.replies.get(path)
        reply = queue.popleft() if queue else self.default_reply(path, body if isinstance(body, dict) else {})
        if not queue and self.fault is not None:
            reply = self.faulty(reply, self.fault)
        await self.respond(reply, receive, send)

    def faulty(self, reply: Reply, fault: Fault) -> Reply:
        """``reply`` as the standing fault changes it."""
        server_error = Reply(
            status=500, json={"error": {"message": "fake upstream is down", "type": "server_error", "code": None}}
        )
        if fault.kind == "down":
            return server_error
        if fault.kind == "flaky":
            return server_error if self._random.random() < fault.rate else reply
        if fault.kind == "rate_limited":
            return Reply(
                status=429,
                headers={"retry-after": fault.retry_after},
                json={"error": {"message": "Rate limit reached", "type": "requests", "code": "rate_limit_exceeded"}},
            )
        if fault.kind == "reset":
            frames = reply.frames if reply.frames is not None else [b""]
            return Reply(frames=frames, reset_after=fault.after_frames if reply.frames is not None else 0)
        if fault.kind == "stall":
            return Reply(status=reply.status, json=reply.json, frames=reply.frames, delay=fault.stall)
        raise ValueError(f"unknown fault {fault.kind!r}")

    async def respond(self, reply: Reply, receive: Any, send: Any) -> None:
        if reply.delay:
            await asyncio.sleep(reply.delay)
        hdrs = [(k.encode(), v.encode()) for k, v in reply.headers.items()]
        if reply.frames is None:
            payload = reply.raw_body if reply.raw_body is not None else orjson.dumps(reply.json)
            if not any(k == b"content-type" for k, _ in hdrs):
                hdrs.append((b"content-type", b"application/json"))
            await send({"type": "http.response.start", "status": reply.status, "headers": hdrs})
            await send({"type": "http.response.body", "body": payload})
            return
        if not any(k == b"content-type" for k, _ in hdrs):
            hdrs.append((b"content-type", b"text/event-stream"))
        await send({"type": "http.response.start", "status": reply.status, "headers": hdrs})
        disconnected = asyncio.Event()

        async def watch() -> None:
            while True:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    disconnected.set()
                    return

        watcher = asyncio.ensure_future(watch())
        try:
            for i, frame in enumerate(reply.frames):
                if reply.reset_after is not None and i >= reply.reset_after:
                    raise ConnectionResetError("fake upstream reset the stream")
                if disconnected.is_set():
                    self.disconnects += 1
                    return
                await send({"type": "http.response.body", "body": frame, "more_body": True})
                if reply.frame_delay:
                    try:
                        await asyncio.wait_for(disconnected.wait(), reply.frame_delay)
                    except TimeoutError:
                        pass
            await send({"type": "http.response.body", "body": b""})
            self.completed_streams += 1
        finally:
            watcher.cancel()

    # --- default, realistic behaviour ---------------------------------------------------------

    def default_reply(self, path: str, body: dict[str, Any]) -> Reply:
        if path.endswith("/responses"):
            response = self.response_json(body)
            return Reply(frames=self.response_frames(response)) if body.get("stream") else Reply(json=response)
        if path.endswith("/chat/completions"):
            return self.chat_stream_reply(body) if body.get("stream") else Reply(json=self.chat_json(body))
        if path.endswith("/completions"):
            return self.completion_reply(body)
        if path.endswith("/embeddings"):
            return Reply(json=self.embeddings_json(body))
        if path.endswith(("/images/generations", "/images/edits")):
            return Reply(json=self.images_json(body))
        if path.endswith("/audio/transcriptions"):
            return self.transcription_reply(body)
        if path.endswith("/audio/speech"):
            audio = self.speech_audio(body)
            mime = {"wav": "audio/wav", "pcm": "audio/pcm", "opus": "audio/ogg"}.get(body.get("response_format", ""))
            pieces = [audio[i : i + 1024] for i in range(0, len(audio), 1024)]
            return Reply(frames=pieces, headers={"content-type": mime or "audio/mpeg"})
        if path.endswith("/moderations"):
            return Reply(json=self.moderations_json(body))
        if path.endswith("/models"):
            return Reply(
                json={
                    "object": "list",
                    "data": [{"id": "fake-model", "object": "model", "created": 1, "owned_by": "fake"}],
                }
            )
        return Reply(
            status=404,
            json={
                "error": {"message": f"no route {path}", "type": "invalid_request_error", "param": None, "code": None}
            },
        )

    def tool_calls(self, body: dict[str, Any]) -> list[dict[str, Any]]:
        tools = body.get("tools") or []
        if not tools or body.get("tool_choice") == "none":
            return []
        messages = body.get("messages") or []
        if messages and messages[-1].get("role") == "tool":
            return []
        calls = []
        for i, tool in enumerate(tools[: 2 if body.get("parallel_tool_calls", True) else 1]):
            name = tool["function"]["name"]
            calls.append(
                {
                    "id": f"call_fake{i}",
                    "type": "function",
                    "function": {"name": name, "arguments": orjson.dumps({"city": "Paris", "n": i}).decode()},
                }
            )
        return calls

    def chat_json(self, body: dict[str, Any]) -> dict[str, Any]:
        calls = self.tool_calls(body)
        message: dict[str, Any] = {
            "role": "assistant",
            "content": None if calls else self.text,
            "refusal": None,
            "annotations": [],
        }
        if calls:
            message["tool_calls"] = calls
        n = body.get("n") or 1
        return {
            "id": "chatcmpl-fake123",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", "fake"),
            "system_fingerprint": "fp_fake",
            "service_tier": "default",
            "choices": [
                {"index": i, "message": message, "logprobs": None, "finish_reason": "tool_calls" if calls else "stop"}
                for i in range(n)
            ],
            "usage": usage_for(self.prompt_tokens(body), 7 * n, self.cached_tokens),
        }

    def chat_stream_reply(self, body: dict[str, Any]) -> Reply:
        base = {
            "id": "chatcmpl-fake123",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": body.get("model", "fake"),
            "system_fingerprint": "fp_fake",
        }
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        extra = {"usage": None} if include_usage else {}

        def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
            return sse(
                {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}], **extra}
            )

        frames = [chunk({"role": "assistant", "content": "", "refusal": None})]
        calls = self.tool_calls(body)
        if calls:
            for i, call in enumerate(calls):
                frames.append(
                    chunk(
                        {
                            "tool_calls": [
                                {
                                    "index": i,
                                    "id": call["id"],
                                    "type": "function",
                                    "function": {"name": call["function"]["name"], "arguments": ""},
                                }
                            ]
                        }
                    )
                )
                args = call["function"]["arguments"]
                for j in range(0, len(args), 5):  # split mid-token, as real upstreams do
                    frames.append(chunk({"tool_calls": [{"index": i, "function": {"arguments": args[j : j + 5]}}]}))
            frames.append(chunk({}, "tool_calls"))
        else:
            words = self.text.split(" ")
            for i, word in enumerate(words):
                frames.append(chunk({"content": word if i == 0 else " " + word}))
            frames.append(chunk({}, "stop"))
        if include_usage:
            frames.append(
                sse({**base, "choices": [], "usage": usage_for(self.prompt_tokens(body), 7, self.cached_tokens)})
            )
        frames.append(b"data: [DONE]\n\n")
        return Reply(frames=frames)

    # --- the Responses API --------------------------------------------------------------------

    def response_json(self, body: dict[str, Any]) -> dict[str, Any]:
        """A ``response`` as OpenAI sends it: input tokens are 10 per input item (+10 for
        instructions), output 7; function calls for the function tools unless the last item is a
        tool's output."""
        items = body.get("input")
        items = [{"role": "user", "content": items}] if isinstance(items, str) else list(items or [])
        tools = [t for t in body.get("tools") or [] if t.get("type") == "function"]
        answered = bool(items) and items[-1].get("type") == "function_call_output"
        output: list[dict[str, Any]] = []
        if tools and not answered and body.get("tool_choice") != "none":
            for i, tool in enumerate(tools[:2]):
                output.append(
                    {
                        "id": f"fc_fake{i}",
                        "type": "function_call",
                        "status": "completed",
                        "call_id": f"call_fake{i}",
                        "name": tool["name"],
                        "arguments": orjson.dumps({"city": "Paris", "n": i}).decode(),
                    }
                )
        else:
            output.append(
                {
                    "id": "msg_fake",
                    "type": "message",
                    "status": "completed",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": self.text, "annotations": [], "logprobs": []}],
                }
            )
        prompt = 10 * len(items) + (10 if body.get("instructions") else 0)
        return {
            "id": "resp_upstream123",
            "object": "response",
            "created_at": int(time.time()),
            "status": "completed",
            "background": False,
            "error": None,
            "incomplete_details": None,
            "instructions": body.get("instructions"),
            "max_output_tokens": body.get("max_output_tokens"),
            "model": body.get("model"),
            "output": output,
            "parallel_tool_calls": True,
            "previous_response_id": body.get("previous_response_id"),
            "reasoning": {"effort": (body.get("reasoning") or {}).get("effort"), "summary": None},
            "store": body.get("store", True),
            "temperature": 1.0,
            "text": body.get("text") or {"format": {"type": "text"}},
            "tool_choice": body.get("tool_choice", "auto"),
            "tools": body.get("tools") or [],
            "top_p": 1.0,
            "truncation": "disabled",
            "usage": {
                "input_tokens": prompt,
                "input_tokens_details": {"cached_tokens": self.cached_tokens},
                "output_tokens": 7,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": prompt + 7,
            },
            "user": None,
            "metadata": body.get("metadata") or {},
        }

    @staticmethod
    def response_frames(response: dict[str, Any]) -> list[bytes]:
        """The typed event stream of ``response``, as OpenAI frames it (``event:`` + ``data:``)."""
        events: list[dict[str, Any]] = []
        opening = {**response, "status": "in_progress", "output": [], "usage": None}
        events.append({"type": "response.created", "response": opening})
        events.append({"type": "response.in_progress", "response": opening})
        for index, item in enumerate(response["output"]):
            if item["type"] == "message":
                events.append(
                    {"type": "response.output_item.added", "output_index": index, "item": {**item, "content": []}}
                )
                part = item["content"][0]
                base = {"item_id": item["id"], "output_index": index, "content_index": 0}
                events.append({"type": "response.content_part.added", **base, "part": {**part, "text": ""}})
                words = part["text"].split(" ")
                for i, word in enumerate(words):
                    delta = word if i == 0 else " " + word
                    events.append({"type": "response.output_text.delta", **base, "delta": delta, "logprobs": []})
                events.append({"type": "response.output_text.done", **base, "text": part["text"], "logprobs": []})
                events.append({"type": "response.content_part.done", **base, "part": part})
            else:
                added = {**item, "status": "in_progress", "arguments": ""}
                events.append({"type": "response.output_item.added", "output_index": index, "item": added})
                base = {"item_id": item["id"], "output_index": index}
                args = item["arguments"]
                for j in range(0, len(args), 5):
                    events.append({"type": "response.function_call_arguments.delta", **base, "delta": args[j : j + 5]})
                events.append({"type": "response.function_call_arguments.done", **base, "arguments": args})
            events.append({"type": "response.output_item.done", "output_index": index, "item": item})
        events.append({"type": "response.completed", "response": response})
        frames = []
        for sequence, event in enumerate(events):
            event["sequence_number"] = sequence
            frames.append(b"event: " + event["type"].encode() + b"\ndata: " + orjson.dumps(event) + b"\n\n")
        return frames

    def completion_reply(self, body: dict[str, Any]) -> Reply:
        base = {"id": "cmpl-fake", "object": "text_completion", "created": int(time.time()), "model": body.get("model")}
        if not body.get("stream"):
            return Reply(
                json={
                    **base,
                    "choices": [{"index": 0, "text": " world", "finish_reason": "stop", "logprobs": None}],
                    "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
                }
            )
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        frames = [
            sse({**base, "choices": [{"index": 0, "text": t, "finish_reason": None, "logprobs": None}]})
            for t in (" wor", "ld")
        ]
        frames.append(sse({**base, "choices": [{"index": 0, "text": "", "finish_reason": "stop", "logprobs": None}]}))
        if include_usage:
            frames.append(
                sse({**base, "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}})
            )
        frames.append(b"data: [DONE]\n\n")
        return Reply(frames=frames)

    def embeddings_json(self, body: dict[str, Any]) -> dict[str, Any]:
        inputs = body.get("input")
        items = inputs if isinstance(inputs, list) and inputs and not isinstance(inputs[0], int) else [inputs]
        dims = body.get("dimensions") or 8
        data = []
        for i, item in enumerate(items):
            if self.embedding_for is not None and isinstance(item, str):
                vector = self.embedding_for(item)
                dims = len(vector)
            else:
                vector = [round(0.1 * (i + 1) + 0.01 * d, 4) for d in range(dims)]
            emb: Any = vector
            if body.get("encoding_format") == "base64":
                emb = base64.b64encode(struct.pack(f"<{dims}f", *vector)).decode()
            data.append({"object": "embedding", "index": i, "embedding": emb})
        return {
            "object": "list",
            "data": data,
            "model": body.get("model"),
            "usage": {"prompt_tokens": 4 * len(items), "total_tokens": 4 * len(items)},
        }

    # --- media ------------------------------------------------------------------------------------

    #: The 1x1 PNG every fake image is.
    PNG = base64.b64decode(
        "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
    )

    def images_json(self, body: dict[str, Any]) -> dict[str, Any]:
        """dall-e answers with the pictures only; gpt-image-1 also says the size and quality it made."""
        n = int(body.get("n") or 1)
        model = str(body.get("model") or "")
        data: list[dict[str, Any]] = []
        for i in range(n):
            if body.get("response_format") == "url" and not model.startswith("gpt-image"):
                data.append({"url": f"https://images.fake.example/img-{i}.png", "revised_prompt": body.get("prompt")})
            else:
                data.append({"b64_json": base64.b64encode(self.PNG).decode()})
        answer: dict[str, Any] = {"created": int(time.time()), "data": data}
        if model.startswith("gpt-image"):
            size = body.get("size") if body.get("size") not in (None, "auto") else "1024x1024"
            quality = body.get("quality") if body.get("quality") not in (None, "auto") else "high"
            answer.update(size=size, quality=quality, output_format="png", background="opaque")
            answer["usage"] = {"input_tokens": 10, "output_tokens": 4160, "total_tokens": 4170}
        return answer

    def transcription_reply(self, body: dict[str, Any]) -> Reply:
        upload = body.get("file")
        if not isinstance(upload, tuple):
            return Reply(status=400, json={"error": {"message": "file is required", "type": "invalid_request_error"}})
        with wave.open(io.BytesIO(upload[1]), "rb") as reader:
            seconds = reader.getnframes() / reader.getframerate()
        text = f"Transcribed {upload[0]}."
        if body.get("response_format") == "verbose_json":
            return Reply(json={"task": "transcribe", "language": "english", "duration": seconds, "text": text})
        return Reply(json={"text": text, "usage": {"type": "duration", "seconds": math.ceil(seconds)}})

    @staticmethod
    def speech_audio(body: dict[str, Any]) -> bytes:
        """Bytes standing in for the encoded speech: 100 per character of the input."""
        text = str(body.get("input") or "")
        return bytes((ord(c) + i) % 256 for i, c in enumerate(text * 100))

    @staticmethod
    def moderations_json(body: dict[str, Any]) -> dict[str, Any]:
        raw = body.get("input")
        texts = raw if isinstance(raw, list) else [raw]
        names = ("harassment", "hate", "self-harm", "sexual", "violence")
        results = []
        for text in texts:
            flagged = "kill" in str(text).lower()
            categories = {name: flagged and name == "violence" for name in names}
            scores = {name: 0.97 if categories[name] else 0.001 for name in names}
            results.append({"flagged": flagged, "categories": categories, "category_scores": scores})
        return {"id": "modr-fake", "model": body.get("model") or "omni-moderation-latest", "results": results}


def multipart_form(raw: bytes, content_type: str) -> dict[str, Any]:
    """A multipart form as the fake reads it: text fields as str, files as (filename, bytes, type);
    a field sent more than once (``name[]``) as a list."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + raw
    )
    form: dict[str, Any] = {}
    for part in message.iter_parts():
        name = str(part.get_param("name", header="content-disposition"))
        payload = part.get_payload(decode=True)
        assert isinstance(payload, bytes)
        filename = part.get_filename()
        value: Any = (filename, payload, part.get_content_type()) if filename else payload.decode()
        if name in form:
            form[name] = [*form[name], value] if isinstance(form[name], list) else [form[name], value]
        else:
            form[name] = value
    return form
