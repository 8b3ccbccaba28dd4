"""Per-unit prices (images, audio minutes, characters), the media formats' worst cases and the
multipart parser, without services."""

from __future__ import annotations

import io
import wave
from decimal import Decimal

import httpx
import pytest

from core import money
from core.money import PriceInfo, Usage
from gateway.context import RequestContext
from gateway.errors import InvalidRequest, PayloadTooLarge
from gateway.formats import IMAGES, SPEECH, TRANSCRIPTIONS, multipart
from gateway.providers import media
from gateway.providers.base import Upload
from tests.conftest import time_zero

PRICE = PriceInfo(
    time_zero(),
    Decimal(0),
    Decimal(0),
    Decimal(0),
    Decimal(0),
    per_image=Decimal("0.04"),
    image_prices=(
        ("1024x1024/hd", Decimal("0.08")),
        ("1024x1024/standard", Decimal("0.04")),
        ("1792x1024", Decimal("0.12")),
    ),
    audio_per_minute=Decimal("0.006"),
    per_mchars=Decimal("15"),
)


def test_image_prices_by_size_and_quality():
    assert PRICE.image_price("1024x1024/hd") == Decimal("0.08")
    assert PRICE.image_price("1792x1024/hd") == Decimal("0.12")  # the size's own entry
    assert PRICE.image_price("512x512/standard") == Decimal("0.04")  # the default
    assert PRICE.image_price("1024x1024/*") == Decimal("0.08")  # the size's dearest quality
    assert PRICE.image_price("640x640/*") == Decimal("0.04")
    assert PRICE.image_price("*") == Decimal("0.12")


def test_unit_costs_round_once():
    assert money.cost_micro(PRICE, Usage(images=3, image_variant="1024x1024/hd")) == 240_000
    assert money.cost_micro(PRICE, Usage(audio_ms=90_000)) == 9_000  # 1.5 min x $0.006
    assert money.cost_micro(PRICE, Usage(audio_ms=1)) == 0  # 0.0001 micro-USD rounds to 0
    assert money.cost_micro(PRICE, Usage(characters=1000)) == 15_000
    # Tokens and units together (a tokens-priced transcription model reports both).
    both = PriceInfo(time_zero(), Decimal(1), Decimal(1), Decimal(1), Decimal(2), audio_per_minute=Decimal("0.6"))
    assert money.cost_micro(both, Usage(prompt_tokens=10, completion_tokens=5, audio_ms=1000)) == 10 + 10 + 10_000


def ctx_with(body: dict) -> RequestContext:
    ctx = RequestContext(request_id="req_x", endpoint="x")
    ctx.body = body
    return ctx


def test_image_worst_case_and_settlement():
    asked = ctx_with({"prompt": "p", "n": 3, "size": "1024x1024"})
    most = IMAGES.most_units(asked)
    assert (most.images, most.image_variant) == (3, "1024x1024/*")
    assert money.cost_micro(PRICE, most) == 240_000
    auto = IMAGES.most_units(ctx_with({"prompt": "p", "size": "auto", "quality": "low"}))
    assert auto.image_variant == "*"
    # Settled on what the answer says it made, else what was asked.
    said = IMAGES.read_result(asked, {"data": [{}, {}], "size": "1024x1024", "quality": "standard"})
    assert (said.images, said.image_variant) == (2, "1024x1024/standard")
    unsaid = IMAGES.read_result(ctx_with({"size": "1024x1024", "quality": "hd"}), {"data": [{}]})
    assert unsaid.image_variant == "1024x1024/hd"
    # Nothing says the quality: the size's own entry (the model's default); nor the size: per_image.
    sized = IMAGES.read_result(ctx_with({"size": "1792x1024"}), {"data": [{}]})
    assert sized.image_variant == "1792x1024" and money.cost_micro(PRICE, sized) == 120_000
    bare = IMAGES.read_result(ctx_with({"size": "auto"}), {"data": [{}, {}]})
    assert bare.image_variant == "" and money.cost_micro(PRICE, bare) == 80_000


def wav_bytes(ms: int) -> bytes:
    return media.wav(ms, rate=8000)


def test_transcription_reserves_the_file_and_settles_what_was_billed(settings):
    settings.CHITTYCAN_MAX_AUDIO_BYTES = 1_000_000
    upload = Upload("a.wav", "audio/wav", wav_bytes(2_300))
    ctx = ctx_with({"model": "w", "file": upload})
    TRANSCRIPTIONS.parse(ctx, ctx.body, {})
    assert media.wav_milliseconds(upload.data) == 2_300
    assert TRANSCRIPTIONS.most_units(ctx).audio_ms == 3_000  # whole seconds, rounded up
    assert TRANSCRIPTIONS.read_result(ctx, {"text": "x", "usage": {"type": "duration", "seconds": 3}}).audio_ms == 3000
    assert TRANSCRIPTIONS.read_result(ctx, {"text": "x", "duration": 2.3}).audio_ms == 2_300
    assert TRANSCRIPTIONS.read_result(ctx, {"text": "x"}).audio_ms == 2_300  # the file's own length
    # Not a WAV: its length is unknown, so the worst case by size (1 kB a second).
    opaque = ctx_with({"model": "w", "file": Upload("a.mp3", "audio/mpeg", b"\xff\xfb" * 2500)})
    assert TRANSCRIPTIONS.most_units(opaque).audio_ms == 5_000
    settings.CHITTYCAN_MAX_AUDIO_BYTES = 100
    with pytest.raises(PayloadTooLarge):
        TRANSCRIPTIONS.parse(ctx, ctx.body, {})


def test_speech_bills_every_character():
    ctx = ctx_with({"model": "t", "input": "Hello", "voice": "alloy"})
    SPEECH.parse(ctx, ctx.body, {})
    assert ctx.stream
    assert SPEECH.most_units(ctx).characters == 5 == SPEECH.stream_tracker(ctx).usage().characters
    assert SPEECH.stream_content_type(ctx, {"audio": b"x"}) == b"audio/mpeg"
    with pytest.raises(InvalidRequest):
        SPEECH.parse(ctx, {"model": "t", "input": "x", "voice": "alloy", "response_format": "ogg"}, {})


def test_multipart_round_trip_is_exact():
    data = bytes(range(256)) * 40 + b"\r\n--not-a-boundary\r\n"
    request = httpx.Request(
        "POST",
        "http://x/",
        data={"model": "whisper-1", "timestamp_granularities[]": ["word", "segment"]},
        files=[("file", ("a b.wav", data, "audio/wav"))],
    )
    form = multipart.parse(request.read(), request.headers["content-type"])
    assert form["model"] == "whisper-1"
    assert form["timestamp_granularities"] == ["word", "segment"]
    assert form["file"] == Upload("a b.wav", "audio/wav", data)
    with pytest.raises(InvalidRequest, match="multipart/form-data"):
        multipart.parse(b"{}", "application/json")
    with pytest.raises(InvalidRequest, match="closing boundary"):
        multipart.parse(b"--b\r\ncontent-disposition: form-data; name=x\r\n\r\n1", "multipart/form-data; boundary=b")


def test_generated_media_are_valid():
    png = media.png(3, 2, "seed")
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and png[16:24] == b"\x00\x00\x00\x03\x00\x00\x00\x02"
    with wave.open(io.BytesIO(media.wav(250)), "rb") as reader:
        assert reader.getnframes() == 2000 and reader.getframerate() == 8000
    assert media.wav_milliseconds(b"not audio") is None
    verdict = media.moderation_result("I will kill it")
    assert verdict["flagged"] and verdict["categories"]["violence"] and not verdict["categories"]["hate"]
