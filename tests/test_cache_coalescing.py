"""Coalescing (docs/caching.md): identical in-flight requests, across gateway processes, answered
by one upstream call; followers stream live, get their own ledger rows, go again when their leader
fails, and never follow another tenant's request."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import wait_usage
from tests.fakes.openai_upstream import Reply, usage_for
from tests.processes import Gateway, services_env
from tests.test_cache import cached, chat_calls, enable_cache

__all__ = ["cached"]

pytestmark = pytest.mark.slow

BODY: Any = {"model": "gpt-4o", "messages": [{"role": "user", "content": "Explain quantum computing"}]}


def answer(text: str, delay: float) -> Reply:
    return Reply(
        delay=delay,
        json={
            "id": "chatcmpl-coalesced",
            "object": "chat.completion",
            "created": 1,
            "model": "gpt-4o-2024-08-06",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                    "logprobs": None,
                }
            ],
            "usage": usage_for(10, 20),
        },
    )


@pytest.fixture
def gateways(upstream: Any) -> Iterator[Any]:
    """Two gateway processes on the test database and Redis, gpt-4o's cache on (before they load it)."""
    enable_cache("gpt-4o")
    started: list[Gateway] = []

    def start() -> Gateway:
        gw = Gateway(services_env())
        started.append(gw)
        return gw

    yield start
    for gw in started:
        gw.stop()


def warm(urls: list[str], key: str) -> None:
    """One uncached request per process (keys, catalogue and connections loaded before the burst)."""
    for url in urls:
        response = httpx.post(
            f"{url}/v1/chat/completions",
            json={**BODY, "messages": [{"role": "user", "content": f"warm {url}"}]},
            headers={"authorization": f"Bearer {key}", "cache-control": "no-store"},
            timeout=30,
        )
        assert response.status_code == 200, response.text


async def _burst(urls: list[str], key: str, total: int, *, stream: bool) -> list[dict[str, Any]]:
    clients = [
        openai.AsyncOpenAI(
            base_url=f"{url}/v1",
            api_key=key,
            max_retries=0,
            timeout=60,
        )
        for url in urls
    ]

    async def one(i: int) -> dict[str, Any]:
        client = clients[i % len(clients)]
        if not stream:
            try:
                raw = await client.chat.completions.with_raw_response.create(**BODY)
            except openai.APIStatusError as exc:
                return {"status": exc.status_code, "cache": exc.response.headers.get("x-chittycan-cache")}
            completion = raw.parse()
            return {
                "status": 200,
                "cache": raw.headers.get("x-chittycan-cache"),
                "request_id": raw.headers.get("x-request-id"),
                "text": completion.choices[0].message.content,
                "url": urls[i % len(urls)],
            }
        raw_stream = await client.chat.completions.with_raw_response.create(**BODY, stream=True)
        times, parts, finish = [], [], None
        async for chunk in raw_stream.parse():
            if chunk.choices and chunk.choices[0].delta.content:
                times.append(time.monotonic())
                parts.append(chunk.choices[0].delta.content)
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
        return {
            "status": 200,
            "cache": raw_stream.headers.get("x-chittycan-cache"),
            "text": "".join(parts),
            "finish": finish,
            "spread": times[-1] - times[0] if times else 0.0,
            "url": urls[i % len(urls)],
        }

    try:
        return list(await asyncio.gather(*(one(i) for i in range(total))))
    finally:
        for client in clients:
            await client.close()


def burst(urls: list[str], key: str, total: int, *, stream: bool = False) -> list[dict[str, Any]]:
    return asyncio.run(_burst(urls, key, total, stream=stream))


def test_100_identical_requests_across_two_processes_make_one_upstream_call(upstream, gateways, make_tenant, make_key):
    from ledger.models import UsageRecord

    tenant = make_tenant("herd")
    key = make_key(tenant)
    procs = [gateways(), gateways()]
    warm([g.url for g in procs], key)
    upstream.reset()
    upstream.push("/v1/chat/completions", answer("Qubits, briefly.", delay=1.5))
    results = burst([g.url for g in procs], key, 100)
    assert chat_calls(upstream) == 1
    assert Counter(r["status"] for r in results) == {200: 100}
    assert Counter(r["cache"] for r in results) == {"MISS": 1, "HIT": 99}
    assert {r["text"] for r in results} == {"Qubits, briefly."}
    assert len({r["request_id"] for r in results}) == 100  # each its own request id
    # Followers in both processes (the leader's and the other one).
    assert {r["url"] for r in results if r["cache"] == "HIT"} == {g.url for g in procs}
    rows = wait_usage(102, timeout=30, tenant=tenant)  # 2 warm-up rows + 100
    rows = [r for r in rows if r.request_id in {x["request_id"] for x in results}]
    assert len(rows) == 100
    leader = [r for r in rows if not r.cache_hit]
    assert len(leader) == 1 and leader[0].cost_micro > 0 and not leader[0].coalesced
    followers = [r for r in rows if r.cache_hit]
    assert all(r.cost_micro == 0 and r.saved_micro == leader[0].cost_micro for r in followers)
    assert all(r.completion_tokens == 20 for r in followers)
    # Nearly all of them arrived while the leader's call was in the air (the rest were plain hits).
    assert sum(r.coalesced for r in followers) >= 90
    assert UsageRecord.objects.filter(tenant=tenant, coalesced=True, cache_hit=False).count() == 0


