"""The shared upstream HTTP client (gateway/http.py) against a raw loopback server: what the
transports do with a response body that is cut mid-way."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from gateway import http

FRAMES = (b'data: {"n": 1}\n\n', b'data: {"n": 2}\n\n', b'data: {"n": 3}\n\n')


async def _cut_stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answer with a chunked event stream, send three frames and close without the last chunk."""
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
    await writer.drain()
    await asyncio.sleep(0.05)  # the headers reach the client before the body
    for frame in FRAMES:
        writer.write(b"%x\r\n%s\r\n" % (len(frame), frame))
    writer.close()


async def _read_late(url: str) -> tuple[bytes, BaseException | None]:
    received: list[bytes] = []
    failure: BaseException | None = None
    try:
        async with http.client().stream("POST", url, content=b"{}") as response:
            assert response.status_code == 200
            await asyncio.sleep(0.3)  # a busy gateway: the frames and the cut both arrive before it reads
            try:
                async for chunk in response.aiter_bytes():
                    received.append(chunk)
            except httpx.HTTPError as exc:
                failure = exc
    finally:
        await http.aclose()
    return b"".join(received), failure


@pytest.mark.parametrize("transport", ["aiohttp", "httpx"])
def test_a_cut_stream_yields_every_byte_sent_before_the_cut_then_fails(settings, transport):
    """A reset after some frames: the frames that arrived are read (the client sees the text the
    upstream billed for), then the read fails (the relay ends the stream with an error)."""
    settings.CHITTYCAN_HTTP_TRANSPORT = transport

    async def main() -> tuple[bytes, BaseException | None]:
        server = await asyncio.start_server(_cut_stream, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            return await _read_late(f"http://127.0.0.1:{port}/v1/chat/completions")

    body, failure = asyncio.run(main())
    assert body == b"".join(FRAMES)
    assert isinstance(failure, httpx.HTTPError)


def test_the_aiohttp_client_loads_one_set_of_ca_certificates(settings, monkeypatch):
    """Each TLS context holds its own copy of the CA bundle (~1.9 MiB for certifi's): the httpx
    face and the aiohttp session under it share one, and requests use it."""
    settings.CHITTYCAN_HTTP_TRANSPORT = "aiohttp"
    built: list[object] = []
    real = httpx.create_ssl_context

    def counting(*args: object, **kwargs: object) -> object:
        made = real(*args, **kwargs)  # type: ignore[arg-type]
        if made not in built:
            built.append(made)
        return made

    monkeypatch.setattr(httpx, "create_ssl_context", counting)

    async def main() -> tuple[object, object]:
        try:
            client = http.client()
            session = http.aiohttp_session()
            assert session is not None
            transport = client._transport
            return transport.ssl_context, session.connector._ssl  # type: ignore[attr-defined,union-attr]
        finally:
            await http.aclose()

    transport_tls, session_tls = asyncio.run(main())
    assert len(built) == 1
    assert transport_tls is session_tls is built[0]
