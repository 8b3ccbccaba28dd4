"""The OpenAI media wire formats: images (generations and edits), audio (transcriptions and
speech) and moderations. See docs/media.md.

What they bill is priced per unit, not (only) per token: images by size and quality, audio by the
minute, speech by the character. ``most_units`` is the worst case the reserve stage reserves before
the call (``n`` images at the dearest price the request allows, the uploaded file's whole length,
every character); ``read_result`` (or the speech tracker) is what is settled after it.
"""

from __future__ import annotations

import math
from typing import Any

from django.conf import settings

from core import money
from core.money import Usage
from gateway import tokens
from gateway.context import RequestContext
from gateway.errors import GatewayError, InvalidRequest, PayloadTooLarge
from gateway.formats import multipart
from gateway.formats.base import Json, StreamTracker, WireFormat
from gateway.providers import media
from gateway.providers.base import Operation, Upload

#: A file whose length cannot be read (not WAV) is reserved as if it held one second of audio
#: per this many bytes: 8 kbit/s, below any speech codec's usual rate, so the reservation covers it.
WORST_BYTES_PER_SECOND = 1000

MAX_IMAGES = 10
MAX_SPEECH_CHARS = 4096
SPEECH_FORMATS = {
    "mp3": b"audio/mpeg",
    "opus": b"audio/ogg",
    "aac": b"audio/aac",
    "flac": b"audio/flac",
    "wav": b"audio/wav",
    "pcm": b"audio/pcm",
}
TRANSCRIPTION_FORMATS = ("json", "verbose_json")


def _user(ctx: RequestContext, data: Json) -> None:
    user = data.get("user")
    ctx.end_user = user if isinstance(user, str) else ""


def _text(data: Json, name: str, *, required: bool = False) -> str | None:
    value = data.get(name)
    if value is None:
        if required:
            raise InvalidRequest(f"{name}: is required", param=name)
        return None
    if not isinstance(value, str):
        raise InvalidRequest(f"{name}: must be a string", param=name)
    return value


def _form_int(data: Json, name: str, low: int, high: int, default: int) -> int:
    """An integer field of a JSON body or a form (where it arrives as text), within bounds."""
    value = data.get(name)
    if value is None:
        return default
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
        data[name] = value
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise InvalidRequest(f"{name}: must be an integer from {low} to {high}", param=name)
    return value


def _named(value: Any) -> str | None:
    """A size or quality the request or answer names (``auto`` and empty name none)."""
    return value if isinstance(value, str) and value and value != "auto" else None


class _Media(WireFormat):
    cacheable = False

    def prompt_tokens(self, ctx: RequestContext) -> int:
        return 0  # billed per unit (most_units); the prompt is not tokens to the upstream's price


# --- images -----------------------------------------------------------------------------------


class ImagesFormat(_Media):
    """``POST /v1/images/generations``: per image, by size and quality."""

    endpoint = "images"
    operation = Operation.IMAGES
    kinds = ("image",)

    def parse(self, ctx: RequestContext, data: Json, headers: dict[bytes, bytes]) -> None:
        prompt = _text(data, "prompt", required=True)
        if not prompt:
            raise InvalidRequest("prompt: must not be empty", param="prompt")
        self.check_options(data)
        _user(ctx, data)

    def check_options(self, data: Json) -> None:
        _form_int(data, "n", 1, MAX_IMAGES, 1)
        for name in ("size", "quality", "style", "background", "output_format", "moderation"):
            _text(data, name)
        fmt = _text(data, "response_format")
        if fmt is not None and fmt not in ("url", "b64_json"):
            raise InvalidRequest("response_format: must be 'url' or 'b64_json'", param="response_format")
        if data.get("stream") not in (None, False, "false"):
            raise InvalidRequest("stream: streamed image generation is not supported", param="stream")

    @staticmethod
    def variant(size: Any, quality: Any) -> str:
        """The price key: ``size/quality``; ``*`` where the model picks (``auto`` or absent)."""
        size = size if isinstance(size, str) and size and size != "auto" else "*"
        if size == "*":
            return "*"
        quality = quality if isinstance(quality, str) and quality and quality != "auto" else "*"
        return f"{size}/{quality}"

    def most_units(self, ctx: RequestContext) -> Usage:
        body = ctx.body
        n = int(body.get("n") or 1)
        return Usage(images=n, image_variant=self.variant(body.get("size"), body.get("quality")), source="estimated")

    def read_result(self, ctx: RequestContext, result: Json) -> Usage:
        data = result.get("data")
        images = len(data) if isinstance(data, list) else 0
        # Billed per image as produced: the answer's size and quality where it says (gpt-image-1
        # does), else what was asked; neither: the model's default, which the price table gives as
        # the size's own entry (``"1024x1024"``), or ``per_image`` when the size is unknown too.
        size, quality = (_named(result.get(k)) or _named(ctx.body.get(k)) for k in ("size", "quality"))
        variant = "" if size is None else size if quality is None else f"{size}/{quality}"
        return Usage(images=images, image_variant=variant)


