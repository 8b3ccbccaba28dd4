"""Small offline media: the PNG, WAV and moderation verdicts the mock provider serves, and the
length of an uploaded WAV (the transcription's exact reservation and settlement)."""

from __future__ import annotations

import hashlib
import io
import math
import struct
import wave
import zlib
from typing import Any

#: The moderation categories OpenAI reports, with words that flag each in the mock.
MODERATION_CATEGORIES: dict[str, tuple[str, ...]] = {
    "harassment": ("idiot", "loser"),
    "harassment/threatening": ("i will find you",),
    "hate": ("hate",),
    "hate/threatening": (),
    "illicit": ("steal", "counterfeit"),
    "illicit/violent": ("build a bomb",),
    "self-harm": ("hurt myself",),
    "self-harm/intent": ("want to die",),
    "self-harm/instructions": (),
    "sexual": ("explicit",),
    "sexual/minors": (),
    "violence": ("kill", "attack"),
    "violence/graphic": ("gore",),
}


def png(width: int, height: int, seed: str) -> bytes:
    """A valid RGB PNG of ``width`` x ``height``: a gradient whose colours come from ``seed``."""
    r0, g0, b0 = hashlib.sha256(seed.encode()).digest()[:3]
    rows = bytearray()
    for y in range(height):
        rows.append(0)  # filter: none
        for x in range(width):
            rows += bytes(((r0 + x * 4) % 256, (g0 + y * 4) % 256, (b0 + (x + y) * 2) % 256))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(bytes(rows))) + chunk(b"IEND", b"")
    )


def wav(milliseconds: int, rate: int = 8000, pitch: float = 440.0) -> bytes:
    """A mono 16-bit WAV of a sine tone lasting ``milliseconds``."""
    frames = rate * milliseconds // 1000
    samples = struct.pack(f"<{frames}h", *(int(8000 * math.sin(2 * math.pi * pitch * i / rate)) for i in range(frames)))
    out = io.BytesIO()
    with wave.open(out, "wb") as writer:
        writer.setnchannels(1)
        writer.setsampwidth(2)
        writer.setframerate(rate)
        writer.writeframes(samples)
    return out.getvalue()


def wav_milliseconds(data: bytes) -> int | None:
    """The length of a WAV file in milliseconds (rounded up), or None if ``data`` is not one."""
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return None
    try:
        with wave.open(io.BytesIO(data), "rb") as reader:
            frames, rate = reader.getnframes(), reader.getframerate()
    except (wave.Error, EOFError, struct.error):
        return None
    if rate <= 0:
        return None
    return math.ceil(frames * 1000 / rate)


def moderation_result(text: str) -> dict[str, Any]:
    """One moderation verdict: a category is flagged when the text holds one of its words."""
    lowered = text.lower()
    categories = {name: any(word in lowered for word in words) for name, words in MODERATION_CATEGORIES.items()}
    digest = hashlib.sha256(text.encode()).digest()
    scores = {
        name: (0.9 + digest[i] / 2560) if hit else digest[i] / 25600 for i, (name, hit) in enumerate(categories.items())
    }
    return {
        "flagged": any(categories.values()),
        "categories": categories,
        "category_scores": scores,
        "category_applied_input_types": {name: ["text"] for name in categories},
    }
