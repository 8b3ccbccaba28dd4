"""``/metrics`` (Prometheus), ``/healthz``, ``/readyz`` and the per-request JSON log line.

The metric values are compared with the ledger: a known set of requests (non-stream, stream, an
upstream 400, a refused key) moves the counters by exactly what the ledger rows say.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
import redis
from django.conf import settings
from django.test import RequestFactory, override_settings
from prometheus_client.parser import text_string_to_metric_families

from budgets import services as budget_services
from chittycan import probes
from chittycan.logging import JsonFormatter
from core import runtime
from gateway import catalog, metrics
from gateway.models import LLMModel, Provider
from gateway.routing import breaker
from ledger import writer
from tests.conftest import exact_usage
from tests.fakes.openai_upstream import Reply
from tests.processes import Gateway, services_env

CHAT = "/v1/chat/completions"
MSG = [{"role": "user", "content": "hello there"}]


def scrape(base_url: str, token: str | None = None) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    response = httpx.get(f"{base_url}/metrics", headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def total(samples: dict[Any, float], name: str, **labels: str) -> float:
    return sum(
        value
        for (sample_name, sample_labels), value in samples.items()
        if sample_name == name and all(dict(sample_labels).get(k) == v for k, v in labels.items())
    )


def test_metrics_agree_with_the_ledger(upstream, gateway_server, openai_client, tenant_key):
    tenant, plaintext = tenant_key
    before = scrape(gateway_server.url)

    openai_client.chat.completions.create(model="gpt-4o", messages=MSG)
    openai_client.chat.completions.create(model="gpt-4o", messages=MSG, max_tokens=20)
    list(
        openai_client.chat.completions.create(
            model="gpt-4o", messages=MSG, stream=True, stream_options={"include_usage": True}
        )
    )
    upstream.push(
        CHAT, Reply(status=400, json={"error": {"message": "bad", "type": "invalid_request_error", "code": None}})
    )
    with pytest.raises(openai.BadRequestError):
        openai_client.chat.completions.create(model="gpt-4o", messages=MSG)
    refused = httpx.post(
        f"{gateway_server.url}{CHAT}",
        headers={"Authorization": "Bearer sk-not-a-key"},
        json={"model": "gpt-4o", "messages": MSG},
    )
    assert refused.status_code == 401

    rows = exact_usage(tenant, 4)
    after = scrape(gateway_server.url)

    def delta(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    chat = {"route": "chat", "model": "gpt-4o", "provider": "fake-openai"}
    ok = [r for r in rows if r.http_status == 200]
    assert len(ok) == 3 and sum(1 for r in rows if r.http_status == 400) == 1
    assert delta("chittycan_requests_total", **chat, status_class="2xx", cache="none") == 3
    assert delta("chittycan_requests_total", **chat, status_class="4xx") == 1
    # The refused key never reached a model or provider: counted, with empty labels.
    assert delta("chittycan_requests_total", route="chat", model="", provider="", status_class="4xx") == 1

    assert delta("chittycan_tokens_total", **chat, kind="input") == sum(r.prompt_tokens for r in rows)
    assert delta("chittycan_tokens_total", **chat, kind="output") == sum(r.completion_tokens for r in rows)
    assert delta("chittycan_tokens_total", **chat, kind="cached") == sum(r.cached_tokens for r in rows)
    assert sum(r.prompt_tokens for r in rows) > 0
    cost = delta("chittycan_cost_usd_total", **chat)
    assert cost == pytest.approx(sum(r.cost_micro for r in rows) / 1_000_000, abs=1e-9)
    assert cost > 0

    # Histograms: every request in the latency one, the stream alone in time to first token.
    assert delta("chittycan_request_duration_seconds_count", **chat) == 4
    assert delta("chittycan_upstream_duration_seconds_count", model="gpt-4o", provider="fake-openai") == 4
    assert delta("chittycan_time_to_first_token_seconds_count", model="gpt-4o", provider="fake-openai") == 1
    buckets = {dict(labels)["le"] for name, labels in after if name == "chittycan_request_duration_seconds_bucket"}
    assert {"0.001", "60.0", "+Inf"} <= buckets
    # No tenant label unless the operator allows it.
    assert {dict(labels).get("tenant") for name, labels in after if name == "chittycan_requests_total"} == {""}


def test_retries_and_fallbacks(upstream, fake_openai, gateway_server, openai_client, tenant_key):
    provider = Provider.objects.create(
        slug="backup-openai", kind="openai", base_url=f"{fake_openai[1].url}/backup/v1", max_retries=0
    )
    LLMModel.objects.get(name="gpt-4o").deployments.create(provider=provider, upstream_model="gpt-4o-b", priority=1)
    boom = Reply(status=500, json={"error": {"message": "boom", "type": "server_error", "code": None}})
    before = scrape(gateway_server.url)
    upstream.push(CHAT, boom)  # the primary fails once, its retry answers
    openai_client.chat.completions.create(model="gpt-4o", messages=MSG)
    upstream.push(CHAT, boom, boom)  # the primary fails twice (max_retries=1): the backup answers
    openai_client.chat.completions.create(model="gpt-4o", messages=MSG)
    exact_usage(tenant_key[0], 2, settle=0)
    after = scrape(gateway_server.url)

    def delta(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    primary = {"route": "chat", "model": "gpt-4o", "provider": "fake-openai"}
    fallback = {"route": "chat", "model": "gpt-4o", "provider": "backup-openai"}
    assert delta("chittycan_upstream_retries_total", **primary) == 1
    assert delta("chittycan_upstream_retries_total", **fallback) == 2
    assert delta("chittycan_fallbacks_total", **primary) == 0
    assert delta("chittycan_fallbacks_total", **fallback) == 1


def test_cache_hits_and_savings_agree_with_the_ledger(upstream, gateway_server, openai_client, tenant_key):
    catalog.model_update(LLMModel.objects.get(name="gpt-4o"), cache_enabled=True, cache_ttl=600)
    before = scrape(gateway_server.url)
    for _ in range(3):  # a miss, then two hits
        openai_client.chat.completions.create(model="gpt-4o", messages=MSG)
    rows = exact_usage(tenant_key[0], 3)
    after = scrape(gateway_server.url)

    def delta(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    hits = [r for r in rows if r.cache_hit]
    assert len(hits) == 2 and all(r.saved_micro > 0 for r in hits)
    chat = {"route": "chat", "model": "gpt-4o", "provider": "fake-openai"}
    assert delta("chittycan_cache_hits_total", **chat) == 2
    assert delta("chittycan_requests_total", **chat, cache="hit") == 2
    assert delta("chittycan_requests_total", **chat, cache="miss") == 1
    saved = delta("chittycan_cache_saved_usd_total", **chat)
    assert saved == pytest.approx(sum(r.saved_micro for r in hits) / 1_000_000, abs=1e-9)
    # What the hits saved is what the miss cost, twice.
    [miss] = [r for r in rows if not r.cache_hit]
    assert saved == pytest.approx(2 * miss.cost_micro / 1_000_000, abs=1e-9)


def test_breaker_state_per_deployment(upstream, fake_openai, gateway_server, openai_client, tenant_key):
    primary = Provider.objects.get(slug="fake-openai")
    primary.breaker_failures, primary.max_retries = 1, 0
    primary.save()
    backup = Provider.objects.create(
        slug="backup-openai", kind="openai", base_url=f"{fake_openai[1].url}/backup/v1", max_retries=0
    )
    deployment = LLMModel.objects.get(name="gpt-4o").deployments.create(
        provider=backup, upstream_model="gpt-4o-b", priority=1
    )
    first = LLMModel.objects.get(name="gpt-4o").deployments.get(provider=primary)
    samples = scrape(gateway_server.url)
    assert total(samples, "chittycan_breaker_state", deployment=str(first.pk), state="closed") == 1
    assert total(samples, "chittycan_breaker_state", deployment=str(first.pk), state="open") == 0
    try:
        upstream.push(CHAT, Reply(status=500, json={"error": {"message": "boom", "type": "server_error"}}))
        openai_client.chat.completions.create(model="gpt-4o", messages=MSG)  # the backup answers
        samples = scrape(gateway_server.url)
        by_state = {
            state: total(samples, "chittycan_breaker_state", deployment=str(first.pk), state=state)
            for state in ("closed", "open", "half_open")
        }
        assert by_state == {"closed": 0, "open": 1, "half_open": 0}
        assert total(samples, "chittycan_breaker_state", model="gpt-4o", provider="fake-openai", state="open") == 1
        assert total(samples, "chittycan_breaker_state", deployment=str(deployment.pk), state="closed") == 1
    finally:
        breaker.reset_local()


def test_tenant_label_only_when_allowed(upstream, gateway_server, openai_client, tenant_key):
    with override_settings(CHITTYCAN_METRICS_TENANT_LABEL=True):
        openai_client.chat.completions.create(model="gpt-4o", messages=MSG)
        exact_usage(tenant_key[0], 1, settle=0)
        samples = scrape(gateway_server.url)
    assert total(samples, "chittycan_requests_total", tenant="acme", status_class="2xx") >= 1
    assert total(samples, "chittycan_cost_usd_total", tenant="acme") > 0


def test_metrics_token(gateway_server, transactional_db):
    with override_settings(CHITTYCAN_METRICS_TOKEN="s3cret-scrape"):
        missing = httpx.get(f"{gateway_server.url}/metrics")
        wrong = httpx.get(f"{gateway_server.url}/metrics", headers={"Authorization": "Bearer nope"})
        assert missing.status_code == wrong.status_code == 401
        assert missing.json()["error"]["type"] == "authentication_error"
        assert "chittycan_requests" not in missing.text
        scrape(gateway_server.url, token="s3cret-scrape")
    # No token configured: loopback only, and not through a reverse proxy on loopback.
    proxied = httpx.get(f"{gateway_server.url}/metrics", headers={"X-Forwarded-For": "203.0.113.9"})
    assert proxied.status_code == 401
    assert metrics.token_ok(None, "127.0.0.1") and metrics.token_ok(None, "::1")
    assert not metrics.token_ok(None, "10.1.2.3")
    with override_settings(CHITTYCAN_METRICS_TOKEN="s3cret-scrape"):
        assert not metrics.token_ok(None, "127.0.0.1")
        assert metrics.token_ok("Bearer s3cret-scrape", "10.1.2.3")


def test_budget_utilisation_from_the_counters(upstream, gateway_server, openai_client, tenant_key):
    tenant = tenant_key[0]
    budget = budget_services.budget_set(tenant=tenant, period="month", limit_micro=1_000_000)
    openai_client.chat.completions.create(model="gpt-4o", messages=MSG)
    [row] = exact_usage(tenant, 1, settle=0.1)
    samples = scrape(gateway_server.url)
    ratio = total(samples, "chittycan_budget_utilisation_ratio", budget=str(budget.pk))
    assert row.cost_micro > 0
    assert ratio == pytest.approx(row.cost_micro / 1_000_000)


def test_usage_queue_depth_and_lag(gateway_server, paused_gateway_writer, transactional_db):
    time.sleep(0.3)  # the writer stops
    conn = redis.Redis.from_url(settings.REDIS_URL)
    key = writer.stream_key()
    ids = [conn.xadd(key, {b"row": b"{}"}, id=f"{int(time.time() * 1000) - 5000}-0"), conn.xadd(key, {b"row": b"{}"})]
    try:
        samples = scrape(gateway_server.url)
        assert total(samples, "chittycan_usage_queue_depth") == 2
        assert 4.5 < total(samples, "chittycan_usage_queue_lag_seconds") < 60
    finally:
        conn.xdel(key, *ids)
        conn.close()
    samples = scrape(gateway_server.url)
    assert total(samples, "chittycan_usage_queue_depth") == 0
    assert total(samples, "chittycan_usage_queue_lag_seconds") == 0


def test_healthz_and_readyz(gateway_server, transactional_db):
    assert httpx.get(f"{gateway_server.url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{gateway_server.url}/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json() == {"status": "ready", "checks": {"database": "ok", "redis": "ok", "usage_writer": "ok"}}


def test_readyz_unready_when_redis_is_unreachable(transactional_db):
    async def probe() -> Any:
        with override_settings(REDIS_URL="redis://127.0.0.1:1/0"):
            try:
                return await probes.readyz(RequestFactory().get("/readyz"))
            finally:
                await runtime.stop_background()  # what the probe started on this loop

    response = asyncio.run(probe())
    assert response.status_code == 503
    body = orjson.loads(response.content)
    assert body["status"] == "unavailable"
    assert body["checks"]["redis"].startswith("unreachable")
    assert body["checks"]["database"] == "ok"


def test_one_json_log_line_per_request(upstream, gateway_server, openai_client, tenant_key, caplog):
    caplog.set_level(logging.INFO, logger="chittycan.requests")
    response = openai_client.chat.completions.with_raw_response.create(model="gpt-4o", messages=MSG)
    request_id = response.headers["x-request-id"]
    [row] = exact_usage(tenant_key[0], 1, settle=0.1)
    lines = [r for r in caplog.records if r.name == "chittycan.requests" and r.request_id == request_id]
    assert len(lines) == 1
    record = lines[0].__dict__
    assert record["tenant"] == "acme" and record["key_name"] == "test"
    assert record["model"] == "gpt-4o" and record["provider"] == "fake-openai" and record["status"] == 200
    assert record["input_tokens"] == row.prompt_tokens and record["output_tokens"] == row.completion_tokens
    assert record["cost_usd"] == pytest.approx(row.cost_micro / 1_000_000)
    formatted = JsonFormatter().format(lines[0])
    assert tenant_key[1] not in formatted and tenant_key[1][:12] not in formatted
    assert "hello there" not in formatted and "sk-upstream-secret" not in formatted


def test_request_log_line_can_be_silenced():
    code = (
        "import django, logging; django.setup(); "
        "print(logging.getLogger('chittycan.requests').isEnabledFor(logging.INFO))"
    )
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "chittycan.settings"}
    on = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    env["CHITTYCAN_REQUEST_LOG"] = "false"
    off = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert on.stdout.strip() == "True" and off.stdout.strip() == "False"


def test_several_workers_one_answer(upstream, make_tenant, make_key, tmp_path: Path):
    """`can serve --workers 2`: whichever worker answers /metrics counts every worker's requests."""
    tenant = make_tenant("multi")
    key = make_key(tenant, name="mw")
    env = {
        **services_env(),
        "CHITTYCAN_MODE": "dev",  # every catalogue model (gpt-4o here) answers from the offline mock
        "CHITTYCAN_WORKERS": "2",
        "CHITTYCAN_VAR_DIR": str(tmp_path),
        "SECRET_KEY": settings.SECRET_KEY,
        "CHITTYCAN_KEY_SECRET": settings.CHITTYCAN_KEY_SECRET,
    }
    stale = tmp_path / "prometheus" / "counter_999999.db"
    stale.parent.mkdir()
    stale.write_bytes(b"left by an earlier run")  # emptied at start
    gateway = Gateway(env, production_server=True, log_path=tmp_path / "gateway.log")
    try:

        def one(_: int) -> int:
            with httpx.Client() as client:  # a new connection each: the kernel spreads them over workers
                response = client.post(
                    f"{gateway.url}{CHAT}",
                    headers={"Authorization": f"Bearer {key}"},
                    json={"model": "gpt-4o", "messages": MSG},
                    timeout=30,
                )
            return response.status_code

        def workers() -> set[str]:
            return {p.stem.rsplit("_", 1)[1] for p in (tmp_path / "prometheus").glob("counter_*.db")}

        # The kernel hands each new connection to whichever worker accepts first: a worker still
        # warming up may get none of a first burst. Send bursts until both have served (or 10).
        sent = 0
        with ThreadPoolExecutor(max_workers=8) as pool:
            while sent < 400 and (sent == 0 or len(workers()) < 2):
                assert set(pool.map(one, range(40))) == {200}
                sent += 40
        pids = workers()
        assert "999999" not in pids
        assert len(pids) == 2, f"both workers served requests (after {sent})"
        for _ in range(6):  # several scrapes, answered by either worker: always the sum
            samples = scrape(gateway.url)
            assert total(samples, "chittycan_requests_total", model="gpt-4o", status_class="2xx") == sent
    finally:
        gateway.stop()


def test_requests_by_cache_result(upstream, gateway_server, openai_client, tenant_key):
    """The cache stage's verdict is the `cache` label: a miss, then a hit, then a no-store bypass."""
    from tests.test_cache import enable_cache

    enable_cache("gpt-4o")
    before = scrape(gateway_server.url)
    body = {"model": "gpt-4o", "messages": MSG}
    for headers in ({}, {}, {"cache-control": "no-store"}):
        answer = httpx.post(
            f"{gateway_server.url}/v1/chat/completions",
            json=body,
            headers={"authorization": f"Bearer {tenant_key[1]}", **headers},
            timeout=10,
        )
        assert answer.status_code == 200
    exact_usage(tenant_key[0], 3, settle=0)
    after = scrape(gateway_server.url)
    for result in ("miss", "hit", "bypass"):
        labels = {"route": "chat", "model": "gpt-4o", "cache": result}
        assert (
            total(after, "chittycan_requests_total", **labels) - total(before, "chittycan_requests_total", **labels)
            == 1
        )
