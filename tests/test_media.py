"""The media routes, driven by the official openai SDK: images (generations and edits), audio
transcriptions (a real WAV made here) and speech (streamed to a file), moderations; their prices
per image, minute and character; ledger rows and cost headers; hard budgets under concurrency."""

from __future__ import annotations

import base64
import io
import math
import struct
import wave
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal

import httpx
import openai
import pytest
import yaml
from django.core.management import call_command
from django.core.management.base import CommandError

from tests.conftest import add_model, exact_usage, wait_usage
from tests.fakes.openai_upstream import FakeOpenAI

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def make_wav(seconds: float, rate: int = 16_000) -> bytes:
    """A real mono 16-bit WAV file of a 440 Hz tone."""
    frames = int(rate * seconds)
    out = io.BytesIO()
    with wave.open(out, "wb") as writer:
        writer.setnchannels(1)
        writer.setsampwidth(2)
        writer.setframerate(rate)
        writer.writeframes(struct.pack(f"<{frames}h", *(int(9000 * math.sin(i / 5)) for i in range(frames))))
    return out.getvalue()


def set_price(model, **fields) -> None:
    price = model.prices.get()
    for name, value in fields.items():
        setattr(price, name, value)
    price.save()


@pytest.fixture
def media(upstream: FakeOpenAI) -> FakeOpenAI:
    """Image, transcription, speech and moderation models on the fake OpenAI upstream, priced per unit."""
    from gateway.models import Provider

    provider = Provider.objects.get(slug="fake-openai")
    zero = ("0", "0", "0")
    dalle = add_model("dall-e-3", provider, kind="image", prices=zero)
    set_price(
        dalle,
        per_image=Decimal("0.04"),
        image_prices={"1024x1024/standard": "0.04", "1024x1024/hd": "0.08", "1792x1024/hd": "0.12"},
    )
    gpt_image = add_model("gpt-image-1", provider, kind="image", prices=zero)
    set_price(
        gpt_image,
        image_prices={"1024x1024/low": "0.011", "1024x1024/high": "0.167", "1536x1024/high": "0.25"},
    )
    set_price(add_model("whisper-1", provider, kind="transcription", prices=zero), audio_per_minute=Decimal("0.006"))
    set_price(add_model("tts-1", provider, kind="speech", prices=zero), per_mchars=Decimal("15.00"))
    add_model("omni-moderation-latest", provider, kind="moderation", prices=("0.10", "0.10", "0"))
    return upstream


# --- images -----------------------------------------------------------------------------------


def test_image_generation_b64_priced_by_size_and_quality(media, openai_client, tenant_key):
    res = openai_client.images.with_raw_response.generate(
        model="dall-e-3", prompt="a lighthouse", n=2, size="1024x1024", quality="hd", response_format="b64_json"
    )
    result = res.parse()
    assert len(result.data) == 2
    assert base64.b64decode(result.data[0].b64_json).startswith(PNG_SIGNATURE)
    sent = media.requests[-1]
    assert sent.path == "/v1/images/generations"
    assert sent.body["model"] == "dall-e-3" and sent.body["n"] == 2 and sent.body["quality"] == "hd"
    assert res.headers["x-chittycan-cost"] == "0.160000"  # 2 x $0.08
    [row] = exact_usage(tenant_key[0], 1)
    assert (row.endpoint, row.cost_micro, row.status, row.requested_model) == ("images", 160_000, "ok", "dall-e-3")
    assert (row.images, row.audio_ms, row.characters, row.prompt_tokens) == (2, 0, 0, 0)


def test_image_generation_url_and_default_price(media, openai_client, tenant_key):
    res = openai_client.images.with_raw_response.generate(
        model="dall-e-3", prompt="a cat", size="1024x1792", quality="standard", response_format="url"
    )
    assert res.parse().data[0].url == "https://images.fake.example/img-0.png"
    # 1024x1792 has no entry of its own: the model's default price per image.
    assert res.headers["x-chittycan-cost"] == "0.040000"
    [row] = exact_usage(tenant_key[0], 1)
    assert row.cost_micro == 40_000


