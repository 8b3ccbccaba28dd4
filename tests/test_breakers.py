"""Circuit breakers per deployment (gateway.routing.breaker), against fake upstreams on loopback.

A model ``gpt-4o`` has a primary deployment (the session's fake OpenAI) and a fallback (a second
fake); the primary's standing fault (``tests.fakes.openai_upstream.Fault``) plays the outage and
requests counted at each fake show where traffic went.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from io import StringIO
from typing import Any

import httpx
import pytest
from django.core.management import call_command

from tests.conftest import add_model
from tests.fakes.openai_upstream import FakeOpenAI, Fault
from tests.fakes.server import ServerThread
from tests.processes import services_env, start_together


@pytest.fixture(scope="module")
def fallback_server() -> Iterator[tuple[FakeOpenAI, ServerThread]]:
    app = FakeOpenAI()
    server = ServerThread(app, name="fake-fallback").start()
    yield app, server
    server.stop()


@pytest.fixture(autouse=True)
def _fresh_breakers() -> Iterator[None]:
    from gateway.routing import breaker

    breaker.reset_local()
    yield
    breaker.reset_local()


@pytest.fixture
def streams_try_failing_deployments(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every stream tries a deployment like the request before it: the failure-streak rule (a stream
    keeps off a deployment that just failed, docs/resilience.md) off, for tests of a stream's own
    failure at such a deployment."""
    from gateway.routing import breaker

    monkeypatch.setattr(breaker, "FAILING_SECONDS", 0.0)


def make_provider(slug: str, url: str, **fields: Any) -> Any:
    from gateway.models import Provider

    values: dict[str, Any] = {"max_retries": 0, "breaker_failures": 3, "breaker_cooldown": 2.0}
    values.update(fields)
    provider = Provider(slug=slug, kind="openai", base_url=f"{url}/v1", **values)
    provider.api_key = "sk-upstream-secret"
    provider.save()
    return provider


@pytest.fixture
def pair(
    transactional_db: Any,
    fake_openai: tuple[FakeOpenAI, ServerThread],
    fallback_server: tuple[FakeOpenAI, ServerThread],
) -> tuple[FakeOpenAI, FakeOpenAI, Any]:
    """(primary fake, fallback fake, primary provider) behind the model gpt-4o."""
    primary_app, primary_server = fake_openai
    fallback_app, fallback_srv = fallback_server
    fallback_app.reset()
    primary = make_provider("primary", primary_server.url)
    fallback = make_provider("fallback", fallback_srv.url)
    add_model("gpt-4o", primary, upstream="gpt-4o-2024-08-06", priority=0)
    add_model("gpt-4o", fallback, upstream="gpt-4o-2024-08-06", priority=1)
    return primary_app, fallback_app, primary


def chat(url: str, key: str, model: str = "gpt-4o", **extra: Any) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}
    return httpx.post(f"{url}/v1/chat/completions", json=body, headers={"authorization": f"Bearer {key}"}, timeout=30)


def chats(app: FakeOpenAI) -> int:
    return sum(1 for r in app.requests if r.path.endswith("/chat/completions"))


def breaker_rows() -> list[dict[str, Any]]:
    out = StringIO()
    call_command("providers", "status", "--json", stdout=out)
    rows: list[dict[str, Any]] = json.loads(out.getvalue())["deployments"]
    return rows


def state_of(provider: str, model: str = "gpt-4o") -> str:
    return str(next(r["state"] for r in breaker_rows() if r["provider"] == provider and r["model"] == model))


def test_breaker_opens_at_threshold_then_dead_upstream_sees_only_probes(gateway_server, pair, tenant_key):
    primary, fallback, _ = pair
    key = tenant_key[1]
    primary.set_fault(Fault("down"))
    for _ in range(12):
        response = chat(gateway_server.url, key)
        assert response.status_code == 200, response.text
    assert chats(primary) == 3  # the threshold, then the deployment is skipped with no upstream call
    assert chats(fallback) == 12
    assert state_of("primary") == "open"
    assert state_of("fallback") == "closed"
    route = chat(gateway_server.url, key).headers["x-chittycan-route"]
    assert route == "fallback:1 (breaker open: primary:gpt-4o-2024-08-06)"

    time.sleep(2.1)  # the cool-down: the next request is the one probe, which fails and reopens it
    for _ in range(8):
        assert chat(gateway_server.url, key).status_code == 200
    assert chats(primary) == 4
    assert state_of("primary") == "open"