class ImageEditsFormat(ImagesFormat):
    """``POST /v1/images/edits`` (multipart: ``image`` or ``image[]``, an optional ``mask``)."""

    operation = Operation.IMAGE_EDITS

    def decode(self, body: bytes, headers: dict[bytes, bytes]) -> Json:
        return multipart.parse(body, headers.get(b"content-type", b"").decode("latin-1"))

    def parse(self, ctx: RequestContext, data: Json, headers: dict[bytes, bytes]) -> None:
        images = data.get("image")
        files = images if isinstance(images, list) else [images]
        if images is None or not all(isinstance(f, Upload) for f in files):
            raise InvalidRequest("image: one or more image files are required", param="image")
        if "mask" in data and not isinstance(data["mask"], Upload):
            raise InvalidRequest("mask: must be an image file", param="mask")
        super().parse(ctx, data, headers)


# --- audio ------------------------------------------------------------------------------------


def _audio_ms(upload: Upload) -> tuple[int, bool]:
    """(milliseconds, exact): a WAV's length read from its header, else the worst case by size."""
    exact = media.wav_milliseconds(upload.data)
    if exact is not None:
        return exact, True
    return math.ceil(len(upload.data) * 1000 / WORST_BYTES_PER_SECOND), False


class TranscriptionsFormat(_Media):
    """``POST /v1/audio/transcriptions`` (multipart, the file capped at ``CHITTYCAN_MAX_AUDIO_BYTES``):
    per minute of audio."""

    endpoint = "transcriptions"
    operation = Operation.TRANSCRIPTIONS
    kinds = ("transcription",)

    def body_limit(self) -> int:
        return int(settings.CHITTYCAN_MAX_AUDIO_BYTES) + 64 * 1024  # the file and its form fields

    def decode(self, body: bytes, headers: dict[bytes, bytes]) -> Json:
        return multipart.parse(body, headers.get(b"content-type", b"").decode("latin-1"))

    def parse(self, ctx: RequestContext, data: Json, headers: dict[bytes, bytes]) -> None:
        upload = data.get("file")
        if not isinstance(upload, Upload):
            raise InvalidRequest("file: an audio file is required", param="file")
        if not upload.data:
            raise InvalidRequest("file: the audio file is empty", param="file")
        limit = int(settings.CHITTYCAN_MAX_AUDIO_BYTES)
        if len(upload.data) > limit:
            raise PayloadTooLarge(f"file: the audio file exceeds the {limit} byte limit.", param="file")
        fmt = data.get("response_format") or "json"
        if fmt not in TRANSCRIPTION_FORMATS:
            raise InvalidRequest(
                f"response_format: {fmt!r} is not supported here; use 'json' or 'verbose_json'",
                param="response_format",
            )
        if data.get("stream") not in (None, "false"):
            raise InvalidRequest("stream: streamed transcription is not supported", param="stream")
        for name in ("language", "prompt", "temperature"):
            _text(data, name)
        _user(ctx, data)

    def most_units(self, ctx: RequestContext) -> Usage:
        ms, _ = _audio_ms(ctx.body["file"])
        # Upstreams bill whole seconds: reserve the length rounded up to one.
        return Usage(audio_ms=math.ceil(ms / 1000) * 1000, source="estimated")

    def read_result(self, ctx: RequestContext, result: Json) -> Usage:
        ms, exact = _audio_ms(ctx.body["file"])
        usage = Usage(audio_ms=ms, source="upstream" if exact else "estimated")
        reported = result.get("usage")
        if isinstance(reported, dict) and reported.get("type") == "duration":
            seconds = reported.get("seconds")
            if isinstance(seconds, (int, float)) and not isinstance(seconds, bool) and seconds >= 0:
                usage.audio_ms, usage.source = math.ceil(seconds * 1000), "upstream"
        elif isinstance(reported, dict) and reported.get("type") == "tokens":
            usage.prompt_tokens = int(reported.get("input_tokens") or 0)
            usage.completion_tokens = int(reported.get("output_tokens") or 0)
        duration = result.get("duration")  # verbose_json
        if not isinstance(reported, dict) and isinstance(duration, (int, float)) and not isinstance(duration, bool):
            usage.audio_ms, usage.source = math.ceil(duration * 1000), "upstream"
        return usage


class SpeechTracker(StreamTracker):
    """The speech's bytes, relayed as they come; billed per character of the input."""

    def frame(self, item: Json) -> bytes | None:
        audio = item.get("audio")
        return audio if isinstance(audio, bytes) and audio else None

    def usage(self) -> Usage:
        return Usage(characters=len(self.ctx.body["input"]))

    def error_frame(self, err: GatewayError) -> bytes:
        return b""  # binary audio has no in-band error: the body ends short (the ledger row says why)

    def closing(self, cost_usd: str) -> bytes:
        return b""