def test_streamed_followers_receive_chunks_as_the_leader_does(upstream, gateways, make_tenant, make_key):
    tenant = make_tenant("herd-stream")
    key = make_key(tenant)
    procs = [gateways(), gateways()]
    warm([g.url for g in procs], key)
    upstream.reset()
    upstream.text = "one two three four five six"
    reply = upstream.chat_stream_reply({**BODY, "stream": True})
    reply.delay, reply.frame_delay = 0.5, 0.25
    upstream.push("/v1/chat/completions", reply)
    results = burst([g.url for g in procs], key, 40, stream=True)
    assert chat_calls(upstream) == 1
    assert Counter(r["cache"] for r in results) == {"MISS": 1, "HIT": 39}
    assert {r["text"] for r in results} == {"one two three four five six"}
    assert {r["finish"] for r in results} == {"stop"}
    # Live, not buffered: in both processes, a follower's content chunks came over ~1.25 s (the
    # upstream's six words 0.25 s apart), as the leader received them.
    for gw in procs:
        spreads = [r["spread"] for r in results if r["url"] == gw.url and r["cache"] == "HIT"]
        assert spreads and max(spreads) > 0.75, spreads
    rows = wait_usage(42, timeout=30, tenant=tenant)
    assert len(rows) == 42
    assert sum(1 for r in rows if r.coalesced and r.cost_micro == 0 and r.saved_micro > 0) >= 30


def test_followers_of_a_failed_leader_go_again(upstream, gateways, make_tenant, make_key):
    tenant = make_tenant("herd-fail")
    key = make_key(tenant)
    procs = [gateways(), gateways()]
    warm([g.url for g in procs], key)
    upstream.reset()
    # The leader's call and its one retry fail; what comes after succeeds (as each request alone
    # would have found: the upstream is back).
    failure = {"error": {"message": "boom", "type": "server_error", "code": None}}
    upstream.push(
        "/v1/chat/completions",
        Reply(status=500, json=failure, delay=0.8),
        Reply(status=500, json=failure),
        answer("Back again.", delay=0.8),
    )
    results = burst([g.url for g in procs], key, 30)
    statuses = Counter(r["status"] for r in results)
    assert statuses[200] == 29 and sum(statuses.values()) == 30, statuses
    failed = [r for r in results if r["status"] != 200]
    assert len(failed) == 1 and failed[0]["status"] >= 500 and failed[0]["cache"] == "MISS"
    assert {r["text"] for r in results if r["status"] == 200} == {"Back again."}
    assert Counter(r["cache"] for r in results if r["status"] == 200) == {"MISS": 1, "HIT": 28}
    assert chat_calls(upstream) == 3  # the failed call, its retry, one new leader
    assert len(wait_usage(32, timeout=30, tenant=tenant)) == 32


def test_tenants_never_coalesce_onto_each_other(upstream, gateways, make_tenant, make_key):
    a, b = make_tenant("herd-a"), make_tenant("herd-b")
    key_a, key_b = make_key(a), make_key(b)
    procs = [gateways(), gateways()]
    urls = [g.url for g in procs]
    warm(urls, key_a)
    warm(urls, key_b)
    upstream.reset()
    upstream.push("/v1/chat/completions", answer("first answer", delay=1.2), answer("second answer", delay=1.2))

    async def both() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        return await asyncio.gather(_burst(urls, key_a, 20, stream=False), _burst(urls, key_b, 20, stream=False))

    got_a, got_b = asyncio.run(both())
    assert chat_calls(upstream) == 2  # one per tenant (each tenant's 20 coalesced: the positive control)
    texts_a, texts_b = {r["text"] for r in got_a}, {r["text"] for r in got_b}
    assert len(texts_a) == 1 and len(texts_b) == 1 and texts_a != texts_b
    assert Counter(r["cache"] for r in got_a) == {"MISS": 1, "HIT": 19}
    assert Counter(r["cache"] for r in got_b) == {"MISS": 1, "HIT": 19}


