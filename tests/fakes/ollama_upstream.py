"""A fake Ollama server speaking the native API: ``/api/chat`` and ``/api/generate`` (JSON or
NDJSON) and ``/api/embed``.

Answers like Ollama 0.x: sampling in ``options``, tool-call arguments as objects, counts in
``prompt_eval_count``/``eval_count``, durations in nanoseconds, errors as ``{"error": "..."}``.
Every request is recorded; ``push`` queues a scripted reply (status + body, or raw NDJSON lines).
"""

from __future__ import annotations

from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Any

import orjson

from tests.fakes.openai_upstream import Recorded


@dataclass
class OllamaReply:
    status: int = 200
    json: Any = None
    lines: list[bytes] | None = None  # raw NDJSON lines (each sent as one body chunk)
    extra: dict[str, Any] = field(default_factory=dict)


class FakeOllama:
    def __init__(self) -> None:
        self.requests: list[Recorded] = []
        self.replies: dict[str, deque[OllamaReply]] = defaultdict(deque)
        self.models = {"llama3.2", "nomic-embed-text"}
        self.words = ["Hello", " from", " fake", " Ollama", "!"]

    def reset(self) -> None:
        self.requests.clear()
        self.replies.clear()

    def push(self, path: str, *replies: OllamaReply) -> None:
        self.replies[path].extend(replies)

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
        body = orjson.loads(raw) if raw else {}
        path = scope["path"]
        self.requests.append(Recorded(path, {k.decode(): v.decode() for k, v in scope["headers"]}, body))
        queue = self.replies.get(path)
        reply = queue.popleft() if queue else self.default(path, body)
        if reply.lines is not None:
            await send(
                {
                    "type": "http.response.start",
                    "status": reply.status,
                    "headers": [(b"content-type", b"application/x-ndjson")],
                }
            )
            for line in reply.lines:
                await send({"type": "http.response.body", "body": line, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
            return
        await send(
            {"type": "http.response.start", "status": reply.status, "headers": [(b"content-type", b"application/json")]}
        )
        await send({"type": "http.response.body", "body": orjson.dumps(reply.json)})

    # --- default behaviour ------------------------------------------------------------------

    def default(self, path: str, body: dict[str, Any]) -> OllamaReply:
        model = body.get("model")
        if path in ("/api/chat", "/api/embed", "/api/generate") and model not in self.models:
            return OllamaReply(status=404, json={"error": f"model '{model}' not found, try pulling it first"})
        if path == "/api/chat":
            return self.chat(body)
        if path == "/api/generate":
            return self.generate(body)
        if path == "/api/embed":
            inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
            dims = body.get("dimensions") or 4
            return OllamaReply(
                json={
                    "model": model,
                    "embeddings": [
                        [round(0.25 * (i + 1) + 0.125 * d, 4) for d in range(dims)] for i in range(len(inputs))
                    ],
                    "total_duration": 14143917,
                    "load_duration": 1019500,
                    "prompt_eval_count": 3 * len(inputs),
                }
            )
        return OllamaReply(status=404, json={"error": f"404 page not found: {path}"})

    def _tool_calls(self, body: dict[str, Any]) -> list[dict[str, Any]]:
        tools = body.get("tools") or []
        messages = body.get("messages") or []
        if not tools or (messages and messages[-1].get("role") == "tool"):
            return []
        return [
            {"function": {"index": i, "name": t["function"]["name"], "arguments": {"city": "Paris", "n": i}}}
            for i, t in enumerate(tools[:2])
        ]

    def chat(self, body: dict[str, Any]) -> OllamaReply:
        model = body["model"]
        created = "2026-11-22T05:00:00.000000Z"
        calls = self._tool_calls(body)
        num_predict = (body.get("options") or {}).get("num_predict")
        words = self.words[:num_predict] if isinstance(num_predict, int) else self.words
        done_reason = "length" if len(words) < len(self.words) else "stop"
        final = {
            "model": model,
            "created_at": created,
            "message": {"role": "assistant", "content": ""},
            "done": True,
            "done_reason": done_reason,
            "total_duration": 4883583458,
            "load_duration": 1334875,
            "prompt_eval_count": 26,
            "prompt_eval_duration": 342546000,
            "eval_count": len(words) if not calls else 12,
            "eval_duration": 4535599000,
        }
        if not body.get("stream", True):
            message: dict[str, Any] = {"role": "assistant", "content": "" if calls else "".join(words)}
            if calls:
                message["tool_calls"] = calls
            return OllamaReply(json={**final, "message": message})
        lines = []
        if calls:
            lines.append(
                orjson.dumps(
                    {
                        "model": model,
                        "created_at": created,
                        "message": {"role": "assistant", "content": "", "tool_calls": calls},
                        "done": False,
                    }
                )
                + b"\n"
            )
        else:
            for word in words:
                lines.append(
                    orjson.dumps(
                        {
                            "model": model,
                            "created_at": created,
                            "message": {"role": "assistant", "content": word},
                            "done": False,
                        }
                    )
                    + b"\n"
                )
        lines.append(orjson.dumps(final) + b"\n")
        return OllamaReply(lines=lines)

    def generate(self, body: dict[str, Any]) -> OllamaReply:
        pieces = [" upon", " a", " time"]
        final = {"model": body["model"], "response": "", "done": True, "done_reason": "stop"}
        final |= {"prompt_eval_count": 4, "eval_count": len(pieces)}
        if not body.get("stream", True):
            return OllamaReply(json={**final, "response": "".join(pieces)})
        lines = [orjson.dumps({"model": body["model"], "response": p, "done": False}) + b"\n" for p in pieces]
        return OllamaReply(lines=[*lines, orjson.dumps(final) + b"\n"])
