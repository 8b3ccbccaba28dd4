"""Retries, the retry budget, fallback under standing faults and streams cut mid-way, against fake
upstreams on loopback (``tests.fakes.openai_upstream.Fault``)."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest

from tests.conftest import add_model, exact_usage
from tests.fakes.openai_upstream import Fault, Reply
from tests.test_breakers import (  # noqa: F401
    breaker_rows,
    chat,
    chats,
    fallback_server,
    make_provider,
    pair,
    streams_try_failing_deployments,
)


async def _burst(url: str, key: str, total: int, concurrency: int, stream_every: int = 5) -> list[bool]:
    """``total`` chat requests, ``concurrency`` at a time, every ``stream_every``-th one streamed;
    True for each that got a complete answer (a stream: its ``[DONE]``)."""
    sem = asyncio.Semaphore(concurrency)
    headers = {"authorization": f"Bearer {key}"}

    async def one(client: httpx.AsyncClient, i: int) -> bool:
        stream = i % stream_every == 0
        body = {"model": "gpt-4o", "messages": [{"role": "user", "content": f"hi {i}"}], "stream": stream}
        async with sem:
            response = await client.post(f"{url}/v1/chat/completions", json=body, headers=headers)
        if response.status_code != 200:
            return False
        return b"data: [DONE]" in response.content if stream else "choices" in response.json()

    async with httpx.AsyncClient(timeout=30) as client:
        return list(await asyncio.gather(*(one(client, i) for i in range(total))))


def burst(url: str, key: str, total: int = 300, concurrency: int = 8) -> list[bool]:
    return asyncio.run(_burst(url, key, total, concurrency))


@pytest.mark.parametrize("fault", [Fault("down"), Fault("flaky", rate=0.3)], ids=["down", "flaky30"])
def test_one_healthy_fallback_serves_at_least_999_per_mille(gateway_server, pair, tenant_key, fault):  # noqa: F811
    primary, fallback, provider = pair
    provider.max_retries = 1
    provider.save()
    primary.set_fault(fault)
    started = time.monotonic()
    results = burst(gateway_server.url, tenant_key[1])
    elapsed = time.monotonic() - started
    assert sum(results) / len(results) >= 0.999, f"{results.count(False)} of {len(results)} failed"
    if fault.kind == "down":
        # 3 consecutive failures open it (plus attempts already in flight, 8 at a time), then only
        # the probe after each 2 s cool-down reaches the dead upstream.
        assert chats(primary) <= 3 + 8 * 2 + int(elapsed / 2) + 1, (chats(primary), elapsed)
    else:
        # 30 % errors stay under the 50 % rate; a run of 3 consecutive failures may open the
        # breaker for a cool-down (then a probe, 70 % likely to close it): the fallback covers it.
        assert chats(primary) >= 3


def test_a_first_byte_stall_fails_over_within_the_read_timeout(gateway_server, pair, tenant_key):  # noqa: F811
    primary, fallback, provider = pair
    provider.read_timeout = 0.5
    provider.save()
    primary.set_fault(Fault("stall", stall=5.0))
    started = time.monotonic()
    response = chat(gateway_server.url, tenant_key[1])
    assert response.status_code == 200
    assert response.headers["x-chittycan-route"] == "fallback:1"
    assert time.monotonic() - started < 3
    assert chats(fallback) == 1


def test_a_5xx_is_retried_and_a_400_is_not(gateway_server, upstream, tenant_key):
    upstream.push(
        "/v1/chat/completions", Reply(status=503, json={"error": {"message": "busy", "type": "server_error"}})
    )
    response = chat(gateway_server.url, tenant_key[1])
    assert response.status_code == 200
    assert chats(upstream) == 2
    upstream.push(
        "/v1/chat/completions", Reply(status=400, json={"error": {"message": "bad", "type": "invalid_request_error"}})
    )
    response = chat(gateway_server.url, tenant_key[1])
    assert response.status_code == 400
    assert chats(upstream) == 3


def test_the_retry_budget_caps_retries_at_a_share_of_requests(
    gateway_server, transactional_db, fake_openai, tenant_key, settings
):
    app, server = fake_openai
    # Breaker out of the way (it would stop the retries by itself): only the budget limits them.
    provider = make_provider(
        "lonely", server.url, max_retries=5, breaker_failures=10_000, breaker_min_requests=1_000_000
    )
    add_model("gpt-4o", provider, upstream="gpt-4o-2024-08-06")
    settings.CHITTYCAN_RETRY_BUDGET_BURST = 2.0
    settings.CHITTYCAN_RETRY_BUDGET_RATIO = 0.2
    app.set_fault(Fault("down"))
    for _ in range(20):
        assert chat(gateway_server.url, tenant_key[1]).status_code == 502
    # Without the budget: 20 x 6 = 120 attempts. With it: 20 + the burst (2) + 20 % of 20 (4).
    assert 20 + 2 <= chats(app) <= 20 + 2 + 4 + 1, chats(app)


def test_a_stream_reset_mid_way_is_an_error_for_the_sdk_with_partial_usage_and_no_retry(
    gateway_server,
    pair,  # noqa: F811
    tenant_key,
):
    primary, fallback, provider = pair
    provider.max_retries = 2
    provider.save()
    primary.set_fault(Fault("reset", after_frames=3))
    client = openai.OpenAI(base_url=f"{gateway_server.url}/v1", api_key=tenant_key[1], max_retries=0)
    received: list[str | None] = []
    with pytest.raises(openai.APIError):
        for part in client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hi"}], stream=True
        ):
            received.append(part.choices[0].delta.content if part.choices else None)
    assert received[1:] == ["Hello", " from"]  # what came before the reset reached the client ...
    assert chats(primary) == 1 and chats(fallback) == 0  # ... so nothing was retried or failed over
    [row] = exact_usage(tenant_key[0], 1)
    assert row.status == "upstream_error" and row.http_status == 200 and row.stream
    assert row.provider == "primary"
    assert row.usage_source == "estimated" and row.prompt_tokens > 0 and 1 <= row.completion_tokens < 7
    assert {r["provider"]: r["consecutive_failures"] for r in breaker_rows()}["primary"] == 1


def test_mid_stream_resets_count_against_the_breaker(
    gateway_server,
    pair,  # noqa: F811
    tenant_key,
    streams_try_failing_deployments,  # noqa: F811
):
    primary, fallback, _ = pair
    primary.set_fault(Fault("reset", after_frames=2))
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    headers = {"authorization": f"Bearer {tenant_key[1]}"}
    for _ in range(3):
        raw = httpx.post(f"{gateway_server.url}/v1/chat/completions", json=body, headers=headers, timeout=10)
        assert b"[DONE]" not in raw.content and b'"error"' in raw.content
    assert {r["provider"]: r["state"] for r in breaker_rows()}["primary"] == "open"
    raw = httpx.post(f"{gateway_server.url}/v1/chat/completions", json=body, headers=headers, timeout=10)
    assert b"data: [DONE]" in raw.content and raw.headers["x-chittycan-route"].startswith("fallback:1")
    assert chats(primary) == 3


def test_an_anthropic_stream_reset_mid_way_ends_with_an_error_event(gateway_server, pair, tenant_key):  # noqa: F811
    primary, _, _ = pair
    primary.set_fault(Fault("reset", after_frames=3))
    raw = httpx.post(
        f"{gateway_server.url}/v1/messages",
        json={"model": "gpt-4o", "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}], "stream": True},
        headers={"x-api-key": tenant_key[1], "anthropic-version": "2023-06-01"},
        timeout=10,
    )
    assert raw.status_code == 200
    events = [line.removeprefix("event: ") for line in raw.text.splitlines() if line.startswith("event: ")]
    assert events[0] == "message_start" and events[-1] == "error"
    assert "message_stop" not in events
    data = [json.loads(line[6:]) for line in raw.text.splitlines() if line.startswith("data: ")]
    assert data[-1]["type"] == "error" and set(data[-1]["error"]) >= {"type", "message"}
    [row] = exact_usage(tenant_key[0], 1)
    assert row.status == "upstream_error" and row.http_status == 200 and row.endpoint == "messages"


def test_a_passthrough_clients_rejected_key_does_not_open_the_breaker(settings, upstream, gateway_server):
    from core import invalidation

    settings.CHITTYCAN_PASSTHROUGH = True
    settings.CHITTYCAN_PASSTHROUGH_PROVIDER = "fake-openai"
    invalidation.drop_local()
    refused = {"error": {"message": "Incorrect API key provided: sk-bad", "type": "x", "code": None}}
    for _ in range(6):  # more than the provider's threshold (5)
        upstream.push("/v1/chat/completions", Reply(status=401, json=refused))
        assert chat(gateway_server.url, "sk-bad").status_code == 401
    response = chat(gateway_server.url, "sk-proj-good")
    assert response.status_code == 200
    assert chats(upstream) == 7  # nobody was skipped
    invalidation.drop_local()