def test_gpt_image_auto_size_is_settled_at_what_the_upstream_made(media, openai_client, tenant_key):
    res = openai_client.images.with_raw_response.generate(model="gpt-image-1", prompt="a map", size="auto")
    assert res.parse().data[0].b64_json
    assert res.headers["x-chittycan-cost"] == "0.167000"  # the answer says 1024x1024, high
    [row] = exact_usage(tenant_key[0], 1)
    assert row.cost_micro == 167_000


def test_auto_size_reserves_the_dearest_picture(media, gateway_server, make_tenant, make_key):
    """$0.20 would pay for the 1024x1024 high the model will make ($0.167), but not for the
    1536x1024 high it might ($0.25): refused before the call, nothing reaches the upstream."""
    from budgets import services

    tenant = make_tenant("tight")
    services.budget_set(tenant=tenant, period="month", limit_micro=200_000, hard=True)
    client = openai.OpenAI(base_url=f"{gateway_server.url}/v1", api_key=make_key(tenant), max_retries=0)
    with pytest.raises(openai.APIStatusError) as exc:
        client.images.generate(model="gpt-image-1", prompt="a map", size="auto")
    assert exc.value.status_code == 402 and exc.value.code == "insufficient_quota"
    assert "may cost up to $0.25" in exc.value.message
    assert media.requests == []
    # A size and quality named: reserved at their price, admitted.
    client.images.generate(model="gpt-image-1", prompt="a map", size="1024x1024", quality="high")
    [row] = exact_usage(tenant, 1)
    assert row.cost_micro == 167_000


def test_image_edit_multipart(media, openai_client, tenant_key):
    picture = FakeOpenAI.PNG
    res = openai_client.images.with_raw_response.edit(
        model="gpt-image-1",
        image=("in.png", picture, "image/png"),
        prompt="add a hat",
        size="1024x1024",
        quality="low",
    )
    assert res.parse().data[0].b64_json
    sent = media.requests[-1]
    assert sent.path == "/v1/images/edits"
    assert sent.body["image"] == ("in.png", picture, "image/png")  # the file's bytes, unchanged
    assert sent.body["prompt"] == "add a hat" and sent.body["model"] == "gpt-image-1"
    assert res.headers["x-chittycan-cost"] == "0.011000"
    [row] = exact_usage(tenant_key[0], 1)
    assert (row.endpoint, row.cost_micro) == ("images", 11_000)


def test_image_errors_in_the_openai_envelope(media, gateway_server, tenant_key):
    url = f"{gateway_server.url}/v1/images/generations"
    auth = {"authorization": f"Bearer {tenant_key[1]}"}
    for body, param in (
        ({"model": "dall-e-3"}, "prompt"),
        ({"model": "dall-e-3", "prompt": "x", "n": 11}, "n"),
        ({"model": "dall-e-3", "prompt": "x", "response_format": "gif"}, "response_format"),
        ({"model": "gpt-4o", "prompt": "x"}, None),  # a chat model does not draw
    ):
        res = httpx.post(url, json=body, headers=auth)
        assert res.status_code in (400, 404), (body, res.text)
        error = res.json()["error"]
        assert error["type"] == "invalid_request_error" and error["message"]
        if param:
            assert error["param"] == param
    edit = httpx.post(f"{gateway_server.url}/v1/images/edits", json={"model": "gpt-image-1"}, headers=auth)
    assert edit.status_code == 400 and edit.json()["error"]["code"] == "invalid_content_type"
    assert media.requests == []


# --- audio ------------------------------------------------------------------------------------


def test_transcription_of_a_real_wav(media, openai_client, tenant_key):
    audio = make_wav(1.5)
    res = openai_client.audio.transcriptions.with_raw_response.create(
        model="whisper-1", file=("hello.wav", audio, "audio/wav"), language="en"
    )
    assert res.parse().text == "Transcribed hello.wav."
    sent = media.requests[-1]
    assert sent.path == "/v1/audio/transcriptions"
    assert sent.body["file"] == ("hello.wav", audio, "audio/wav") and sent.body["language"] == "en"
    assert sent.headers["content-type"].startswith("multipart/form-data")
    # The upstream bills 2 whole seconds at $0.006 a minute: $0.0002.
    assert res.headers["x-chittycan-cost"] == "0.000200"
    [row] = exact_usage(tenant_key[0], 1)
    assert (row.endpoint, row.cost_micro, row.usage_source) == ("transcriptions", 200, "upstream")
    assert row.audio_ms == 2_000  # what the upstream billed: whole seconds


