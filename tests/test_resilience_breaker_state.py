"""Half-open breakers and streams, and breaker state changes reaching every gateway process at once
(gateway.routing.breaker, gateway.pipeline.dispatch, gateway.routing.health), against fake
upstreams on loopback driven with the OpenAI SDK.

A stream cut after its first chunk cannot fail over, so while a deployment's breaker is half-open
a stream leaves its one probe to a non-stream request (or a health probe) when another deployment
remains; a stream with no other deployment takes it. An opening (or a failed probe) published by
one gateway process is seen by the others at once, not after their breaker cache TTL.
"""

from __future__ import annotations

import time
from typing import Any

import openai
import pytest
import redis
from django.conf import settings
from django.core.management import call_command

from gateway.routing import breaker
from tests.conftest import add_model, exact_usage
from tests.fakes.openai_upstream import FakeOpenAI, Fault
from tests.processes import Gateway, services_env
from tests.test_breakers import breaker_rows, chat, chats, fallback_server, pair  # noqa: F401

COOLDOWN = 0.5
PRIMARY = "primary:gpt-4o-2024-08-06"


def row(provider: str, model: str = "gpt-4o") -> dict[str, Any]:
    return next(r for r in breaker_rows() if r["provider"] == provider and r["model"] == model)


def wait_state(provider: str, state: str, model: str = "gpt-4o", timeout: float = 15.0) -> dict[str, Any]:
    """Poll the shared breaker state until it is ``state`` (the cool-down passes on the clock)."""
    deadline = time.monotonic() + timeout
    while True:
        found = row(provider, model)
        if found["state"] == state:
            return found
        assert time.monotonic() < deadline, f"breaker of {provider} still {found['state']}, not {state}"
        time.sleep(0.05)


