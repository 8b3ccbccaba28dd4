"""An async HTTP/1.1 load generator: N keep-alive connections, each sending requests back to back.

Raw asyncio + httptools (uvloop) rather than an HTTP client library, so that the client costs far
less per request than the server it measures (an aiohttp client spends ~0.2 ms of CPU per
request, a tenth of the gateway's budget). It reports requests/s, p50/p99 latency and, for
streams, the time to the first body byte (the first SSE frame), counting only requests that
completed inside the measuring window (after the warm-up).

    python -m bench.load --url http://127.0.0.1:8080/v1/chat/completions --key chitty_... \\
        --concurrency 10 --duration 5 [--stream]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import asdict, dataclass, field
from typing import Any, cast
from urllib.parse import urlsplit

import httptools
import orjson

MODEL = "bench-model"


def chat_body(stream: bool, model: str = MODEL) -> bytes:
    body: dict[str, Any] = {
        "model": model,
        "messages": [
            {"role": "system", "content": "You are a terse assistant."},
            {"role": "user", "content": "Say hello in a few words."},
        ],
        "temperature": 0,
        "max_tokens": 64,
    }
    if stream:
        body["stream"] = True
    return orjson.dumps(body)


def build_request(url: str, key: str, body: bytes) -> bytes:
    parts = urlsplit(url)
    lines = [
        f"POST {parts.path or '/'} HTTP/1.1",
        f"Host: {parts.netloc}",
        "Content-Type: application/json",
        "Accept: application/json",
        f"Content-Length: {len(body)}",
    ]
    if key:
        lines.append(f"Authorization: Bearer {key}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


@dataclass
class Result:
    target: str
    mode: str  # json | stream
    concurrency: int
    duration_s: float
    requests: int = 0  # answered inside the measuring window
    answered: int = 0  # every 200 answer, warm-up and tail included (the ledger must hold as many rows)
    errors: int = 0
    rps: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0
    ttfb_p50_ms: float | None = None
    ttfb_p99_ms: float | None = None
    first_error: str = ""
    statuses: dict[str, int] = field(default_factory=dict)


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, max(0, round(q * len(sorted_values) + 0.5) - 1))
    return sorted_values[index]


class Connection(asyncio.Protocol):
    """One keep-alive connection; ``request`` sends prebuilt bytes and waits for the whole response."""

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.done: asyncio.Future[int] | None = None
        self.first_body = 0.0
        self.body: list[bytes] = []
        self.keep_alive = True
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass it

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(ConnectionError(f"bad response: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._fail(ConnectionError("connection closed"))
        if not self.closed.done():
            self.closed.set_result(None)

    def _fail(self, exc: Exception) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_exception(exc)

    def on_body(self, body: bytes) -> None:
        if not self.first_body:
            self.first_body = time.perf_counter()
        if len(self.body) < 64:
            self.body.append(body)

    def on_message_complete(self) -> None:
        self.keep_alive = self.parser.should_keep_alive()
        if self.done is not None and not self.done.done():
            self.done.set_result(self.parser.get_status_code())

    async def request(self, raw: bytes) -> int:
        assert self.transport is not None
        self.done = asyncio.get_running_loop().create_future()
        self.first_body = 0.0
        self.body = []
        self.transport.write(raw)
        return await self.done


async def _connect(host: str, port: int) -> Connection:
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_connection(Connection, host, port)
    return proto


async def run_load(
    url: str,
    key: str,
    *,
    stream: bool,
    concurrency: int,
    duration: float,
    warmup: float = 1.0,
    body: bytes | None = None,
    target: str = "",
) -> Result:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    raw = build_request(url, key, body if body is not None else chat_body(stream))
    latencies: list[float] = []
    ttfbs: list[float] = []
    statuses: dict[str, int] = {}
    result = Result(target=target or url, mode="stream" if stream else "json", concurrency=concurrency, duration_s=0)
    start = time.perf_counter()
    window_start = start + warmup
    window_end = window_start + duration

    async def worker() -> None:
        conn: Connection | None = None
        while True:
            now = time.perf_counter()
            if now >= window_end:
                break
            try:
                if conn is None or conn.transport is None or not conn.keep_alive:
                    if conn is not None and conn.transport is not None:
                        conn.transport.close()
                    conn = await _connect(host, port)
                t0 = time.perf_counter()
                status = await conn.request(raw)
                t1 = time.perf_counter()
                if status == 200:
                    result.answered += 1
            except (OSError, ConnectionError) as exc:
                if time.perf_counter() >= window_start:
                    result.errors += 1
                    result.first_error = result.first_error or str(exc)
                conn = None
                await asyncio.sleep(0.01)
                continue
            if t0 < window_start or t1 > window_end:
                continue
            statuses[str(status)] = statuses.get(str(status), 0) + 1
            if status != 200:
                result.errors += 1
                if not result.first_error:
                    result.first_error = f"HTTP {status}: {b''.join(conn.body)[:300].decode(errors='replace')}"
                continue
            latencies.append(t1 - t0)
            if stream:
                ttfbs.append((conn.first_body or t1) - t0)
        if conn is not None and conn.transport is not None:
            conn.transport.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    result.duration_s = duration
    result.requests = len(latencies)
    result.statuses = statuses
    result.rps = round(len(latencies) / duration, 1)
    latencies.sort()
    result.p50_ms = round(percentile(latencies, 0.50) * 1000, 3)
    result.p99_ms = round(percentile(latencies, 0.99) * 1000, 3)
    result.max_ms = round((latencies[-1] if latencies else 0.0) * 1000, 3)
    if stream:
        ttfbs.sort()
        result.ttfb_p50_ms = round(percentile(ttfbs, 0.50) * 1000, 3)
        result.ttfb_p99_ms = round(percentile(ttfbs, 0.99) * 1000, 3)
    return result


def result_dict(result: Result) -> dict[str, Any]:
    return asdict(result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True)
    parser.add_argument("--key", default="")
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--concurrency", "-c", type=int, default=10)
    parser.add_argument("--duration", "-d", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    args = parser.parse_args()
    import uvloop

    result = uvloop.run(
        run_load(
            args.url,
            args.key,
            stream=args.stream,
            concurrency=args.concurrency,
            duration=args.duration,
            warmup=args.warmup,
        )
    )
    print(orjson.dumps(result_dict(result), option=orjson.OPT_INDENT_2).decode())


if __name__ == "__main__":
    main()
