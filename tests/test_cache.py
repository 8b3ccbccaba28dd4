"""The exact response cache (docs/caching.md): per-tenant entries, HIT/MISS/BYPASS, faithful
replay in both wire formats, ledger rows of hits, and invalidation."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import pytest
import yaml

from tests import anthropic_support as support
from tests.conftest import wait_usage
from tests.fakes.openai_upstream import Reply, sse

anthropic_upstream = support.anthropic_upstream
fake_anthropic_server = support.fake_anthropic_server

HI: Any = [{"role": "user", "content": "Hi"}]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]


def enable_cache(name: str, ttl: int = 86_400) -> None:
    from gateway import catalog
    from gateway.models import LLMModel

    model = LLMModel.objects.get(name=name)
    model.cache_enabled, model.cache_ttl = True, ttl
    catalog.model_update(model, cache_enabled=True, cache_ttl=ttl)


def chat_calls(app: Any) -> int:
    return sum(1 for r in app.requests if r.path.endswith("/chat/completions"))


def post(
    server: Any, key: str, body: dict[str, Any], path: str = "/v1/chat/completions", **headers: str
) -> httpx.Response:
    return httpx.post(
        f"{server.url}{path}", json=body, headers={"authorization": f"Bearer {key}", **headers}, timeout=10
    )


@pytest.fixture
def cached(upstream: Any) -> Iterator[Any]:
    """The fake OpenAI upstream with gpt-4o's cache on; the answer text tests change is restored
    (the fake is shared by the whole session and its reset keeps the text)."""
    enable_cache("gpt-4o")
    text = upstream.text
    yield upstream
    upstream.text = text


def test_second_identical_call_is_a_hit_at_cost_zero(cached, gateway_server, tenant_key):
    tenant, key = tenant_key
    body = {"model": "gpt-4o", "messages": HI}
    first = post(gateway_server, key, body)
    second = post(gateway_server, key, {**body, "user": "someone-else", "metadata": {"x": "y"}})
    assert first.status_code == second.status_code == 200
    assert first.headers["x-chittycan-cache"] == "MISS"
    assert "age" not in first.headers
    assert second.headers["x-chittycan-cache"] == "HIT"
    assert int(second.headers["age"]) >= 0
    assert second.headers["x-chittycan-cost"] == "0.000000"
    assert second.headers["x-request-id"] != first.headers["x-request-id"]
    assert second.json()["choices"] == first.json()["choices"]
    assert second.json()["usage"] == first.json()["usage"]
    assert chat_calls(cached) == 1
    rows = wait_usage(2, tenant=tenant)
    miss, hit = sorted(rows, key=lambda r: r.cache_hit)
    assert (miss.cache_hit, miss.cost_micro > 0, miss.saved_micro) == (False, True, 0)
    assert hit.cache_hit and hit.cost_micro == 0 and hit.saved_micro == miss.cost_micro
    assert hit.request_id == second.headers["x-request-id"]
    assert (hit.prompt_tokens, hit.completion_tokens) == (miss.prompt_tokens, miss.completion_tokens)
    assert hit.usage_source == "cache"


def test_hits_count_toward_rpm(cached, gateway_server, make_tenant, make_key):
    key = make_key(make_tenant("rated"), rpm_limit=2)
    body = {"model": "gpt-4o", "messages": HI}
    assert post(gateway_server, key, body).headers["x-chittycan-cache"] == "MISS"
    assert post(gateway_server, key, body).headers["x-chittycan-cache"] == "HIT"
    refused = post(gateway_server, key, body)
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert chat_calls(cached) == 1


def test_hits_reserve_no_budget(cached, gateway_server, make_tenant, make_key):
    from budgets import services as budgets

    tenant = make_tenant("frugal")
    key = make_key(tenant)
    # the miss costs 95 micro-USD (10 x 2.50 + 7 x 10.00 per million); the 55 left cannot reserve another (about 130)
    budgets.budget_set(tenant=tenant, period="month", limit_micro=150, hard=True)
    body = {"model": "gpt-4o", "messages": HI, "max_tokens": 7}
    assert post(gateway_server, key, body).headers["x-chittycan-cache"] == "MISS"
    hit = post(gateway_server, key, body)
    assert hit.status_code == 200 and hit.headers["x-chittycan-cache"] == "HIT"
    refused = post(gateway_server, key, {**body, "messages": [{"role": "user", "content": "new"}]})
    assert refused.status_code == 402
    assert chat_calls(cached) == 1


def test_legacy_completions_are_cached_in_both_shapes(cached, openai_client):
    enable_cache("gpt-3.5-turbo-instruct")
    whole = openai_client.completions.create(model="gpt-3.5-turbo-instruct", prompt="Say hi")
    raw = openai_client.completions.with_raw_response.create(
        model="gpt-3.5-turbo-instruct", prompt="Say hi", stream=True
    )
    assert raw.headers["x-chittycan-cache"] == "HIT"
    chunks = list(raw.parse())
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        whole.choices[0].finish_reason
    ]
    assert sum(1 for r in cached.requests if r.path.endswith("/completions") and "chat" not in r.path) == 1


def test_output_fields_change_the_key(cached, gateway_server, tenant_key):
    _, key = tenant_key
    post(gateway_server, key, {"model": "gpt-4o", "messages": HI, "temperature": 0.5})
    other = post(gateway_server, key, {"model": "gpt-4o", "messages": HI, "temperature": 0.7})
    unknown = post(gateway_server, key, {"model": "gpt-4o", "messages": HI, "temperature": 0.5, "x_custom": 1})
    same = post(gateway_server, key, {"messages": HI, "temperature": 0.5, "model": "gpt-4o"})
    assert [r.headers["x-chittycan-cache"] for r in (other, unknown, same)] == ["MISS", "MISS", "HIT"]
    assert chat_calls(cached) == 3


def test_tenant_isolation(cached, gateway_server, make_tenant, make_key):
    tenant_a, tenant_b = make_tenant("alpha"), make_tenant("beta")
    key_a, key_a2, key_b = make_key(tenant_a, name="a"), make_key(tenant_a, name="a2"), make_key(tenant_b, name="b")
    body = {"model": "gpt-4o", "messages": HI}
    cached.text = "answer for A"
    assert post(gateway_server, key_a, body).headers["x-chittycan-cache"] == "MISS"
    cached.text = "answer for B"
    b_answer = post(gateway_server, key_b, body)
    assert b_answer.headers["x-chittycan-cache"] == "MISS"
    assert b_answer.json()["choices"][0]["message"]["content"] == "answer for B"
    # positive control: another key of tenant A shares A's entry
    a_again = post(gateway_server, key_a2, body)
    assert a_again.headers["x-chittycan-cache"] == "HIT"
    assert a_again.json()["choices"][0]["message"]["content"] == "answer for A"
    # B invalidating all of its entries never removes A's
    dropped = httpx.post(
        f"{gateway_server.url}/v1/cache/invalidate", json={}, headers={"authorization": f"Bearer {key_b}"}
    )
    assert dropped.status_code == 200 and dropped.json()["deleted"] == 1
    assert post(gateway_server, key_a, body).headers["x-chittycan-cache"] == "HIT"
    assert post(gateway_server, key_b, body).headers["x-chittycan-cache"] == "MISS"
    assert chat_calls(cached) == 3


def test_invalidate_by_model_and_errors(cached, gateway_server, tenant_key):
    _, key = tenant_key
    auth = {"authorization": f"Bearer {key}"}
    post(gateway_server, key, {"model": "gpt-4o", "messages": HI})
    post(gateway_server, key, {"model": "gpt-4o", "messages": [{"role": "user", "content": "other"}]})
    url = f"{gateway_server.url}/v1/cache/invalidate"
    assert httpx.post(url, json={"model": "gpt-3.5-turbo-instruct"}, headers=auth).json()["deleted"] == 0
    bad = httpx.post(url, json={"model": 5}, headers=auth)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "model"
    assert httpx.post(url, content=b"{nope", headers=auth).status_code == 400
    assert httpx.post(url, json={}, headers={"authorization": "Bearer chitty_wrong"}).status_code == 401
    gone = httpx.post(url, json={"model": "gpt-4o"}, headers=auth)
    assert gone.status_code == 200 and gone.json() == {"deleted": 2, "model": "gpt-4o"}
    assert post(gateway_server, key, {"model": "gpt-4o", "messages": HI}).headers["x-chittycan-cache"] == "MISS"


def test_no_cache_refreshes_and_no_store_bypasses(cached, gateway_server, tenant_key):
    _, key = tenant_key
    body = {"model": "gpt-4o", "messages": HI}
    bypass = post(gateway_server, key, body, **{"cache-control": "no-store"})
    assert bypass.headers["x-chittycan-cache"] == "BYPASS"
    assert post(gateway_server, key, body).headers["x-chittycan-cache"] == "MISS"  # no-store wrote nothing
    cached.text = "fresher"
    refreshed = post(gateway_server, key, body, **{"cache-control": "no-cache"})
    assert refreshed.headers["x-chittycan-cache"] == "MISS"
    hit = post(gateway_server, key, body)
    assert hit.headers["x-chittycan-cache"] == "HIT"
    assert hit.json()["choices"][0]["message"]["content"] == "fresher"
    assert post(gateway_server, key, body, **{"cache-control": "no-store"}).headers["x-chittycan-cache"] == "BYPASS"
    assert chat_calls(cached) == 4


def test_ttl_header(cached, gateway_server, tenant_key):
    _, key = tenant_key
    body = {"model": "gpt-4o", "messages": HI}
    bad = post(gateway_server, key, body, **{"x-chittycan-cache-ttl": "soon"})
    assert bad.status_code == 400 and "X-ChittyCan-Cache-TTL" in bad.json()["error"]["message"]
    assert post(gateway_server, key, body, **{"x-chittycan-cache-ttl": "1"}).headers["x-chittycan-cache"] == "MISS"
    assert post(gateway_server, key, body).headers["x-chittycan-cache"] == "HIT"
    import time

    time.sleep(1.2)
    assert post(gateway_server, key, body).headers["x-chittycan-cache"] == "MISS"


def test_cache_off_says_nothing(upstream, gateway_server, tenant_key):
    _, key = tenant_key
    for _ in range(2):
        answer = post(gateway_server, key, {"model": "gpt-4o", "messages": HI})
        assert "x-chittycan-cache" not in answer.headers
    assert chat_calls(upstream) == 2


def test_errors_and_cut_streams_are_never_cached(cached, gateway_server, tenant_key):
    _, key = tenant_key
    body = {"model": "gpt-4o", "messages": HI}
    cached.push(
        "/v1/chat/completions", Reply(status=400, json={"error": {"message": "bad", "type": "invalid_request_error"}})
    )
    assert post(gateway_server, key, body).status_code == 400
    assert post(gateway_server, key, body).headers["x-chittycan-cache"] == "MISS"
    # a stream the upstream cuts before its finish reason
    stream_body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "cut"}], "stream": True}
    frames = cached.chat_stream_reply({"model": "gpt-4o", "messages": HI}).frames
    cached.push("/v1/chat/completions", Reply(frames=frames[:2], reset_after=2))
    with httpx.stream(
        "POST",
        f"{gateway_server.url}/v1/chat/completions",
        json=stream_body,
        headers={"authorization": f"Bearer {key}"},
    ) as r:
        r.read()
    again = post(gateway_server, key, stream_body)
    assert again.headers["x-chittycan-cache"] == "MISS"
    assert chat_calls(cached) == 4


def _collect(stream: Any) -> tuple[str, dict[int, dict[str, str]], list[str | None], Any]:
    text, finishes, usage = "", [], None
    calls: dict[int, dict[str, str]] = {}
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            for frag in choice.delta.tool_calls or ():
                call = calls.setdefault(frag.index, {"id": "", "name": "", "arguments": ""})
                call["id"] += frag.id or ""
                call["name"] += (frag.function.name or "") if frag.function else ""
                call["arguments"] += (frag.function.arguments or "") if frag.function else ""
            if choice.finish_reason:
                finishes.append(choice.finish_reason)
    return text, calls, finishes, usage


@pytest.mark.parametrize("tools", [None, TOOLS])
def test_stream_replay_equals_the_original(cached, openai_client, tools):
    extra: dict[str, Any] = {"tools": tools} if tools else {}
    first = _collect(openai_client.chat.completions.create(model="gpt-4o", messages=HI, stream=True, **extra))
    raw = openai_client.chat.completions.with_raw_response.create(model="gpt-4o", messages=HI, stream=True, **extra)
    assert raw.headers["x-chittycan-cache"] == "HIT"
    replay = _collect(raw.parse())
    assert replay == first
    assert first[3] is None  # no usage chunk unless asked
    assert (first[1] != {}) == bool(tools)
    with_usage = _collect(
        openai_client.chat.completions.create(
            model="gpt-4o", messages=HI, stream=True, stream_options={"include_usage": True}, **extra
        )
    )
    assert with_usage[:3] == first[:3] and with_usage[3] is not None and with_usage[3].completion_tokens > 0
    assert chat_calls(cached) == 1  # stream_options is not keyed


def test_non_stream_answer_serves_a_stream_and_reverse(cached, openai_client):
    complete = openai_client.chat.completions.create(model="gpt-4o", messages=HI, tools=TOOLS)
    text, calls, finishes, usage = _collect(
        openai_client.chat.completions.create(
            model="gpt-4o", messages=HI, tools=TOOLS, stream=True, stream_options={"include_usage": True}
        )
    )
    message = complete.choices[0].message
    assert text == (message.content or "")
    assert [(c["id"], c["name"], c["arguments"]) for c in calls.values()] == [
        (t.id, t.function.name, t.function.arguments) for t in message.tool_calls or ()
    ]
    assert finishes == [complete.choices[0].finish_reason]
    assert usage is not None and usage.total_tokens == complete.usage.total_tokens
    # reverse: a streamed answer serves a non-stream request
    other: Any = [{"role": "user", "content": "stream first"}]
    streamed = _collect(openai_client.chat.completions.create(model="gpt-4o", messages=other, stream=True))
    whole = openai_client.chat.completions.with_raw_response.create(model="gpt-4o", messages=other)
    assert whole.headers["x-chittycan-cache"] == "HIT"
    parsed = whole.parse()
    assert parsed.choices[0].message.content == streamed[0]
    assert parsed.choices[0].finish_reason == streamed[2][0]
    assert parsed.usage is not None and parsed.usage.completion_tokens > 0
    assert chat_calls(cached) == 2


def test_a_stream_without_usage_serves_a_body_with_the_billed_usage(cached, gateway_server, tenant_key):
    _, key = tenant_key
    base = {"id": "chatcmpl-nousage", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o"}
    frames = [
        sse(
            {
                **base,
                "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Plain"}, "finish_reason": None}],
            }
        ),
        sse({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}),
        b"data: [DONE]\n\n",
    ]
    cached.push("/v1/chat/completions", Reply(frames=frames))
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "no usage"}]}
    with httpx.stream(
        "POST",
        f"{gateway_server.url}/v1/chat/completions",
        json={**body, "stream": True},
        headers={"authorization": f"Bearer {key}"},
    ) as r:
        assert r.headers["x-chittycan-cache"] == "MISS"
        r.read()
    hit = post(gateway_server, key, body)
    assert hit.headers["x-chittycan-cache"] == "HIT"
    answer = hit.json()
    assert answer["id"] == "chatcmpl-nousage" and answer["choices"][0]["message"]["content"] == "Plain"
    assert answer["usage"]["prompt_tokens"] > 0 and answer["usage"]["completion_tokens"] > 0
    assert chat_calls(cached) == 1


def test_embeddings_are_cached(cached, openai_client):
    enable_cache("text-embedding-3-small")
    first = openai_client.embeddings.create(model="text-embedding-3-small", input="hello")
    raw = openai_client.embeddings.with_raw_response.create(model="text-embedding-3-small", input="hello")
    assert raw.headers["x-chittycan-cache"] == "HIT"
    assert raw.parse().data[0].embedding == first.data[0].embedding
    assert sum(1 for r in cached.requests if r.path.endswith("/embeddings")) == 1


def blocks(content: Any) -> list[tuple[str, Any]]:
    return [(b.type, getattr(b, "text", None) or getattr(b, "input", None)) for b in content]


def test_messages_cached_in_their_own_format(anthropic_upstream, gateway_server, tenant_key):
    tenant, key = tenant_key
    enable_cache("claude-sonnet-4")
    client = anthropic.Anthropic(base_url=gateway_server.url, api_key=key, max_retries=0)
    first = client.messages.create(model="claude-sonnet-4", max_tokens=50, messages=HI)
    raw = client.messages.with_raw_response.create(model="claude-sonnet-4", max_tokens=50, messages=HI)
    assert raw.headers["x-chittycan-cache"] == "HIT"
    hit = raw.parse()
    assert blocks(hit.content) == blocks(first.content) and hit.stop_reason == first.stop_reason
    assert hit.usage.output_tokens == first.usage.output_tokens
    # a stream request served from the stored body, through the SDK's stream() helper
    with client.messages.stream(model="claude-sonnet-4", max_tokens=50, messages=HI) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == blocks(first.content)[0][1] and final.stop_reason == first.stop_reason
    assert final.usage.output_tokens == first.usage.output_tokens
    # a streamed miss replays as a stream, and serves a non-stream request
    other: Any = [{"role": "user", "content": "stream me"}]
    with client.messages.stream(model="claude-sonnet-4", max_tokens=50, messages=other) as stream:
        original = stream.get_final_message()
    with client.messages.stream(model="claude-sonnet-4", max_tokens=50, messages=other) as stream:
        replayed = stream.get_final_message()
    assert blocks(replayed.content) == blocks(original.content) and replayed.stop_reason == original.stop_reason
    whole = client.messages.create(model="claude-sonnet-4", max_tokens=50, messages=other)
    assert blocks(whole.content) == blocks(original.content)
    assert sum(1 for r in anthropic_upstream.requests if r.path.endswith("/messages")) == 2
    rows = wait_usage(6, tenant=tenant)
    assert sum(1 for r in rows if r.cache_hit and r.cost_micro == 0 and r.saved_micro > 0) == 4


def test_cli_stats_and_invalidate(cached, gateway_server, make_tenant, make_key):
    from django.core.management import CommandError, call_command

    tenant_a, tenant_b = make_tenant("alpha"), make_tenant("beta")
    key_a, key_b = make_key(tenant_a), make_key(tenant_b)
    post(gateway_server, key_a, {"model": "gpt-4o", "messages": HI})
    post(gateway_server, key_a, {"model": "gpt-4o", "messages": [{"role": "user", "content": "two"}]})
    post(gateway_server, key_b, {"model": "gpt-4o", "messages": HI})
    out = io.StringIO()
    call_command("cache", "stats", "--tenant", "alpha", stdout=out)
    call_command("cache", "stats", "--tenant", "alpha", "--model", "text-embedding-3-small", stdout=out)
    call_command("cache", "invalidate", "--tenant", "beta", "--model", "gpt-4o", stdout=out)
    call_command("cache", "stats", "--tenant", "alpha", stdout=out)
    assert out.getvalue().splitlines() == [
        "2 cached answers for tenant alpha (all models)",
        "0 cached answers for tenant alpha (model text-embedding-3-small)",
        "1 cached answers dropped for tenant beta (model gpt-4o)",
        "2 cached answers for tenant alpha (all models)",
    ]
    assert post(gateway_server, key_a, {"model": "gpt-4o", "messages": HI}).headers["x-chittycan-cache"] == "HIT"
    assert post(gateway_server, key_b, {"model": "gpt-4o", "messages": HI}).headers["x-chittycan-cache"] == "MISS"
    with pytest.raises(CommandError, match="no tenant"):
        call_command("cache", "stats", "--tenant", "nobody")


def test_quickstart_turns_the_demo_model_cache_on(transactional_db, tmp_path):
    from django.core.management import call_command

    from gateway.models import LLMModel

    LLMModel.objects.get_or_create(name="gpt-4o-mini")
    assert not LLMModel.objects.get(name="gpt-4o-mini").cache_enabled
    call_command("quickstart", "--key-file", str(tmp_path / "key.txt"), stdout=io.StringIO())
    model = LLMModel.objects.get(name="gpt-4o-mini")
    assert model.cache_enabled and model.cache_ttl == 86_400


def test_yaml_cache_round_trip(transactional_db, tmp_path):
    from django.core.management import CommandError, call_command

    from gateway.models import LLMModel

    config = tmp_path / "chittycan.yaml"
    config.write_text("version: 1\nmodels:\n  - name: cached-model\n    cache: {ttl: 600}\n  - name: plain-model\n")
    call_command("apply", "-f", str(config), stdout=io.StringIO())
    assert LLMModel.objects.get(name="cached-model").cache_enabled
    assert LLMModel.objects.get(name="cached-model").cache_ttl == 600
    assert not LLMModel.objects.get(name="plain-model").cache_enabled
    out = io.StringIO()
    call_command("export", stdout=out)
    exported = {m["name"]: m for m in yaml.safe_load(out.getvalue())["models"]}
    assert exported["cached-model"]["cache"] == {"ttl": 600}
    assert "cache" not in exported["plain-model"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nmodels:\n  - name: m\n    cache: {ttl: 0}\n")
    out, err = io.StringIO(), io.StringIO()
    with pytest.raises(CommandError, match="nothing was written"):
        call_command("apply", "-f", str(bad), stdout=out, stderr=err)
    assert "ttl" in out.getvalue() + err.getvalue()


def test_cli_refuses_in_the_embedded_mode():
    env = {**os.environ, "REDIS_URL": ""}
    done = subprocess.run(
        [sys.executable, "-m", "chittycan.cli", "cache", "stats", "--tenant", "demo"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0 and "inside the gateway process" in done.stderr


def test_admin_model_form_has_the_cache_fields(transactional_db):
    from gateway.admin import LLMModelForm
    from gateway.models import LLMModel

    data = {"name": "admin-cached", "kind": "chat", "aliases": "[]", "owned_by": "x", "context_window": 1000}
    data |= {"max_output_tokens": 100, "is_active": "on", "cache_enabled": "on"}
    bad = LLMModelForm(data={**data, "cache_ttl": 0})
    assert not bad.is_valid() and "cache_ttl" in bad.errors
    good = LLMModelForm(data={**data, "cache_ttl": 120})
    assert good.is_valid(), good.errors
    good.save()
    stored = LLMModel.objects.get(name="admin-cached")
    assert stored.cache_enabled and stored.cache_ttl == 120
    defaulted = LLMModelForm(data={**data, "name": "admin-default"})  # a post without the TTL
    assert defaulted.is_valid(), defaulted.errors
    defaulted.save()
    assert LLMModel.objects.get(name="admin-default").cache_ttl == 86_400