def wait_for(check: Any, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def stream(url: str, key: str, model: str = "gpt-4o") -> tuple[str, str]:
    """One streamed chat completion through the SDK: (X-ChittyCan-Route, the text). A stream cut
    mid-way raises ``openai.APIError``."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": "hi"}], stream=True
    )
    text = "".join(part.choices[0].delta.content or "" for part in raw.parse() if part.choices)
    return raw.headers["x-chittycan-route"], text


def stream_calls(app: FakeOpenAI) -> int:
    return sum(1 for r in app.requests if r.path.endswith("/chat/completions") and r.body.get("stream"))


def ping_calls(app: FakeOpenAI) -> int:
    """Health probes: the default probe request, one ``ping`` message with ``max_tokens`` 1."""
    return sum(
        1
        for r in app.requests
        if r.path.endswith("/chat/completions") and r.body.get("messages") == [{"role": "user", "content": "ping"}]
    )


def short_cooldown(provider: Any, **fields: Any) -> None:
    provider.breaker_cooldown = COOLDOWN
    for name, value in fields.items():
        setattr(provider, name, value)
    provider.save()


def test_a_stream_leaves_the_half_open_probe_to_others_while_a_fallback_remains(gateway_server, pair, tenant_key):  # noqa: F811
    primary, fallback, provider = pair
    short_cooldown(provider)
    tenant, key = tenant_key
    primary.set_fault(Fault("reset", after_frames=3))  # a non-stream is cut before its answer, a stream mid-way
    for _ in range(3):
        assert chat(gateway_server.url, key).status_code == 200  # failed over
    assert row("primary")["state"] == "open" and chats(primary) == 3
    streams = 0
    for cycle in range(3):
        wait_state("primary", "half_open")
        route, text = stream(gateway_server.url, key)  # would be cut mid-way had it been the probe
        streams += 1
        assert text, route
        assert route == f"fallback:1 (breaker half-open, probe left to a non-stream request: {PRIMARY})", route
        # The stream asked for a health probe instead, which failed and reopened the breaker.
        wait_for(lambda c=cycle: row("primary")["times_opened"] >= 2 + c, "the on-demand probe did not run")
        assert ping_calls(primary) == cycle + 1
    assert stream_calls(primary) == 0  # no stream ever reached the dead primary
    last_probe = row("primary")["health"]["last_probe"]
    assert last_probe["trigger"] == "on demand" and last_probe["result"] == "failed", last_probe
    assert row("primary")["opened_by"] == "health probe failed"
    # A non-stream request takes the probe (its failure fails over): the primary sees it.
    wait_state("primary", "half_open")
    response = chat(gateway_server.url, key)
    assert response.status_code == 200 and response.headers["x-chittycan-route"] == "fallback:1"
    assert chats(primary) == 3 + 3 + 1
    # The ledger row of a stream says which deployment it skipped and why.
    rows = exact_usage(tenant, 3 + streams + 1)
    skipped = [a for r in rows if r.stream for a in r.attempts if a["outcome"] == "skipped"]
    assert len(skipped) == streams and all(a["error"] == "breaker_half_open" for a in skipped), skipped
    assert all(r.provider == "fallback" and r.status == "ok" for r in rows if r.stream)


def test_a_stream_takes_the_half_open_probe_when_no_other_deployment_remains(gateway_server, pair, tenant_key):  # noqa: F811
    primary, fallback, provider = pair
    short_cooldown(provider)
    add_model("gpt-4o-solo", provider, upstream="gpt-4o-2024-08-06")
    key = tenant_key[1]
    primary.set_fault(Fault("reset", after_frames=3))
    for _ in range(3):
        assert chat(gateway_server.url, key, model="gpt-4o-solo").status_code == 502  # nowhere to fail over
    assert row("primary", "gpt-4o-solo")["state"] == "open"
    wait_state("primary", "half_open", model="gpt-4o-solo")
    with pytest.raises(openai.APIError):
        stream(gateway_server.url, key, model="gpt-4o-solo")  # the probe: the primary cut it
    assert stream_calls(primary) == 1 and chats(fallback) == 0
    after = row("primary", "gpt-4o-solo")
    assert after["state"] == "open" and after["opened_by"] == "half-open probe failed", after


def test_a_model_whose_traffic_is_all_streams_recovers_through_on_demand_probes(gateway_server, pair, tenant_key):  # noqa: F811
    primary, fallback, provider = pair
    short_cooldown(provider)  # periodic probes off (the default)
    key = tenant_key[1]
    primary.set_fault(Fault("down"))
    for _ in range(3):
        assert chat(gateway_server.url, key).status_code == 200
    assert row("primary")["state"] == "open"
    primary.set_fault(None)  # recovered, but only streams come
    routes: list[str] = []
    deadline = time.monotonic() + 15
    while not routes or routes[-1] != "primary":
        assert time.monotonic() < deadline, routes[-5:]
        route, text = stream(gateway_server.url, key)
        assert text, route
        routes.append(route)
        time.sleep(0.05)
    assert stream_calls(primary) == 1  # the first stream it served after the health probe closed it
    assert ping_calls(primary) == 1
    last_probe = row("primary")["health"]["last_probe"]
    assert last_probe["trigger"] == "on demand" and last_probe["result"] == "ok", last_probe
    assert row("primary")["state"] == "closed"


def test_periodic_health_probes_close_a_half_open_breaker_without_client_traffic(gateway_server, pair, tenant_key):  # noqa: F811
    primary, fallback, provider = pair
    short_cooldown(provider, probe_enabled=True, probe_interval=60.0)
    key = tenant_key[1]
    primary.set_fault(Fault("down"))
    for _ in range(3):
        assert chat(gateway_server.url, key).status_code == 200
    primary.set_fault(None)
    wait_state("primary", "half_open")
    call_command("providers", "probe", stdout=open("/dev/null", "w"))  # `can providers probe`
    assert row("primary")["state"] == "closed"
    assert row("primary")["health"]["last_probe"]["trigger"] == "interval"
    route, text = stream(gateway_server.url, key)
    assert route == "primary" and text
    assert ping_calls(primary) == 1 and stream_calls(primary) == 1


@pytest.mark.slow
def test_an_opening_reaches_the_other_gateway_process_at_once_not_after_its_cache_ttl(pair, make_tenant, make_key):  # noqa: F811
    primary, fallback, _ = pair
    key = make_key(make_tenant("two-procs"), name="k")
    # A long cache TTL: without the published state change the second process would keep
    # sending to the dead primary for 30 s.
    env = {**services_env(), "CHITTYCAN_BREAKER_CACHE_TTL": "30"}
    first, second = Gateway(env), Gateway(env)
    conn = redis.Redis.from_url(settings.REDIS_URL)
    try:
        assert chat(second.url, key).headers["x-chittycan-route"] == "primary"  # caches "closed"
        from gateway.models import Deployment

        dep = Deployment.objects.get(model__name="gpt-4o", provider__slug="primary")
        state_key = f"{settings.REDIS_PREFIX}:brk:{{d{dep.id}}}"
        # Negative control: the state written to Redis without a message is not seen by the
        # second process within its TTL, so what follows is the message's doing.
        conn.hset(state_key, mapping={"s": "open", "u": repr(time.time() + 60), "f": "3", "o": "1", "r": "test"})
        assert row("primary")["state"] == "open"  # the right key: the shared state says open ...
        assert chat(second.url, key).headers["x-chittycan-route"] == "primary"  # ... unseen there
        conn.delete(state_key)
        before = chats(primary)

        primary.set_fault(Fault("down"))
        for _ in range(3):
            assert chat(first.url, key).status_code == 200
        assert chats(primary) == before + 3
        # The opening was published before the first gateway answered: the second process's
        # very next request skips the primary (its cached "closed" had 30 s to live).
        for _ in range(6):
            route = chat(second.url, key).headers["x-chittycan-route"]
            assert route == f"fallback:1 (breaker open: {PRIMARY})", route
        assert chats(primary) == before + 3
    finally:
        conn.close()
        first.stop()
        second.stop()


def test_state_changes_are_published_on_the_invalidation_channel_and_update_the_cache(pair):  # noqa: F811
    """The breaker's scripts publish an opening and a probe's closing (topic ``brk``); a process
    handling the message caches the published state; counting failures publishes nothing."""
    import asyncio

    from core import invalidation, runtime
    from gateway.routing import breaker
    from gateway.routing.table import route_table

    conn = redis.Redis.from_url(settings.REDIS_URL)
    sub = conn.pubsub()
    sub.subscribe(invalidation.channel())
    assert sub.get_message(timeout=5)["type"] == "subscribe"

    async def scenario() -> tuple[Any, Any]:
        table = await route_table()
        model = table.resolve("gpt-4o")
        assert model is not None
        dep = model.ordered_deployments()[0]
        from gateway.errors import upstream_status_error

        for _ in range(3):
            await breaker.record(dep, await breaker.admit(dep), upstream_status_error(500, "down"))
        opened = await breaker.snapshot(breaker.breaker_id(dep))
        await runtime.close_redis()
        return dep, opened

    dep, opened = asyncio.run(scenario())
    assert opened.state() == "open"
    messages: list[bytes] = []
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not messages:
        message = sub.get_message(timeout=0.5)
        if message is not None and message["type"] == "message":
            messages.append(message["data"])
    assert len(messages) == 1, messages  # the opening only: the two failures before it published nothing
    topic, _, payload = messages[0].partition(b"\t")
    ident = breaker.breaker_id(dep)
    assert topic == b"brk" and payload.startswith(f"{ident}\topen\t".encode()), messages
    # Another process's view: it had "closed" cached; the message replaces it.
    breaker.reset_local()
    breaker._remember(ident, breaker.CLOSED)
    invalidation.deliver(messages[0])
    assert breaker.cached_state(dep) == "open" and breaker.transitions_seen == {ident: 1}
    assert breaker.skip_reason(dep) == ("breaker open", "consecutive failures")
    sub.close()
    conn.close()


def test_a_stream_keeps_off_a_deployment_on_a_failure_streak_while_a_fallback_remains(
    gateway_server,
    pair,  # noqa: F811
    tenant_key,
    monkeypatch,
):
    primary, fallback, provider = pair
    tenant, key = tenant_key
    url = gateway_server.url
    primary.set_fault(Fault("reset", after_frames=3))  # a non-stream is cut before its answer, a stream mid-way
    assert chat(url, key).headers["x-chittycan-route"] == "fallback:1"  # the primary's first failure
    assert row("primary")["state"] == "closed" and chats(primary) == 1
    route, text = stream(url, key)  # would have been cut mid-way at the primary
    assert text and route == f"fallback:1 (failing, kept off for a stream: {PRIMARY})", route
    assert stream_calls(primary) == 0
    # Non-stream requests still try the primary (they fail over): they decide whether it opens.
    assert chat(url, key).headers["x-chittycan-route"] == "fallback:1" and chats(primary) == 2
    # The primary answers again: the next success there ends the streak, and streams return.
    primary.set_fault(None)
    assert chat(url, key).headers["x-chittycan-route"] == "primary"
    assert stream(url, key)[0] == "primary"
    # A streak whose last failure is older than FAILING_SECONDS no longer keeps streams off.
    monkeypatch.setattr(breaker, "FAILING_SECONDS", 0.3)
    primary.set_fault(Fault("reset", after_frames=3))
    assert chat(url, key).headers["x-chittycan-route"] == "fallback:1"
    time.sleep(0.4)
    with pytest.raises(openai.APIError):
        stream(url, key)  # sent to the primary again, and cut there
    assert stream_calls(primary) == 2 and row("primary")["state"] == "closed"
    rows = exact_usage(tenant, 7)
    skipped = [a for r in rows for a in r.attempts if a["outcome"] == "skipped"]
    assert [a["error"] for a in skipped] == ["breaker_failing"], skipped