def test_half_open_probe_closes_the_breaker_when_the_upstream_recovers(gateway_server, pair, tenant_key):
    primary, fallback, _ = pair
    key = tenant_key[1]
    primary.set_fault(Fault("down"))
    for _ in range(3):
        assert chat(gateway_server.url, key).status_code == 200
    assert state_of("primary") == "open"
    primary.set_fault(None)
    assert chat(gateway_server.url, key).status_code == 200
    assert chats(primary) == 3  # still open: skipped
    time.sleep(2.1)
    response = chat(gateway_server.url, key)
    assert response.status_code == 200
    assert response.headers["x-chittycan-route"] == "primary"
    assert state_of("primary") == "closed"
    for _ in range(5):
        assert chat(gateway_server.url, key).headers["x-chittycan-route"] == "primary"
    assert chats(primary) == 3 + 6


def test_half_open_lets_exactly_one_probe_through(gateway_server, pair, tenant_key):
    primary, fallback, provider = pair
    key = tenant_key[1]
    primary.set_fault(Fault("down"))
    for _ in range(3):
        chat(gateway_server.url, key)
    assert state_of("primary") == "open"
    primary.set_fault(Fault("stall", stall=1.5))  # the probe is slow: everyone else arrives meanwhile
    time.sleep(2.1)
    with ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(lambda _: chat(gateway_server.url, key), range(12)))
    assert all(r.status_code == 200 for r in responses)
    assert chats(primary) == 3 + 1
    assert sum(r.headers["x-chittycan-route"] == "primary" for r in responses) == 1
    assert state_of("primary") == "closed"  # the slow probe answered: recovered


def test_two_models_sharing_an_upstream_model_name_do_not_share_a_breaker(gateway_server, pair, tenant_key):
    primary, fallback, provider = pair
    add_model("gpt-4o-twin", provider, upstream="gpt-4o-2024-08-06")
    key = tenant_key[1]
    primary.set_fault(Fault("down"))
    for _ in range(3):
        chat(gateway_server.url, key)
    assert state_of("primary") == "open"
    assert state_of("primary", model="gpt-4o-twin") == "closed"
    before = chats(primary)
    response = chat(gateway_server.url, key, model="gpt-4o-twin")
    assert response.status_code == 502  # its only deployment is down, and it was tried
    assert chats(primary) == before + 1


def test_a_429_does_not_open_the_breaker_and_fails_over_at_once(gateway_server, pair, tenant_key):
    primary, fallback, provider = pair
    provider.max_retries = 2
    provider.save()
    key = tenant_key[1]
    primary.set_fault(Fault("rate_limited", retry_after="10"))
    started = time.monotonic()
    for _ in range(6):
        response = chat(gateway_server.url, key)
        assert response.status_code == 200
        assert response.headers["x-chittycan-route"] == "fallback:1"
    assert time.monotonic() - started < 3  # nobody waited out retry-after: 10
    assert chats(primary) == 6  # one attempt each, no retry on the 429, never skipped
    assert state_of("primary") == "closed"


def test_a_429_without_fallback_honours_a_short_retry_after(gateway_server, upstream, tenant_key):
    from tests.fakes.openai_upstream import Reply

    upstream.push(
        "/v1/chat/completions",
        Reply(status=429, headers={"retry-after": "0.5"}, json={"error": {"message": "slow down", "type": "requests"}}),
    )
    started = time.monotonic()
    response = chat(gateway_server.url, tenant_key[1])
    assert response.status_code == 200
    assert time.monotonic() - started >= 0.5
    assert chats(upstream) == 2


