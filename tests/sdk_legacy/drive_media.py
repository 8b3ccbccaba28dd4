"""Drive the gateway's media routes with the pinned openai 2.x SDK and print what it saw as JSON.

Run in a subprocess with ``PYTHONPATH=.venv/openai-legacy`` (see tests/test_media.py), so it never
meets the 3.x SDK of the virtualenv in one interpreter.

    python tests/sdk_legacy/drive_media.py BASE_URL API_KEY IMAGE_MODEL WHISPER_MODEL TTS_MODEL MODERATION_MODEL DIR
"""

from __future__ import annotations

import base64
import io
import json
import math
import struct
import sys
import wave
from pathlib import Path
from typing import Any

import openai


def make_wav(seconds: float, rate: int = 8000) -> bytes:
    frames = int(rate * seconds)
    out = io.BytesIO()
    with wave.open(out, "wb") as writer:
        writer.setnchannels(1)
        writer.setsampwidth(2)
        writer.setframerate(rate)
        writer.writeframes(struct.pack(f"<{frames}h", *(int(9000 * math.sin(i / 5)) for i in range(frames))))
    return out.getvalue()


def main(
    base_url: str, api_key: str, image: str, whisper: str, tts: str, moderation: str, folder: str
) -> dict[str, Any]:
    client: Any = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0)  # typed by 3.x stubs
    picture = client.images.generate(model=image, prompt="a boat", size="1024x1024", response_format="b64_json")
    text = client.audio.transcriptions.create(model=whisper, file=("memo.wav", make_wav(3.0), "audio/wav"))
    target = Path(folder) / "speech.wav"
    with client.audio.speech.with_streaming_response.create(
        model=tts, voice="alloy", input="Hello", response_format="wav"
    ) as speech:
        content_type = speech.headers["content-type"]
        speech.stream_to_file(target)
    verdict = client.moderations.create(model=moderation, input=["I hate this", "fine"])
    return {
        "version": openai.__version__,
        "png": base64.b64decode(picture.data[0].b64_json)[:8].hex(),
        "transcript": text.text,
        "speech_type": content_type,
        "speech_riff": target.read_bytes()[:4].decode("latin-1"),
        "flagged": [r.flagged for r in verdict.results],
    }


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:8])))