class SpeechFormat(_Media):
    """``POST /v1/audio/speech``: the audio streamed as it is synthesised; per character."""

    endpoint = "speech"
    operation = Operation.SPEECH
    kinds = ("speech",)

    def parse(self, ctx: RequestContext, data: Json, headers: dict[bytes, bytes]) -> None:
        text = _text(data, "input", required=True)
        if not text:
            raise InvalidRequest("input: must not be empty", param="input")
        if len(text) > MAX_SPEECH_CHARS:
            raise InvalidRequest(f"input: must be at most {MAX_SPEECH_CHARS} characters", param="input")
        voice = data.get("voice")
        if not isinstance(voice, (str, dict)) or not voice:
            raise InvalidRequest("voice: is required", param="voice")
        fmt = data.get("response_format", "mp3")
        if fmt not in SPEECH_FORMATS:
            raise InvalidRequest(
                f"response_format: must be one of {', '.join(SPEECH_FORMATS)}", param="response_format"
            )
        speed = data.get("speed")
        if speed is not None and (
            not isinstance(speed, (int, float)) or isinstance(speed, bool) or not 0.25 <= speed <= 4
        ):
            raise InvalidRequest("speed: must be a number from 0.25 to 4.0", param="speed")
        if data.get("stream_format") not in (None, "audio"):
            raise InvalidRequest("stream_format: only 'audio' is supported", param="stream_format")
        _text(data, "instructions")
        ctx.stream = True  # always relayed as it arrives
        _user(ctx, data)

    def most_units(self, ctx: RequestContext) -> Usage:
        return Usage(characters=len(ctx.body["input"]), source="estimated")

    def read_result(self, ctx: RequestContext, result: Json) -> Usage:
        return Usage(characters=len(ctx.body["input"]))

    def stream_tracker(self, ctx: RequestContext) -> StreamTracker:
        return SpeechTracker(ctx)

    def stream_content_type(self, ctx: RequestContext, first: Json) -> bytes:
        said = first.get("content_type")
        if isinstance(said, str) and said.isprintable():
            return said.encode("latin-1", "replace")
        return SPEECH_FORMATS[str(ctx.body.get("response_format", "mp3"))]

    def success_headers(self, ctx: RequestContext) -> list[tuple[bytes, bytes]]:
        headers = super().success_headers(ctx)
        # Known before the first byte: the price of every character (the headers go first).
        assert ctx.route is not None
        cost = money.cost_micro(ctx.route.price_at(), self.read_result(ctx, {}))
        headers.append((b"x-chittycan-cost", money.format_usd(cost).encode()))
        return headers


# --- moderations ------------------------------------------------------------------------------


def _moderation_texts(raw: Any) -> list[str]:
    items = raw if isinstance(raw, list) else [raw]
    if not items:
        raise InvalidRequest("input: must not be empty", param="input")
    texts = []
    for item in items:
        if isinstance(item, str):
            texts.append(item)
        elif isinstance(item, dict) and item.get("type") == "text" and isinstance(item.get("text"), str):
            texts.append(item["text"])
        elif isinstance(item, dict) and item.get("type") == "image_url":
            continue
        else:
            raise InvalidRequest("input: must be a string, a list of strings or of text/image_url parts", param="input")
    return texts


class ModerationsFormat(_Media):
    """``POST /v1/moderations``: priced per input token (free at OpenAI; a price applies if set)."""

    endpoint = "moderations"
    operation = Operation.MODERATIONS
    kinds = ("moderation",)
    DEFAULT_MODEL = "omni-moderation-latest"

    def decode(self, body: bytes, headers: dict[bytes, bytes]) -> Json:
        data = super().decode(body, headers)
        data.setdefault("model", self.DEFAULT_MODEL)  # optional in OpenAI's API
        return data

    def parse(self, ctx: RequestContext, data: Json, headers: dict[bytes, bytes]) -> None:
        if "input" not in data:
            raise InvalidRequest("input: is required", param="input")
        _moderation_texts(data["input"])

    def prompt_tokens(self, ctx: RequestContext) -> int:
        return sum(tokens.count_text(t, ctx.requested_model) for t in _moderation_texts(ctx.body["input"]))

    def read_result(self, ctx: RequestContext, result: Json) -> Usage:
        return Usage(prompt_tokens=ctx.estimated_prompt_tokens, source="estimated")


IMAGES = ImagesFormat()
IMAGE_EDITS = ImageEditsFormat()
TRANSCRIPTIONS = TranscriptionsFormat()
SPEECH = SpeechFormat()
MODERATIONS = ModerationsFormat()