def test_a_leader_whose_client_leaves_completes_for_its_followers(cached, gateway_server, make_tenant, make_key):
    from ledger.models import UsageRecord

    tenant = make_tenant("herd-leave")
    key = make_key(tenant)
    cached.push("/v1/chat/completions", answer("Still here.", delay=1.5))
    headers = {"authorization": f"Bearer {key}"}
    url = f"{gateway_server.url}/v1/chat/completions"

    async def scenario() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=30) as client:
            leader = asyncio.ensure_future(client.post(url, json=BODY, headers=headers, timeout=0.8))
            while chat_calls(cached) < 1:
                await asyncio.sleep(0.02)
            followers = [asyncio.ensure_future(client.post(url, json=BODY, headers=headers)) for _ in range(5)]
            with pytest.raises(httpx.TimeoutException):
                await leader  # the leader's client gives up and disconnects
            return list(await asyncio.gather(*followers))

    responses = asyncio.run(scenario())
    assert [r.status_code for r in responses] == [200] * 5
    assert {r.json()["choices"][0]["message"]["content"] for r in responses} == {"Still here."}
    assert {r.headers["x-chittycan-cache"] for r in responses} == {"HIT"}
    assert chat_calls(cached) == 1
    rows = wait_usage(6, timeout=15, tenant=tenant)
    leader = [r for r in rows if not r.cache_hit]
    # The leader's row: its client left (499), billed for the whole answer the upstream gave.
    assert len(leader) == 1 and leader[0].status == "client_disconnected" and leader[0].completion_tokens == 20
    assert leader[0].cost_micro > 0
    assert UsageRecord.objects.filter(tenant=tenant, coalesced=True).count() == 5


def test_followers_of_a_leader_refused_by_its_budget_never_hang(cached, gateway_server, make_tenant, make_key):
    from budgets import services

    tenant = make_tenant("herd-broke")
    services.budget_set(tenant=tenant, period="month", limit_micro=1)  # every request's reservation is refused
    key = make_key(tenant)
    url = f"{gateway_server.url}/v1/chat/completions"

    async def scenario() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=20) as client:
            return list(
                await asyncio.gather(
                    *(client.post(url, json=BODY, headers={"authorization": f"Bearer {key}"}) for _ in range(10))
                )
            )

    started = time.monotonic()
    responses = asyncio.run(scenario())
    assert [r.status_code for r in responses] == [402] * 10  # each what it would have had alone
    assert time.monotonic() - started < 10
    assert chat_calls(cached) == 0


def test_a_streaming_leader_whose_client_leaves_completes_for_its_followers(
    cached, gateway_server, make_tenant, make_key
):
    tenant = make_tenant("herd-leave-stream")
    key = make_key(tenant)
    cached.text = "alpha beta gamma delta"
    reply = cached.chat_stream_reply({**BODY, "stream": True})
    reply.frame_delay = 0.3
    cached.push("/v1/chat/completions", reply)
    headers = {"authorization": f"Bearer {key}"}
    url = f"{gateway_server.url}/v1/chat/completions"

    async def follow(client: httpx.AsyncClient) -> tuple[str, str]:
        text = ""
        async with client.stream("POST", url, json={**BODY, "stream": True}, headers=headers) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    for choice in json.loads(line[6:]).get("choices", []):
                        text += choice["delta"].get("content") or ""
            return response.headers["x-chittycan-cache"], text

    async def scenario() -> list[tuple[str, str]]:
        async with httpx.AsyncClient(timeout=30) as client:
            async with client.stream("POST", url, json={**BODY, "stream": True}, headers=headers) as leader:
                assert leader.headers["x-chittycan-cache"] == "MISS"
                followers = [asyncio.ensure_future(follow(client)) for _ in range(3)]
                async for line in leader.aiter_lines():
                    if line.startswith("data: {"):
                        break  # the leader's client leaves after its first chunk
            return list(await asyncio.gather(*followers))

    got = asyncio.run(scenario())
    assert got == [("HIT", "alpha beta gamma delta")] * 3
    assert chat_calls(cached) == 1
    rows = wait_usage(4, timeout=15, tenant=tenant)
    leader = [r for r in rows if not r.cache_hit]
    assert len(leader) == 1 and leader[0].status == "client_disconnected" and leader[0].cost_micro > 0
    assert sum(1 for r in rows if r.coalesced) == 3
