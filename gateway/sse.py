"""Server-sent events: an incremental parser for upstream streams and the frame encoders."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import orjson

DONE_FRAME = b"data: [DONE]\n\n"


@dataclass(slots=True)
class Event:
    event: str | None
    data: str


async def parse_events(chunks: AsyncIterator[bytes]) -> AsyncIterator[Event]:
    """Yield complete events from a byte stream; comment lines (``: ping``) are skipped.

    Handles frames split anywhere, including inside a multi-byte character, and ``\\r\\n`` endings.
    """
    buffer = b""
    event: str | None = None
    data: list[str] = []
    async for chunk in chunks:
        buffer += chunk
        while True:
            nl = buffer.find(b"\n")
            if nl < 0:
                break
            raw, buffer = buffer[:nl], buffer[nl + 1 :]
            line = raw.rstrip(b"\r").decode("utf-8")
            if not line:
                if data:
                    yield Event(event, "\n".join(data))
                event, data = None, []
                continue
            if line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            if value.startswith(" "):
                value = value[1:]
            if name == "data":
                data.append(value)
            elif name == "event":
                event = value
    if data:
        yield Event(event, "\n".join(data))


def data_frame(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def event_frame(name: str, obj: Any) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(obj) + b"\n\n"
