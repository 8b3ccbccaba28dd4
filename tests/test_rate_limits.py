"""Requests and tokens per minute, per key and per tenant, shared by every gateway process."""

from __future__ import annotations

import time
from collections import Counter

import openai
import pytest

from tests.test_budgets import chat, client_for
from tests.test_budgets_concurrency import fire, gateways  # noqa: F401  (fixture)


def fresh_window(margin: float = 8.0) -> None:
    """Fixed one-minute windows: do not start a test just before a minute boundary."""
    left = 60 - time.time() % 60
    if left < margin:
        time.sleep(left + 0.05)


def test_key_rpm_limit_is_429_with_headers(upstream, gateway_server, make_tenant, make_key):
    tenant = make_tenant("rpm")
    key = make_key(tenant, rpm_limit=2)
    client = client_for(gateway_server, key)
    fresh_window()
    first = chat(client)
    assert first.headers["x-ratelimit-limit-requests"] == "2"
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    assert first.headers["x-ratelimit-reset-requests"].endswith("s")
    second = chat(client)
    assert second.headers["x-ratelimit-remaining-requests"] == "0"
    with pytest.raises(openai.RateLimitError) as exc:
        chat(client)
    err = exc.value
    assert err.status_code == 429 and err.code == "rate_limit_exceeded"
    assert "2 requests per minute" in err.message and "this API key" in err.message
    headers = err.response.headers
    assert 1 <= int(headers["retry-after"]) <= 60
    assert headers["x-ratelimit-limit-requests"] == "2" and headers["x-ratelimit-remaining-requests"] == "0"
    assert len(upstream.requests) == 2


def test_tenant_rpm_limit_spans_keys_and_children(upstream, gateway_server, make_tenant, make_key):
    org = make_tenant("org-rpm")
    org.rpm_limit = 3
    org.save()
    team = make_tenant("team-rpm", parent=org)
    a = client_for(gateway_server, make_key(org))
    b = client_for(gateway_server, make_key(team))
    fresh_window()
    chat(a)
    chat(b)
    chat(a)
    with pytest.raises(openai.RateLimitError) as exc:
        chat(b)
    assert "the tenant" in exc.value.message


def test_tpm_counts_the_output_cap_then_corrects_to_actual_usage(upstream, gateway_server, make_tenant, make_key):
    tenant = make_tenant("tpm")
    key = make_key(tenant, tpm_limit=1_000)
    client = client_for(gateway_server, key)
    fresh_window()
    # A cap alone larger than the limit can never fit (OpenAI counts max_tokens the same way).
    with pytest.raises(openai.RateLimitError) as exc:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}], max_tokens=2000)
    assert "1000 tokens per minute" in exc.value.message
    assert exc.value.response.headers["x-ratelimit-limit-tokens"] == "1000"
    # Each request reserves prompt + 900 tokens but uses 17 (10 in + 7 out): many fit in a minute.
    for _ in range(5):
        res = client.chat.completions.with_raw_response.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hi"}], max_tokens=900
        )
    remaining = int(res.headers["x-ratelimit-remaining-tokens"])
    # After four corrected requests (4 x 17 tokens) plus this one's charge (its prompt estimate + 900).
    assert 1_000 - 4 * 17 - 900 - 20 <= remaining < 1_000 - 4 * 17 - 900


def test_rate_limits_are_shared_by_two_gateway_processes(upstream, gateways, make_tenant, make_key):  # noqa: F811
    tenant = make_tenant("shared-rpm")
    key = make_key(tenant, rpm_limit=10)
    procs = gateways.pair()
    fresh_window(20)
    responses = fire([g.url for g in procs], key, 30, concurrency=10, max_tokens=10)
    statuses = Counter(r.status_code for r in responses)
    assert statuses == {200: 10, 429: 20}
    limited = [r for r in responses if r.status_code == 429]
    assert all(r.json()["error"]["code"] == "rate_limit_exceeded" and r.headers["retry-after"] for r in limited)