def test_transcription_verbose_json(media, openai_client):
    result = openai_client.audio.transcriptions.create(
        model="whisper-1", file=("a.wav", make_wav(0.5), "audio/wav"), response_format="verbose_json"
    )
    assert result.duration == 0.5 and result.text == "Transcribed a.wav."


def test_transcription_limits_and_errors(media, gateway_server, openai_client, tenant_key, settings):
    settings.CHITTYCAN_MAX_AUDIO_BYTES = 10_000
    with pytest.raises(openai.APIStatusError) as exc:
        openai_client.audio.transcriptions.create(model="whisper-1", file=("big.wav", make_wav(1.0), "audio/wav"))
    assert exc.value.status_code == 413 and exc.value.code == "request_too_large"
    assert "10000 byte limit" in exc.value.message
    with pytest.raises(openai.BadRequestError) as bad:
        openai_client.audio.transcriptions.create(
            model="whisper-1", file=("a.wav", make_wav(0.1), "audio/wav"), response_format="srt"
        )
    assert bad.value.param == "response_format"
    url = f"{gateway_server.url}/v1/audio/transcriptions"
    auth = {"authorization": f"Bearer {tenant_key[1]}"}
    as_json = httpx.post(url, json={"model": "whisper-1"}, headers=auth)
    assert as_json.status_code == 400 and as_json.json()["error"]["code"] == "invalid_content_type"
    no_file = httpx.post(url, data={"model": "whisper-1"}, files={"x": ("n.txt", b"")}, headers=auth)
    assert no_file.status_code == 400 and no_file.json()["error"]["param"] == "file"
    assert media.requests == []


def test_speech_streamed_to_a_file(media, openai_client, tenant_key, tmp_path):
    text = "Hello from the gateway."
    target = tmp_path / "speech.mp3"
    with openai_client.audio.speech.with_streaming_response.create(model="tts-1", voice="alloy", input=text) as res:
        assert res.headers["content-type"] == "audio/mpeg"
        assert res.headers["x-chittycan-cost"] == f"{Decimal(15 * len(text)) / 1_000_000:.6f}"
        res.stream_to_file(target)
    assert target.read_bytes() == FakeOpenAI.speech_audio({"input": text})  # every byte, in order
    assert media.requests[-1].body == {"model": "tts-1", "voice": "alloy", "input": text}
    [row] = exact_usage(tenant_key[0], 1)
    assert (row.endpoint, row.cost_micro, row.stream, row.status) == ("speech", 15 * len(text), True, "ok")
    assert row.characters == len(text)


def test_speech_errors(media, openai_client):
    with pytest.raises(openai.BadRequestError) as exc:
        openai_client.audio.speech.create(model="tts-1", voice="alloy", input="")
    assert exc.value.param == "input"
    with pytest.raises(openai.BadRequestError) as exc:
        openai_client.audio.speech.create(model="tts-1", voice="alloy", input="x" * 4097)
    assert exc.value.param == "input"
    assert media.requests == []


# --- moderations ------------------------------------------------------------------------------


def test_moderations(media, openai_client, tenant_key):
    res = openai_client.moderations.with_raw_response.create(input=["I will kill the process", "good morning"])
    result = res.parse()
    assert [r.flagged for r in result.results] == [True, False]
    assert result.results[0].categories.violence is True
    assert media.requests[-1].body["model"] == "omni-moderation-latest"  # the API's default model
    [row] = exact_usage(tenant_key[0], 1)
    assert row.endpoint == "moderations" and row.prompt_tokens > 0 and row.usage_source == "estimated"
    assert res.headers["x-chittycan-cost"] == f"{Decimal(row.cost_micro) / 1_000_000:.6f}"


# --- the mock provider serves them all offline -------------------------------------------------


