"""``chittycan.http_protocol``: a connection's writes of one loop turn leave as one write, in order;
closing sends what is held first, aborting drops it; a served request still gets its whole answer."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from typing import Any

import uvicorn

from chittycan.http_protocol import CoalescingHttpToolsProtocol, CoalescingTransport


class _Transport:
    """Records what reaches the socket."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.events: list[str] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        self.events.append("write")

    def close(self) -> None:
        self.events.append("close")

    def abort(self) -> None:
        self.events.append("abort")

    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return 0


def _turns(*steps: Any) -> _Transport:
    """Run each step (a function of the coalescing transport) in a loop turn of its own."""
    real = _Transport()

    async def main() -> None:
        wrapped = CoalescingTransport(real, asyncio.get_running_loop())  # type: ignore[arg-type]
        for step in steps:
            step(wrapped)
            await asyncio.sleep(0)
            await asyncio.sleep(0)

    asyncio.run(main())
    return real


def test_a_head_and_body_written_in_one_turn_leave_in_one_write() -> None:
    real = _turns(lambda t: (t.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n"), t.write(b"{}")))
    assert real.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"]


def test_writes_of_later_turns_leave_separately_and_in_order() -> None:
    real = _turns(
        lambda t: (t.write(b"head"), t.write(b"chunk1")),
        lambda t: t.write(b"chunk2"),
        lambda t: t.writelines([b"chunk3", b"", b"end"]),
    )
    assert real.writes == [b"headchunk1", b"chunk2", b"chunk3end"]


def test_close_sends_what_is_held_first_and_abort_drops_it() -> None:
    closed = _turns(lambda t: (t.write(b"bye"), t.close()))
    assert closed.events == ["write", "close"] and closed.writes == [b"bye"]
    aborted = _turns(lambda t: (t.write(b"lost"), t.abort()))
    assert aborted.events == ["abort"] and aborted.writes == []


def test_the_buffer_size_counts_what_is_held() -> None:
    sizes: list[int] = []

    def write_and_measure(t: CoalescingTransport) -> None:
        t.write(b"12345")
        sizes.append(t.get_write_buffer_size())

    _turns(write_and_measure)
    assert sizes == [5]


async def _app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    assert scope["type"] == "http"
    if scope["path"] == "/stream":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        for part in (b"one ", b"two ", b"three"):
            await send({"type": "http.response.body", "body": part, "more_body": True})
            await asyncio.sleep(0.01)
        await send({"type": "http.response.body", "body": b""})
        return
    body = b'{"ok":true}'
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _read_response(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    if b"content-length" in head.lower():
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        while len(body) < length:
            body += sock.recv(65536)
    else:  # chunked: read to the last chunk
        while not body.endswith(b"0\r\n\r\n"):
            body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def test_uvicorn_serves_whole_answers_over_a_kept_alive_connection() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    config = uvicorn.Config(_app, http=CoalescingHttpToolsProtocol, lifespan="off", log_level="critical")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.01)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            for _ in range(3):  # the same connection, one answer after another
                sock.sendall(b"GET /json HTTP/1.1\r\nhost: x\r\n\r\n")
                answer = _read_response(sock)
                assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
                assert answer.endswith(b'\r\n\r\n{"ok":true}')
            sock.sendall(b"GET /stream HTTP/1.1\r\nhost: x\r\n\r\n")
            answer = _read_response(sock)
            assert b"transfer-encoding: chunked" in answer
            assert answer.endswith(b"\r\n\r\n4\r\none \r\n4\r\ntwo \r\n5\r\nthree\r\n0\r\n\r\n")
    finally:
        server.should_exit = True
        thread.join(10)
        listener.close()
