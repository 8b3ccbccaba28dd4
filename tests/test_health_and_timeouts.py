"""Per-hop timeouts (connect, first byte, total), active health probes, passive outlier detection and
cross-kind fallback, against fake upstreams on loopback (docs/resilience.md).

A model ``gpt-4o`` has a primary deployment and a fallback (tests/test_breakers.py ``pair``); a
connect that never completes is a listening socket that never accepts (tests/fakes/blackhole.py).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from io import StringIO
from typing import Any

import anthropic
import httpx
import openai
import pytest
from django.core.management import call_command

from tests.anthropic_support import add_priced_model, fake_anthropic_server  # noqa: F401
from tests.conftest import add_model, exact_usage
from tests.fakes.anthropic_upstream import FakeAnthropic
from tests.fakes.blackhole import BlackHole
from tests.fakes.openai_upstream import Fault
from tests.fakes.server import ServerThread
from tests.test_breakers import (  # noqa: F401
    _fresh_breakers,
    breaker_rows,
    chat,
    chats,
    fallback_server,
    make_provider,
    pair,
    state_of,
    streams_try_failing_deployments,
)


@pytest.fixture(autouse=True)
def _fresh_health() -> Iterator[None]:
    from gateway.routing import health

    health.reset_local()
    yield
    health.reset_local()


@pytest.fixture
def blackhole() -> Iterator[BlackHole]:
    hole = BlackHole()
    yield hole
    hole.close()


def rows_by_provider() -> dict[str, dict[str, Any]]:
    return {r["provider"]: r for r in breaker_rows()}


def probe_now() -> str:
    out = StringIO()
    call_command("providers", "probe", stdout=out)
    return out.getvalue()


# --- per-hop timeouts ------------------------------------------------------------------------------


def test_a_connect_that_never_completes_fails_over_within_the_connect_timeout(
    gateway_server,
    transactional_db,
    fallback_server,  # noqa: F811
    blackhole,
    tenant_key,
    streams_try_failing_deployments,  # noqa: F811
):
    fallback_app, fallback_srv = fallback_server
    fallback_app.reset()
    assert not blackhole.connect_completes(0.3)
    dead = make_provider("dead", blackhole.url, connect_timeout=0.5)
    healthy = make_provider("fallback", fallback_srv.url)
    add_model("gpt-4o", dead, upstream="gpt-4o-2024-08-06", priority=0)
    add_model("gpt-4o", healthy, upstream="gpt-4o-2024-08-06", priority=1)
    for stream in (False, True):
        started = time.monotonic()
        response = chat(gateway_server.url, tenant_key[1], stream=stream)
        assert response.status_code == 200, response.text
        assert response.headers["x-chittycan-route"] == "fallback:1"
        assert time.monotonic() - started < 3
    assert chats(fallback_app) == 2
    assert rows_by_provider()["dead"]["consecutive_failures"] == 2


def test_the_providers_first_byte_timeout_fails_over_before_its_read_timeout(
    gateway_server,
    pair,  # noqa: F811
    tenant_key,
    streams_try_failing_deployments,  # noqa: F811
):
    primary, fallback, provider = pair
    provider.first_byte_timeout = 0.5  # the read timeout stays 600 s
    provider.save()
    primary.set_fault(Fault("stall", stall=5.0))
    for stream in (False, True):
        started = time.monotonic()
        response = chat(gateway_server.url, tenant_key[1], stream=stream)
        assert response.status_code == 200
        assert response.headers["x-chittycan-route"] == "fallback:1"
        assert time.monotonic() - started < 3
        if stream:
            assert b"data: [DONE]" in response.content
    assert chats(primary) == 2 and chats(fallback) == 2


def test_a_total_timeout_before_the_answer_fails_over(gateway_server, pair, tenant_key):  # noqa: F811
    primary, fallback, provider = pair
    provider.total_timeout = 0.5
    provider.save()
    primary.set_fault(Fault("stall", stall=5.0))
    started = time.monotonic()
    response = chat(gateway_server.url, tenant_key[1])
    assert response.status_code == 200 and response.headers["x-chittycan-route"] == "fallback:1"
    assert time.monotonic() - started < 3


def test_a_stream_past_its_total_timeout_ends_with_an_error_event_and_partial_usage(
    gateway_server,
    pair,  # noqa: F811
    tenant_key,
):
    """Frames 0.4 s apart, a total limit of 1 s: the stream has started, so it is not retried but
    cut with the OpenAI in-stream error (the SDK raises), and the row keeps the partial usage."""
    primary, fallback, provider = pair
    provider.total_timeout = 1.0
    provider.save()
    body = {"model": "gpt-4o-2024-08-06", "messages": [{"role": "user", "content": "hi"}]}
    slow = primary.chat_stream_reply({**body, "stream_options": {"include_usage": True}})
    slow.frame_delay = 0.4
    primary.push("/v1/chat/completions", slow)
    client = openai.OpenAI(base_url=f"{gateway_server.url}/v1", api_key=tenant_key[1], max_retries=0)
    received: list[str | None] = []
    started = time.monotonic()
    with pytest.raises(openai.APIError):
        for part in client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hi"}], stream=True
        ):
            received.append(part.choices[0].delta.content if part.choices else None)
    assert time.monotonic() - started < 2.5
    assert 1 <= len(received) < 6
    assert chats(primary) == 1 and chats(fallback) == 0
    [row] = exact_usage(tenant_key[0], 1)
    assert row.status == "upstream_error" and row.http_status == 200 and row.stream
    assert row.usage_source == "estimated" and row.prompt_tokens > 0


# --- active probes --------------------------------------------------------------------------------


def test_active_probes_open_the_breaker_before_any_client_and_close_it_on_recovery(
    gateway_server,
    pair,  # noqa: F811
    tenant_key,
    settings,
):
    from gateway.tasks import probe_providers

    primary, fallback, provider = pair
    provider.probe_enabled = True
    provider.probe_interval = 1.0
    provider.save()
    assert settings.CELERY_BEAT_SCHEDULE["provider-probes"]["task"] == "gateway.tasks.probe_providers"
    assert probe_providers() == {"probed": 1, "failed": 0}  # the beat task: the primary (its provider probes)
    assert rows_by_provider()["primary"]["health"]["last_probe"]["result"] == "ok"
    assert chats(primary) == 1 and chats(fallback) == 0
    probe_sent = primary.requests[-1].body
    assert probe_sent["max_tokens"] == 1 and probe_sent["model"] == "gpt-4o-2024-08-06"

    primary.set_fault(Fault("down"))
    for _ in range(3):  # the threshold, met by probes alone
        assert "failed" in probe_now()
    row = rows_by_provider()["primary"]
    assert row["state"] == "open" and row["health"]["last_probe"]["result"] == "failed"
    assert "fake upstream is down" in row["health"]["last_probe"]["error"]
    assert "skipped" in probe_now()  # open: a probe does not reach the upstream either
    assert chats(primary) == 4
    time.sleep(1.1)  # the breaker cache TTL: the gateway sees the open breaker
    response = chat(gateway_server.url, tenant_key[1])
    assert response.headers["x-chittycan-route"] == "fallback:1 (breaker open: primary:gpt-4o-2024-08-06)"
    assert chats(primary) == 4  # no client request met the outage

    primary.set_fault(None)
    time.sleep(2.1)  # the cool-down: the next probe is the half-open one, and it closes the breaker
    # The gateway's embedded scheduler probes too (the provider asks every second), so the half-open
    # probe may be its, not ours: ours then reports "skipped" (the lease is taken) or follows it.
    deadline = time.monotonic() + 15
    while state_of("primary") != "closed" and time.monotonic() < deadline:
        probe_now()
        time.sleep(0.2)
    assert state_of("primary") == "closed"
    after_outage = [r.body for r in primary.requests[4:] if r.path.endswith("/chat/completions")]
    assert after_outage and all(body["max_tokens"] == 1 for body in after_outage)  # probes only
    time.sleep(1.1)
    assert chat(gateway_server.url, tenant_key[1]).headers["x-chittycan-route"] == "primary"


def test_probe_results_are_in_health_providers_and_the_status_table(gateway_server, pair, tenant_key):  # noqa: F811
    from django.contrib.auth import get_user_model

    from control import tokens

    primary, _, provider = pair
    provider.probe_enabled = True
    provider.probe_request = {"messages": [{"role": "user", "content": "are you there?"}], "max_tokens": 2}
    provider.save()
    probe_now()
    assert primary.requests[-1].body["messages"][0]["content"] == "are you there?"
    _, token = tokens.token_create(user=get_user_model().objects.create_user("ops", password="pw-ops-1"), name="health")
    answer = httpx.get(
        f"{gateway_server.url}/health/providers", headers={"authorization": f"Bearer {token}"}, timeout=10
    ).json()
    rows = {d["provider"]: d for d in answer["deployments"]}
    assert rows["primary"]["health"]["probes"] is True
    assert rows["primary"]["health"]["last_probe"]["result"] == "ok"
    assert rows["primary"]["health"]["last_probe"]["tokens"] > 0
    assert rows["fallback"]["health"]["probes"] is False and rows["fallback"]["health"]["last_probe"] is None
    out = StringIO()
    call_command("providers", "status", stdout=out)
    table = out.getvalue()
    assert "LAST PROBE" in table
    assert re.search(r"primary .* ok \d+s ago \(\d+ ms\)", table), table


# --- passive outlier detection ----------------------------------------------------------------------


def test_a_latency_outlier_among_equal_deployments_is_ejected(gateway_server, pair, tenant_key):  # noqa: F811
    from gateway.models import Deployment

    primary, fallback, provider = pair
    Deployment.objects.filter(provider__slug="fallback").update(priority=0)  # one pool of two, weighted 1:1
    provider.outlier_latency_factor = 3.0
    provider.save()
    primary.set_fault(Fault("stall", stall=0.35))  # answers, slowly; the fallback answers at once
    for _ in range(60):
        assert chat(gateway_server.url, tenant_key[1]).status_code == 200
        if rows_by_provider()["primary"]["state"] == "open":
            break
    row = rows_by_provider()["primary"]
    assert row["state"] == "open", row
    assert "latency outlier" in row["health"]["last_ejection"]["reason"]
    assert rows_by_provider()["fallback"]["state"] == "closed"
    before = chats(primary)
    time.sleep(1.1)
    for _ in range(5):
        assert chat(gateway_server.url, tenant_key[1]).status_code == 200
    assert chats(primary) == before  # ejected: skipped until the half-open probe


def test_no_outlier_detection_when_the_factor_is_zero(gateway_server, pair, tenant_key):  # noqa: F811
    from gateway.models import Deployment

    primary, _, _ = pair
    Deployment.objects.filter(provider__slug="fallback").update(priority=0)
    primary.set_fault(Fault("stall", stall=0.3))
    for _ in range(30):
        assert chat(gateway_server.url, tenant_key[1]).status_code == 200
    row = rows_by_provider()["primary"]
    assert row["state"] == "closed" and row["health"]["last_ejection"] is None


# --- cross-kind fallback ------------------------------------------------------------------------------


@pytest.fixture
def anthropic_fake(
    fake_anthropic_server: tuple[FakeAnthropic, ServerThread],  # noqa: F811
) -> FakeAnthropic:
    app, _ = fake_anthropic_server
    app.reset()
    return app


def _anthropic_provider(url: str, **fields: Any) -> Any:
    from gateway.models import Provider

    values: dict[str, Any] = {"max_retries": 0, "breaker_failures": 3, "breaker_cooldown": 2.0, **fields}
    provider = Provider(slug="claude", kind="anthropic", base_url=url, **values)
    provider.api_key = "sk-ant-upstream-secret"
    provider.save()
    return provider


def test_an_openai_request_falls_back_to_an_anthropic_deployment_and_back(
    gateway_server,
    transactional_db,
    fake_openai,
    fake_anthropic_server,  # noqa: F811
    anthropic_fake,
    tenant_key,
):
    """gpt-4o: an OpenAI deployment first, Claude second (through the translator). The OpenAI SDK
    sees a chat completion either way, streamed or not; when the OpenAI upstream is back (its
    breaker's half-open probe), traffic goes back to it."""
    oa_app, oa_server = fake_openai
    _, anth_server = fake_anthropic_server
    first = make_provider("openai-first", oa_server.url)
    add_model("gpt-4o", first, upstream="gpt-4o-2024-08-06", priority=0)
    add_model("gpt-4o", _anthropic_provider(anth_server.url), upstream="claude-sonnet-4-20250514", priority=1)
    oa_app.set_fault(Fault("down"))
    client = openai.OpenAI(base_url=f"{gateway_server.url}/v1", api_key=tenant_key[1], max_retries=0)
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    completion = raw.parse()
    assert raw.headers["x-chittycan-route"] == "fallback:1"
    assert completion.object == "chat.completion" and completion.choices[0].message.content
    assert completion.usage is not None and completion.usage.completion_tokens > 0
    parts = list(
        client.chat.completions.create(
            model="gpt-4o",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(p.choices[0].delta.content or "" for p in parts if p.choices)
    assert text and parts[-1].usage is not None
    assert [r.path for r in anthropic_fake.requests] == ["/v1/messages", "/v1/messages"]
    rows = exact_usage(tenant_key[0], 2)
    assert {r.provider for r in rows} == {"claude"} and all(r.status == "ok" for r in rows)

    for _ in range(2):  # the third failure opens the OpenAI deployment's breaker
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert state_of("openai-first") == "open"
    oa_app.set_fault(None)
    time.sleep(2.1)  # the cool-down
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert raw.headers["x-chittycan-route"] == "primary"  # back on the OpenAI deployment
    assert len(anthropic_fake.requests) == 4


def test_an_anthropic_request_falls_back_to_an_openai_deployment(
    gateway_server,
    transactional_db,
    fake_openai,
    fake_anthropic_server,  # noqa: F811
    anthropic_fake,
    tenant_key,
    streams_try_failing_deployments,  # noqa: F811
):
    """claude-sonnet-4: Claude first, an OpenAI-compatible deployment second; the Anthropic SDK gets
    an Anthropic message (and stream) from the OpenAI fake through the bridge."""
    from gateway.models import Deployment, LLMModel

    oa_app, oa_server = fake_openai
    _, anth_server = fake_anthropic_server
    model = add_priced_model(
        "claude-sonnet-4", _anthropic_provider(anth_server.url), upstream="claude-sonnet-4-20250514"
    )
    Deployment.objects.create(
        model=LLMModel.objects.get(pk=model.pk),
        provider=make_provider("openai-second", oa_server.url),
        upstream_model="gpt-4o-2024-08-06",
        priority=1,
    )
    anthropic_fake.set_fault(Fault("down"))
    client = anthropic.Anthropic(base_url=gateway_server.url, api_key=tenant_key[1], max_retries=0)
    raw = client.messages.with_raw_response.create(
        model="claude-sonnet-4", max_tokens=50, messages=[{"role": "user", "content": "hi"}]
    )
    message = raw.parse()
    assert raw.headers["x-chittycan-route"] == "fallback:1"
    assert message.type == "message" and message.content[0].type == "text" and message.content[0].text
    with client.messages.stream(
        model="claude-sonnet-4", max_tokens=50, messages=[{"role": "user", "content": "hi"}]
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text and final.usage.output_tokens > 0
    assert chats(oa_app) == 2 and len(anthropic_fake.requests) == 2


def test_an_anthropic_upstream_reset_mid_stream_ends_the_openai_stream_with_an_error(
    gateway_server,
    transactional_db,
    fake_anthropic_server,  # noqa: F811
    anthropic_fake,
    tenant_key,
):
    """Mid-stream failure through the translator: the OpenAI client gets the in-stream error (no
    [DONE]) and the ledger the partial usage."""
    _, anth_server = fake_anthropic_server
    add_priced_model("claude-sonnet-4", _anthropic_provider(anth_server.url), upstream="claude-sonnet-4-20250514")
    anthropic_fake.set_fault(Fault("reset", after_frames=4))
    response = httpx.post(
        f"{gateway_server.url}/v1/chat/completions",
        json={"model": "claude-sonnet-4", "messages": [{"role": "user", "content": "hi"}], "stream": True},
        headers={"authorization": f"Bearer {tenant_key[1]}"},
        timeout=10,
    )
    assert response.status_code == 200
    data = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    assert "[DONE]" not in data
    assert "error" in json.loads(data[-1])
    [row] = exact_usage(tenant_key[0], 1)
    assert row.status == "upstream_error" and row.http_status == 200 and row.provider == "claude"
    assert row.prompt_tokens > 0


# --- configuration and admin -------------------------------------------------------------------------


def test_timeouts_probes_and_outliers_round_trip_through_can_apply(transactional_db, tmp_path):
    from gateway.models import Provider

    config = tmp_path / "chittycan.yaml"
    config.write_text(
        "version: 1\nproviders:\n  - slug: edge\n    kind: openai\n    base_url: https://api.example.com/v1\n"
        "    active: false\n    connect_timeout: 2\n    first_byte_timeout: 5\n    total_timeout: 10\n"
        "    probe: {interval: 15, request: {messages: [{role: user, content: hi}], max_tokens: 1}}\n"
        "    outlier_latency_factor: 4\n"
    )
    call_command("apply", "-f", str(config), stdout=StringIO())
    p = Provider.objects.get(slug="edge")
    assert (p.connect_timeout, p.first_byte_timeout, p.total_timeout) == (2.0, 5.0, 10.0)
    assert (p.probe_enabled, p.probe_interval, p.outlier_latency_factor) == (True, 15.0, 4.0)
    assert p.probe_request == {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    out = StringIO()
    call_command("export", stdout=out)
    exported = out.getvalue()
    assert "first_byte_timeout: 5" in exported and "total_timeout: 10" in exported
    assert "probe:" in exported and "interval: 15" in exported and "outlier_latency_factor: 4" in exported

    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "version: 1\nproviders:\n  - slug: edge\n    kind: openai\n    active: false\n    total_timeout: 0\n"
    )
    err = StringIO()
    with pytest.raises(Exception, match="nothing was written"):
        call_command("apply", "-f", str(bad), stdout=StringIO(), stderr=err)
    assert "total_timeout" in err.getvalue(), err.getvalue()
    assert Provider.objects.get(slug="edge").total_timeout == 10.0


def test_the_admin_shows_probe_results_on_provider_and_model_pages(gateway_server, pair, tenant_key, settings):  # noqa: F811
    from django.contrib.auth import get_user_model
    from django.test import Client

    from gateway.models import LLMModel

    primary, _, provider = pair
    provider.probe_enabled = True
    provider.save()
    probe_now()
    settings.CHITTYCAN_ADMIN_REQUIRE_OTP = False
    client = Client()
    client.force_login(get_user_model().objects.create_superuser("root", password="pw-root-123"))
    page = client.get(f"/admin/gateway/provider/{provider.pk}/change/").content.decode()
    assert "Health: active probes and outlier detection" in page
    assert re.search(
        r"<strong>closed</strong> \(0 consecutive failures, opened 0 times\); last probe ok \d+ s ago", page
    )
    model = LLMModel.objects.get(name="gpt-4o")
    page = client.get(f"/admin/gateway/llmmodel/{model.pk}/change/").content.decode()
    assert "Breaker and health now" in page and "last probe ok" in page and "probes off" in page
    refused = client.post(
        f"/admin/gateway/provider/{provider.pk}/change/",
        {
            "slug": "primary",
            "kind": "openai",
            "base_url": provider.base_url,
            "extra_headers": "{}",
            "connect_timeout": "5",
            "read_timeout": "600",
            "first_byte_timeout": "0",
            "max_retries": "0",
            "probe_request": "[1, 2]",
            "is_active": "on",
        },
    )
    body = refused.content.decode()
    assert refused.status_code == 200 and "greater than or equal to 0.01" in body and "JSON object" in body