def test_mock_provider_serves_every_media_route(transactional_db, gateway_server, tenant_key, tmp_path):
    from gateway.models import Provider

    mock = Provider.objects.create(slug="mock-media", kind="mock")
    set_price(add_model("mock-image", mock, kind="image", prices=("0", "0", "0")), per_image=Decimal("0.01"))
    set_price(
        add_model("mock-whisper", mock, kind="transcription", prices=("0", "0", "0")), audio_per_minute=Decimal("0.6")
    )
    set_price(add_model("mock-tts", mock, kind="speech", prices=("0", "0", "0")), per_mchars=Decimal("30"))
    add_model("mock-moderation", mock, kind="moderation", prices=("0", "0", "0"))
    client = openai.OpenAI(base_url=f"{gateway_server.url}/v1", api_key=tenant_key[1], max_retries=0)

    image = client.images.generate(model="mock-image", prompt="a boat", size="1024x1024", n=2)
    assert image.data is not None and len(image.data) == 2
    assert base64.b64decode(image.data[1].b64_json or "").startswith(PNG_SIGNATURE)
    edited = client.images.edit(model="mock-image", image=("a.png", FakeOpenAI.PNG, "image/png"), prompt="sails")
    assert edited.data is not None and base64.b64decode(edited.data[0].b64_json or "").startswith(PNG_SIGNATURE)
    text = client.audio.transcriptions.create(model="mock-whisper", file=("memo.wav", make_wav(2.0), "audio/wav"))
    assert text.text == "This is the mock transcript of memo.wav, 2 seconds of audio."
    with client.audio.speech.with_streaming_response.create(
        model="mock-tts", voice="alloy", input="Hi there", response_format="wav"
    ) as res:
        assert res.headers["content-type"] == "audio/wav"
        res.stream_to_file(tmp_path / "hi.wav")
    with wave.open(str(tmp_path / "hi.wav"), "rb") as spoken:
        assert spoken.getnframes() / spoken.getframerate() == pytest.approx(0.4)  # 50 ms per character
    verdict = client.moderations.create(model="mock-moderation", input="I hate mondays")
    assert verdict.results[0].flagged and verdict.results[0].categories.hate
    rows = {r.endpoint: r for r in exact_usage(tenant_key[0], 5)}
    assert rows["transcriptions"].cost_micro == 20_000  # 2 s at $0.60 a minute
    assert rows["speech"].cost_micro == 30 * len("Hi there")
    assert sorted(r.cost_micro for r in wait_usage(5, tenant_id=tenant_key[0].pk) if r.endpoint == "images") == [
        10_000,
        20_000,
    ]


# --- hard budgets under concurrency -------------------------------------------------------------


def test_hard_budget_holds_for_images_and_audio_under_concurrency(media, gateway_server, make_tenant, make_key):
    """50 concurrent requests (images at $0.04, 10-second transcriptions at $0.10) under a $1.00
    hard budget: the admitted ones spend at most $1.00, each has one ledger row, the refused ones
    are 402s that never reached the upstream."""
    from budgets import services
    from ledger.models import UsageRecord

    set_price(media_model("whisper-1"), audio_per_minute=Decimal("0.60"))
    tenant = make_tenant("crowd")
    services.budget_set(tenant=tenant, period="month", limit_micro=1_000_000, hard=True)
    key = make_key(tenant)
    client = openai.OpenAI(base_url=f"{gateway_server.url}/v1", api_key=key, max_retries=0, timeout=60)
    wav = make_wav(10.0, rate=8000)

    def one(i: int) -> int:
        try:
            if i % 2:
                client.audio.transcriptions.create(model="whisper-1", file=(f"{i}.wav", wav, "audio/wav"))
            else:
                client.images.generate(model="dall-e-3", prompt=f"p{i}", size="1024x1024", quality="standard")
        except openai.APIStatusError as exc:
            assert exc.status_code == 402 and exc.code == "insufficient_quota", exc.message
            return 402
        return 200

    with ThreadPoolExecutor(max_workers=50) as pool:
        statuses = list(pool.map(one, range(50)))
    admitted = statuses.count(200)
    assert admitted and statuses.count(402) == 50 - admitted
    rows = exact_usage(tenant, admitted)
    assert len(rows) == admitted == len(media.requests)  # one row each; the refused never left
    spent = sum(r.cost_micro for r in rows)
    assert spent <= 1_000_000
    assert {r.cost_micro for r in rows} <= {40_000, 100_000}
    assert spent == sum(40_000 if r.endpoint == "images" else 100_000 for r in rows)
    assert UsageRecord.objects.filter(tenant=tenant, status="ok").count() == admitted
    # The budget was the limit: nothing more of either fits.
    assert 1_000_000 - spent < 100_000 or statuses.count(402) == 0


