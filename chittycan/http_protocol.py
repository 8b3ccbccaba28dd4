"""uvicorn's httptools protocol, with a connection's writes of one event-loop turn sent together.

An ASGI response is two messages at least (``http.response.start``, then the body), and uvicorn
writes each to the socket as it comes: two ``send`` calls for every JSON answer. On loopback the
sender's CPU pays for the receiver's TCP work too, so each costs tens of microseconds, a few per
cent of a gateway's CPU per request. Here the writes a connection makes during one turn of the
event loop are joined and sent at the end of it (``call_soon``): the head and body of a JSON
answer leave in one ``send``, a stream's chunks as they come (one turn later, microseconds).
Order is kept; closing the connection sends what is held first, aborting it drops it.

``can serve`` passes it to uvicorn as ``--http chittycan.http_protocol:CoalescingHttpToolsProtocol``.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class CoalescingTransport:
    """A transport that holds what is written during one loop turn and sends it as one write.
    Everything else (``close`` after a flush) goes to the real transport."""

    __slots__ = ("_held", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        if not self._held:
            self._loop.call_soon(self.flush)
        self._held.append(bytes(data))

    def writelines(self, chunks: Any) -> None:
        for chunk in chunks:
            self.write(chunk)

    def flush(self) -> None:
        if self._held:
            data = self._held[0] if len(self._held) == 1 else b"".join(self._held)
            self._held.clear()
            self._transport.write(data)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def abort(self) -> None:
        self._held.clear()  # an abort sends nothing more
        self._transport.abort()

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + sum(len(chunk) for chunk in self._held)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class CoalescingHttpToolsProtocol(HttpToolsProtocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(CoalescingTransport(transport, self.loop))  # type: ignore[arg-type]