def test_every_deployment_open_is_a_503_in_the_envelope_without_upstream_calls(gateway_server, pair, tenant_key):
    primary, fallback, _ = pair
    key = tenant_key[1]
    primary.set_fault(Fault("down"))
    fallback.set_fault(Fault("down"))
    for _ in range(3):
        assert chat(gateway_server.url, key).status_code == 502
    calls = chats(primary) + chats(fallback)
    response = chat(gateway_server.url, key)
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "upstream_unavailable"
    assert chats(primary) + chats(fallback) == calls


def test_calm_weather_reads_breaker_state_at_most_once_per_cache_ttl(gateway_server, pair, tenant_key):
    from gateway.routing import breaker

    key = tenant_key[1]
    chat(gateway_server.url, key)  # warm: the route table, the key
    breaker.reset_local()
    started = time.monotonic()
    for _ in range(30):
        assert chat(gateway_server.url, key).status_code == 200
    elapsed = time.monotonic() - started
    # One HMGET per deployment tried per CHITTYCAN_BREAKER_CACHE_TTL (1 s), not one per request.
    assert breaker.reads <= int(elapsed) + 1, (breaker.reads, elapsed)


def test_provider_health_needs_staff_or_a_management_token(gateway_server, pair, tenant_key):
    from django.contrib.auth import get_user_model

    from control import tokens

    primary, _, _ = pair
    # The user first: hashing its password takes a while on a loaded machine, and the breaker's
    # cool-down (2 s) runs from the third failure.
    user = get_user_model().objects.create_user("ops", password="pw-ops-123")
    _, token = tokens.token_create(user=user, name="health")
    primary.set_fault(Fault("down"))
    for _ in range(3):
        chat(gateway_server.url, tenant_key[1])
    url = f"{gateway_server.url}/health/providers"
    assert httpx.get(url).status_code in (401, 403)
    assert httpx.get(url, headers={"authorization": "Bearer ccm_wrong"}).status_code == 401
    response = httpx.get(url, headers={"authorization": f"Bearer {token}"})
    assert response.status_code == 200
    body = response.json()
    assert body["store"] == "redis"
    by_provider = {d["provider"]: d for d in body["deployments"]}
    assert by_provider["primary"]["state"] == "open"
    assert by_provider["primary"]["consecutive_failures"] == 3
    assert 0 < by_provider["primary"]["retry_in_seconds"] <= 2.0
    assert by_provider["fallback"]["state"] == "closed"
    assert body["open"] == 1


def test_provider_health_sessions_need_what_the_admin_needs(pair, settings):
    from django.contrib.auth import get_user_model
    from django.test import Client

    users = get_user_model().objects
    member = Client()
    member.force_login(users.create_user("member", password="pw-member-123"))
    assert member.get("/health/providers").status_code == 403
    staff = Client()
    staff.force_login(users.create_user("staff", password="pw-staff-123", is_staff=True))
    assert staff.get("/health/providers").status_code == 403  # no second factor yet
    settings.CHITTYCAN_ADMIN_REQUIRE_OTP = False
    response = staff.get("/health/providers")
    assert response.status_code == 200
    assert {d["provider"] for d in response.json()["deployments"]} == {"primary", "fallback"}


def test_can_providers_status_prints_a_table(gateway_server, pair, tenant_key):
    primary, _, _ = pair
    primary.set_fault(Fault("down"))
    for _ in range(3):
        chat(gateway_server.url, tenant_key[1])
    out = StringIO()
    call_command("providers", "status", stdout=out)
    lines = out.getvalue().splitlines()
    assert lines[0].split()[:4] == ["MODEL", "PROVIDER", "UPSTREAM", "MODEL"]
    primary_line = next(line for line in lines if " primary " in line)
    assert " open " in primary_line and "gpt-4o-2024-08-06" in primary_line
    assert " closed " in next(line for line in lines if " fallback " in line)