def media_model(name: str):
    from gateway.models import LLMModel

    return LLMModel.objects.get(name=name)


# --- prices as configuration (can apply / can export) ------------------------------------------

MEDIA_CONFIG = """
providers:
  - slug: up
    kind: openai
    base_url: https://up.example/v1
models:
  - name: pix
    kind: image
    deployments: [{provider: up, upstream_model: dall-e-3}]
    prices:
      - effective_from: "2025-01-01"
        per_image: "0.04"
        image_prices: {"1024x1024/hd": "0.08", "1792x1024": "0.12"}
  - name: ears
    kind: transcription
    deployments: [{provider: up, upstream_model: whisper-1}]
    prices:
      - effective_from: "2025-01-01"
        audio_per_minute: "0.006"
  - name: voice
    kind: speech
    deployments: [{provider: up, upstream_model: tts-1}]
    prices:
      - effective_from: "2025-01-01"
        per_mchars: "15"
      - effective_from: "2026-01-01"
        per_mchars: "12.5"
"""


def test_media_prices_apply_and_export(transactional_db, tmp_path):
    from gateway.models import LLMModel, Price
    from gateway.routing.table import price_info

    path = tmp_path / "chittycan.yaml"
    path.write_text(MEDIA_CONFIG)
    call_command("apply", "-f", str(path), stdout=io.StringIO(), stderr=io.StringIO())
    assert LLMModel.objects.get(name="pix").kind == "image"
    pix = price_info(Price.objects.get(model__name="pix"))
    assert pix.image_price("1024x1024/hd") == Decimal("0.08")
    assert pix.image_price("1792x1024/standard") == Decimal("0.12")  # the size's entry
    assert pix.image_price("512x512/standard") == Decimal("0.04")  # the default
    assert pix.image_price("*") == Decimal("0.12")
    assert Price.objects.get(model__name="ears").audio_per_minute == Decimal("0.006")
    voice = sorted(Price.objects.filter(model__name="voice"), key=lambda p: p.effective_from)
    assert [p.per_mchars for p in voice] == [Decimal(15), Decimal("12.5")]  # effective dates kept

    exported = tmp_path / "out.yaml"
    call_command("export", "-o", str(exported), stdout=io.StringIO(), stderr=io.StringIO())
    models = {m["name"]: m for m in yaml.safe_load(exported.read_text())["models"]}
    assert models["pix"]["prices"][0]["image_prices"] == {"1024x1024/hd": "0.08", "1792x1024": "0.12"}
    assert models["pix"]["prices"][0]["per_image"] == "0.04"
    assert models["ears"]["prices"][0]["audio_per_minute"] == "0.006"
    assert [p["per_mchars"] for p in models["voice"]["prices"]] == ["15.00", "12.50"]

    path.write_text(MEDIA_CONFIG.replace('"1024x1024/hd": "0.08"', '"1024x1024/hd": "-1"'))
    err = io.StringIO()
    with pytest.raises(CommandError, match="nothing was written"):
        call_command("apply", "-f", str(path), stdout=io.StringIO(), stderr=err)
    assert "image_prices" in err.getvalue() and "must not be negative" in err.getvalue()


def test_upstream_failures_are_enveloped_and_cost_nothing(media, openai_client, tenant_key):
    from tests.fakes.openai_upstream import Reply

    error = {"error": {"message": "content policy", "type": "invalid_request_error", "code": "content_policy"}}
    media.push("/v1/images/generations", Reply(status=400, json=error))
    with pytest.raises(openai.BadRequestError) as exc:
        openai_client.images.generate(model="dall-e-3", prompt="x", size="1024x1024", quality="standard")
    assert "content policy" in exc.value.message
    down = {"error": {"message": "down", "type": "server_error"}}
    media.push("/v1/audio/speech", Reply(status=500, json=down), Reply(status=500, json=down))
    with pytest.raises(openai.APIStatusError) as failed:
        openai_client.audio.speech.create(model="tts-1", voice="alloy", input="hi")
    assert failed.value.status_code >= 500
    rows = exact_usage(tenant_key[0], 2)
    assert sorted(r.endpoint for r in rows) == ["images", "speech"]
    assert all(r.status == "upstream_error" and r.cost_micro == 0 for r in rows)


