"""A fast fake OpenAI upstream for the benchmark: raw asyncio + httptools on uvloop.

It has to cost far less per request than the gateway it feeds, so it is not an ASGI app: one
``asyncio.Protocol`` per connection, httptools parsing, HTTP/1.1 keep-alive, answers written in one
``transport.write``. It speaks the real wire format the gateway's ``openai`` provider reads:

- ``POST /v1/chat/completions``: a ``chat.completion`` JSON body with ``usage``; with
  ``"stream": true`` an SSE stream (chunked transfer encoding) of ``chat.completion.chunk``
  objects, the usage chunk when ``stream_options.include_usage`` is set, then ``data: [DONE]``.
- ``POST /v1/embeddings``: a float embedding per input.

``--frame-delay`` spaces stream frames (default 0: the whole stream in one write).

    python -m bench.fake_upstream --port 9100
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import time
from pathlib import Path
from typing import Any, cast

import httptools
import orjson

WORDS = ["Hello", " from", " the", " fast", " fake", " upstream", "!"]
PROMPT_TOKENS = 12
COMPLETION_TOKENS = len(WORDS)


def _usage() -> dict[str, Any]:
    return {
        "prompt_tokens": PROMPT_TOKENS,
        "completion_tokens": COMPLETION_TOKENS,
        "total_tokens": PROMPT_TOKENS + COMPLETION_TOKENS,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def _head(status: int, content_type: bytes, length: int | None) -> bytes:
    reason = {200: b"OK", 400: b"Bad Request", 404: b"Not Found"}.get(status, b"Error")
    lines = [b"HTTP/1.1 %d %s" % (status, reason), b"content-type: " + content_type]
    if length is None:
        lines.append(b"transfer-encoding: chunked")
    else:
        lines.append(b"content-length: %d" % length)
    lines.append(b"x-request-id: req_fake")
    return b"\r\n".join(lines) + b"\r\n\r\n"


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class Responses:
    """Bodies built once per model name (the benchmark asks for one or two)."""

    def __init__(self) -> None:
        self._json: dict[str, bytes] = {}
        self._frames: dict[tuple[str, bool], list[bytes]] = {}
        self.created = int(time.time())

    def completion(self, model: str) -> bytes:
        found = self._json.get(model)
        if found is None:
            body = orjson.dumps(
                {
                    "id": "chatcmpl-fakebench",
                    "object": "chat.completion",
                    "created": self.created,
                    "model": model,
                    "system_fingerprint": "fp_bench",
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": "".join(WORDS), "refusal": None},
                            "logprobs": None,
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": _usage(),
                }
            )
            found = self._json[model] = _head(200, b"application/json", len(body)) + body
        return found

    def stream_frames(self, model: str, include_usage: bool) -> list[bytes]:
        """Each SSE frame already wrapped as one HTTP chunk; the last one ends the body."""
        found = self._frames.get((model, include_usage))
        if found is None:
            base = {
                "id": "chatcmpl-fakebench",
                "object": "chat.completion.chunk",
                "created": self.created,
                "model": model,
                "system_fingerprint": "fp_bench",
            }
            objs: list[dict[str, Any]] = []
            for i, word in enumerate(WORDS):
                delta = {"role": "assistant", "content": word} if i == 0 else {"content": word}
                objs.append(
                    {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}]}
                )
            objs.append({**base, "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}]})
            if include_usage:
                objs.append({**base, "choices": [], "usage": _usage()})
            frames = [_chunk(b"data: " + orjson.dumps(o) + b"\n\n") for o in objs]
            frames.append(_chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
            found = self._frames[(model, include_usage)] = frames
        return found

    def embeddings(self, model: str, count: int) -> bytes:
        vector = [0.001 * i for i in range(64)]
        body = orjson.dumps(
            {
                "object": "list",
                "data": [{"object": "embedding", "index": i, "embedding": vector} for i in range(count)],
                "model": model,
                "usage": {"prompt_tokens": 8 * count, "total_tokens": 8 * count},
            }
        )
        return _head(200, b"application/json", len(body)) + body


def _error(status: int, message: str) -> bytes:
    body = orjson.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}})
    return _head(status, b"application/json", len(body)) + body


class UpstreamProtocol(asyncio.Protocol):
    def __init__(self, responses: Responses, frame_delay: float) -> None:
        self.responses = responses
        self.frame_delay = frame_delay
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.body: list[bytes] = []

    # --- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass it

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.transport is not None:
                self.transport.write(_error(400, "bad request"))
                self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    # --- httptools callbacks
    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        url, raw = self.url, b"".join(self.body)
        self.url, self.body = b"", []
        transport = self.transport
        if transport is None:
            return
        try:
            data = orjson.loads(raw) if raw else {}
        except orjson.JSONDecodeError:
            transport.write(_error(400, "body is not JSON"))
            return
        model = str(data.get("model") or "fake-model")
        path = url.split(b"?", 1)[0]
        if path.endswith(b"/chat/completions"):
            if data.get("stream"):
                options = data.get("stream_options") or {}
                frames = self.responses.stream_frames(model, bool(options.get("include_usage")))
                head = _head(200, b"text/event-stream", None)
                if self.frame_delay > 0:
                    asyncio.ensure_future(self._trickle(transport, head, frames))
                else:
                    transport.write(head + b"".join(frames))
            else:
                transport.write(self.responses.completion(model))
        elif path.endswith(b"/embeddings"):
            raw_input = data.get("input")
            count = len(raw_input) if isinstance(raw_input, list) and raw_input and isinstance(raw_input[0], str) else 1
            transport.write(self.responses.embeddings(model, count))
        else:
            transport.write(_error(404, f"no route {path.decode(errors='replace')}"))
        if not self.parser.should_keep_alive():
            transport.close()

    async def _trickle(self, transport: asyncio.Transport, head: bytes, frames: list[bytes]) -> None:
        transport.write(head + frames[0])
        for frame in frames[1:]:
            await asyncio.sleep(self.frame_delay)
            if transport.is_closing():
                return
            transport.write(frame)


async def serve(host: str, port: int, frame_delay: float, ready_file: str | None = None) -> None:
    loop = asyncio.get_running_loop()
    responses = Responses()
    server = await loop.create_server(
        lambda: UpstreamProtocol(responses, frame_delay), host, port, backlog=1024, reuse_address=True
    )
    bound = server.sockets[0].getsockname()[1]
    if ready_file:
        Path(ready_file).write_text(str(bound), encoding="utf-8")  # noqa: ASYNC240 - once, at start-up
    else:
        print(f"fake upstream on http://{host}:{bound}/v1", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 = any free port")
    parser.add_argument("--frame-delay", type=float, default=0.0, help="seconds between stream frames")
    parser.add_argument("--ready-file", help="write the bound port here once listening")
    args = parser.parse_args()
    import uvloop

    uvloop.run(serve(args.host, args.port, args.frame_delay, args.ready_file))


if __name__ == "__main__":
    main()