def test_breaker_settings_round_trip_through_can_apply(transactional_db, tmp_path):
    from gateway.models import Provider

    config = tmp_path / "chittycan.yaml"
    config.write_text(
        "version: 1\nproviders:\n  - slug: flaky\n    kind: openai\n    base_url: https://api.example.com/v1\n"
        "    active: false\n    breaker: {failures: 7, error_rate: 0.25, min_requests: 40, window: 60, cooldown: 10}\n"
    )
    call_command("apply", "-f", str(config), stdout=StringIO())
    p = Provider.objects.get(slug="flaky")
    assert (p.breaker_failures, p.breaker_error_rate, p.breaker_min_requests) == (7, 0.25, 40)
    assert (p.breaker_window, p.breaker_cooldown) == (60.0, 10.0)
    out = StringIO()
    call_command("export", stdout=out)
    assert "breaker:" in out.getvalue() and "failures: 7" in out.getvalue()

    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "version: 1\nproviders:\n  - slug: flaky\n    kind: openai\n    active: false\n    breaker: {cooldown: 0}\n"
    )
    err = StringIO()
    with pytest.raises(Exception, match="nothing was written"):
        call_command("apply", "-f", str(bad), stdout=StringIO(), stderr=err)
    assert "cooldown" in err.getvalue(), err.getvalue()
    assert Provider.objects.get(slug="flaky").breaker_cooldown == 10.0


@pytest.mark.slow
def test_two_gateway_processes_share_breaker_state(pair, make_tenant, make_key):
    primary, fallback, _ = pair
    tenant = make_tenant("shared")
    key = make_key(tenant, name="k")
    env = {**services_env(), "CHITTYCAN_BREAKER_CACHE_TTL": "0.2"}
    first, second = start_together([env, env])
    try:
        primary.set_fault(Fault("down"))
        for _ in range(3):
            assert chat(first.url, key).status_code == 200
        assert chats(primary) == 3
        time.sleep(0.3)
        for _ in range(5):
            response = chat(second.url, key)
            assert response.status_code == 200
            assert response.headers["x-chittycan-route"].startswith("fallback:1 (breaker open")
        assert chats(primary) == 3  # the second process never called the dead upstream
    finally:
        first.stop()
        second.stop()


def test_the_admin_shows_each_deployments_breaker_and_edits_its_settings(gateway_server, pair, tenant_key, settings):
    from django.contrib.auth import get_user_model
    from django.test import Client

    primary, _, provider = pair
    primary.set_fault(Fault("down"))
    for _ in range(3):
        chat(gateway_server.url, tenant_key[1])
    settings.CHITTYCAN_ADMIN_REQUIRE_OTP = False
    client = Client()
    client.force_login(get_user_model().objects.create_superuser("root", password="pw-root-123"))
    page = client.get(f"/admin/gateway/provider/{provider.pk}/change/")
    assert page.status_code == 200
    html = page.content.decode()
    assert "gpt-4o &rarr; gpt-4o-2024-08-06: <strong>open</strong> (3 consecutive failures, opened 1 times)" in html
    form = {
        "slug": "primary",
        "kind": "openai",
        "base_url": provider.base_url,
        "extra_headers": "{}",
        "connect_timeout": "5",
        "read_timeout": "600",
        "max_retries": "0",
        "breaker_failures": "4",
        "breaker_error_rate": "1.5",  # out of range: refused at the field
        "breaker_min_requests": "20",
        "breaker_window": "30",
        "breaker_cooldown": "2",
        "is_active": "on",
    }
    refused = client.post(f"/admin/gateway/provider/{provider.pk}/change/", form)
    assert refused.status_code == 200 and "less than or equal to 1" in refused.content.decode()
    form["breaker_error_rate"] = "0.4"
    saved = client.post(f"/admin/gateway/provider/{provider.pk}/change/", form)
    assert saved.status_code == 302, saved.content.decode()[:2000]
    provider.refresh_from_db()
    assert (provider.breaker_failures, provider.breaker_error_rate) == (4, 0.4)
    form["breaker_cooldown"] = ""  # left empty: the default
    assert client.post(f"/admin/gateway/provider/{provider.pk}/change/", form).status_code == 302
    provider.refresh_from_db()
    assert provider.breaker_cooldown == 30.0