def test_previous_generation_sdk_drives_the_media_routes(transactional_db, gateway_server, tenant_key, tmp_path):
    """The pinned openai 2.x SDK (tests/sdk_legacy), in a subprocess, against the mock's media models."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from gateway.models import Provider
    from tests.test_openai_legacy_sdk import LEGACY, LEGACY_VERSION

    mock = Provider.objects.create(slug="mock-legacy", kind="mock")
    set_price(add_model("old-image", mock, kind="image", prices=("0", "0", "0")), per_image=Decimal("0.02"))
    set_price(
        add_model("old-whisper", mock, kind="transcription", prices=("0", "0", "0")), audio_per_minute=Decimal("0.6")
    )
    set_price(add_model("old-tts", mock, kind="speech", prices=("0", "0", "0")), per_mchars=Decimal("20"))
    add_model("old-moderation", mock, kind="moderation", prices=("0", "0", "0"))
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        [
            sys.executable,
            str(root / "tests" / "sdk_legacy" / "drive_media.py"),
            f"{gateway_server.url}/v1",
            tenant_key[1],
            "old-image",
            "old-whisper",
            "old-tts",
            "old-moderation",
            str(tmp_path),
        ],
        env={**os.environ, "PYTHONPATH": str(LEGACY)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["version"] == LEGACY_VERSION
    assert seen["png"] == PNG_SIGNATURE.hex()
    assert seen["transcript"] == "This is the mock transcript of memo.wav, 3 seconds of audio."
    assert (seen["speech_type"], seen["speech_riff"]) == ("audio/wav", "RIFF")
    assert seen["flagged"] == [True, False]
    costs = {r.endpoint: r.cost_micro for r in exact_usage(tenant_key[0], 4)}
    assert costs == {"images": 20_000, "transcriptions": 30_000, "speech": 100, "moderations": 0}


def test_admin_sets_per_unit_prices(db, settings):
    """The model page's price inline takes the per-unit prices; a bad image table is a form error."""
    from django.contrib.auth import get_user_model
    from django.test import Client
    from django.urls import reverse

    from gateway.models import LLMModel, Provider
    from tests.test_write_paths import inline

    settings.CHITTYCAN_ADMIN_REQUIRE_OTP = False
    staff = Client()
    staff.force_login(get_user_model().objects.create_superuser("root", "root@example.com", "pw"))
    provider = Provider.objects.create(slug="up", kind="openai", base_url="https://up.example/v1")
    model_form = {
        "name": "pix",
        "kind": "image",
        "aliases": "[]",
        "owned_by": "us",
        "context_window": "0",
        "max_output_tokens": "0",
        "is_active": "on",
    }
    deployment = {"provider": str(provider.pk), "upstream_model": "dall-e-3", "priority": "0", "weight": "1"}
    price = {
        "effective_from_0": "2025-01-01",
        "effective_from_1": "00:00:00",
        "input_per_mtok": "0",
        "output_per_mtok": "0",
        "per_image": "0.04",
        "image_prices": '{"1024x1024/hd": "0.08"}',
    }
    bad = {**model_form, **inline("deployments", [deployment]), **inline("prices", [{**price, "image_prices": "[1]"}])}
    assert staff.post(reverse("admin:gateway_llmmodel_add"), bad).status_code == 200  # the form again, with the error
    assert not LLMModel.objects.filter(name="pix").exists()
    post = {**model_form, **inline("deployments", [deployment]), **inline("prices", [price])}
    response = staff.post(reverse("admin:gateway_llmmodel_add"), post)
    assert response.status_code == 302, response.content.decode()[:2000]
    [row] = LLMModel.objects.get(name="pix").prices.all()
    assert (row.per_image, row.audio_per_minute) == (Decimal("0.04"), Decimal(0))
    assert row.image_prices == {"1024x1024/hd": "0.08"}
