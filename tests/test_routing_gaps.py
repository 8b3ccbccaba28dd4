"""Routing's last gaps (issue 10), end to end with the openai SDK against the real gateway, fake
upstreams on loopback, PostgreSQL and Redis: the ``least_in_flight`` strategy steers new requests
away from a deployment that holds slow requests (counts shared through Redis, released when a
stream ends or its client leaves)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import openai
import pytest
import redis
from django.conf import settings

from tests.conftest import add_model
from tests.fakes.openai_upstream import FakeOpenAI, Fault
from tests.fakes.server import ServerThread

SHORT: Any = [{"role": "user", "content": "Say hello"}]
PATH = "/v1/chat/completions"


@pytest.fixture(scope="module")
def second_upstream() -> Iterator[tuple[FakeOpenAI, ServerThread]]:
    app = FakeOpenAI()
    server = ServerThread(app, name="fake-gaps-second").start()
    yield app, server
    server.stop()


@pytest.fixture(autouse=True)
def _fresh_state() -> Iterator[None]:
    from gateway.routing import breaker, inflight

    breaker.reset_local()
    inflight.reset_local()
    yield
    breaker.reset_local()
    inflight.reset_local()


@pytest.fixture
def two_deployments(
    transactional_db: Any,
    fake_openai: tuple[FakeOpenAI, ServerThread],
    second_upstream: tuple[FakeOpenAI, ServerThread],
) -> tuple[FakeOpenAI, FakeOpenAI, Any, Any]:
    """Model ``balanced`` (least_in_flight) on provider one (weight 1) and two (weight 10,000):
    with equal counts it goes to two almost always."""
    from gateway import catalog
    from gateway.models import Deployment, Provider

    first_app, first = fake_openai
    second_app, second = second_upstream
    for app in (first_app, second_app):
        app.reset()
    one = Provider(slug="one", kind="openai", base_url=f"{first.url}/v1", max_retries=0)
    one.api_key = "sk-one"
    one.save()
    two = Provider(slug="two", kind="openai", base_url=f"{second.url}/v1", max_retries=0)
    two.api_key = "sk-two"
    two.save()
    model = add_model("balanced", one, upstream="bal-one")
    dep_one = Deployment.objects.get(model=model)
    dep_two = Deployment.objects.create(model=model, provider=two, upstream_model="bal-two", weight=10_000)
    catalog.model_update(model, strategy="least_in_flight")
    return first_app, second_app, dep_one, dep_two


def client_for(server: ServerThread, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0)


def in_flight(deployment_pk: int) -> int:
    from gateway.routing import inflight

    conn = redis.Redis.from_url(settings.REDIS_URL)
    try:
        return int(conn.zcount(inflight.redis_key(f"d{deployment_pk}"), f"({time.time()}", "+inf"))
    finally:
        conn.close()


def wait_for(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def provider_of(client: openai.OpenAI) -> str:
    raw = client.chat.completions.with_raw_response.create(model="balanced", messages=SHORT)
    return str(raw.headers["x-chittycan-provider"])


def test_least_in_flight_avoids_the_deployment_holding_slow_requests(
    gateway_server: ServerThread, two_deployments: Any, tenant_key: tuple[Any, str]
) -> None:
    assert settings.REDIS_URL, "this test is about the counts shared through Redis"
    first_app, second_app, dep_one, dep_two = two_deployments
    client = client_for(gateway_server, tenant_key[1])
    assert provider_of(client) == "two"  # equal counts: the weight decides
    assert in_flight(dep_two.pk) == 0  # a complete answer ended its count

    # A slow complete answer held on two: every request meanwhile goes to one, despite the weights.
    second_app.set_fault(Fault("stall", stall=3.0))
    held: dict[str, str] = {}
    worker = threading.Thread(target=lambda: held.update(provider=provider_of(client)))
    worker.start()
    wait_for(lambda: len(second_app.requests) == 2 and in_flight(dep_two.pk) == 1)
    second_app.set_fault(None)
    assert [provider_of(client) for _ in range(5)] == ["one"] * 5
    worker.join(10)
    assert held == {"provider": "two"}
    wait_for(lambda: in_flight(dep_two.pk) == 0)
    assert in_flight(dep_one.pk) == 0
    assert provider_of(client) == "two"  # free again: back to the weighted order


def test_a_stream_counts_until_it_ends_or_its_client_leaves(
    gateway_server: ServerThread, two_deployments: Any, tenant_key: tuple[Any, str]
) -> None:
    first_app, second_app, _dep_one, dep_two = two_deployments
    client = client_for(gateway_server, tenant_key[1])
    slow = second_app.chat_stream_reply({"model": "bal-two", "stream": True, "messages": SHORT})
    slow.frame_delay = 0.4
    second_app.push(PATH, slow)
    stream = client.chat.completions.create(model="balanced", messages=SHORT, stream=True)
    first = next(iter(stream))
    assert first.model == "bal-two"
    assert in_flight(dep_two.pk) == 1  # its first chunk arrived: still in flight
    served = [provider_of(client) for _ in range(3)]
    assert served == ["one"] * 3
    list(stream)  # to its end
    wait_for(lambda: in_flight(dep_two.pk) == 0)

    # A client that leaves mid-stream ends the count too (released in a shielded finally).
    slower = second_app.chat_stream_reply({"model": "bal-two", "stream": True, "messages": SHORT})
    slower.frame_delay = 1.0
    second_app.push(PATH, slower)
    stream = client.chat.completions.create(model="balanced", messages=SHORT, stream=True)
    next(iter(stream))
    assert in_flight(dep_two.pk) == 1
    stream.close()
    wait_for(lambda: in_flight(dep_two.pk) == 0)
    assert provider_of(client) == "two"


# --- why a candidate was skipped: unhealthy, over budget ----------------------------------------


@pytest.fixture
def priced_pair(
    transactional_db: Any,
    fake_openai: tuple[FakeOpenAI, ServerThread],
    second_upstream: tuple[FakeOpenAI, ServerThread],
) -> tuple[FakeOpenAI, FakeOpenAI]:
    """``dear`` on provider one ($1,000 per M tokens), ``cheap`` on provider two ($0.10 / $0.20)."""
    from gateway.models import Provider

    first_app, first = fake_openai
    second_app, second = second_upstream
    for app in (first_app, second_app):
        app.reset()
    one = Provider(slug="one", kind="openai", base_url=f"{first.url}/v1", max_retries=0, breaker_failures=1)
    one.api_key = "sk-one"
    one.save()
    two = Provider(slug="two", kind="openai", base_url=f"{second.url}/v1", max_retries=0)
    two.api_key = "sk-two"
    two.save()
    add_model("dear", one, upstream="dear-up", prices=("1000", "1000", "1000"))
    add_model("cheap", two, upstream="cheap-up", prices=("0.10", "0.10", "0.20"))
    return first_app, second_app


def put_policy(tenant: Any, route: str, fallback: str) -> None:
    from gateway import policies

    policies.policy_put(name="gaps", rules=[{"name": "main", "route": route}], tenant=tenant, fallback_chain=[fallback])


def trace_text(request_id: str) -> str:
    import io

    from django.core.management import call_command

    out = io.StringIO()
    call_command("trace", request_id, stdout=out)
    return out.getvalue()


def in_own_loop(fn: Callable[[], Any]) -> Any:
    """Run a coroutine function the way a Celery task or the embedded scheduler does."""
    import asyncio

    from core import runtime
    from gateway import http
    from gateway.routing import breaker

    async def run() -> Any:
        try:
            return await fn()
        finally:
            breaker.forget_loop()
            await http.aclose()
            await runtime.close_redis()

    return asyncio.run(run())


def test_unhealthy_candidates_are_explained_with_what_the_health_checks_found(
    gateway_server: ServerThread, priced_pair: tuple[FakeOpenAI, FakeOpenAI], tenant_key: tuple[Any, str]
) -> None:
    from gateway.routing.table import route_table

    first, second = priced_pair
    tenant, key = tenant_key
    put_policy(tenant, "dear", "cheap")
    client = client_for(gateway_server, key)

    async def dear_deployment() -> Any:
        table = await route_table()
        found = table.resolve("dear")
        assert found is not None
        return found, found.deployments[0]

    # Passive outlier detection ejected it.
    in_own_loop(lambda: _eject_dear(dear_deployment))
    raw = client.chat.completions.with_raw_response.create(model="dear", messages=SHORT)
    assert raw.headers["x-chittycan-provider"] == "two"
    assert raw.headers["x-chittycan-route"].startswith("rule=main; model=dear; skipped=1;")
    row = wait_for_row(raw.headers["x-request-id"])
    dear, cheap = row.route["candidates"]
    assert dear["skipped"] == "unhealthy" and dear["reason"] == "latency outlier"
    assert "skipped" not in cheap
    assert "skipped: unhealthy (latency outlier)" in trace_text(raw.headers["x-request-id"])
    assert len(first.requests) == 0

    # An active health probe failed (provider one's breaker opens at its first failure).
    forget_breaker("dear")
    first.set_fault(Fault("down"))
    try:
        results = in_own_loop(lambda: _probe_dear(dear_deployment))
    finally:
        first.set_fault(None)
    assert results["probe_result"] == "failed"
    raw = client.chat.completions.with_raw_response.create(model="dear", messages=SHORT)
    assert raw.headers["x-chittycan-provider"] == "two"
    dear = wait_for_row(raw.headers["x-request-id"]).route["candidates"][0]
    assert dear["skipped"] == "unhealthy" and dear["reason"] == "health probe failed"
    assert len(first.requests) == 1  # the probe only

    # Client traffic that failed opens it too: that is "breaker open", not "unhealthy".
    forget_breaker("dear")
    first.set_fault(Fault("down"))
    try:
        failed = client.chat.completions.with_raw_response.create(model="dear", messages=SHORT)
        assert failed.headers["x-chittycan-provider"] == "two"  # failed over
        raw = client.chat.completions.with_raw_response.create(model="dear", messages=SHORT)
    finally:
        first.set_fault(None)
    dear = wait_for_row(raw.headers["x-request-id"]).route["candidates"][0]
    assert dear["skipped"] == "breaker open" and dear["reason"] == "consecutive failures"
    assert len(first.requests) == 2
    rows = breaker_rows()
    assert rows["dear"]["opened_by"] == "consecutive failures"


async def _eject_dear(found: Callable[[], Any]) -> None:
    from gateway.routing import breaker

    _, dep = await found()
    await breaker.eject(dep)


async def _probe_dear(found: Callable[[], Any]) -> dict[str, str]:
    from gateway.routing import health

    route, dep = await found()
    return await health.probe(route, dep)


def forget_breaker(model: str) -> None:
    """Close the model's breaker: its shared state and every process-local view of it."""
    from gateway.models import Deployment
    from gateway.routing import breaker

    conn = redis.Redis.from_url(settings.REDIS_URL)
    try:
        for dep in Deployment.objects.filter(model__name=model):
            conn.delete(breaker.state_key(f"d{dep.pk}"))
    finally:
        conn.close()
    breaker.reset_local()


def breaker_rows() -> dict[str, dict[str, Any]]:
    from gateway.routing import breaker

    return {row["model"]: row for row in in_own_loop(breaker.all_status)}


def wait_for_row(request_id: str) -> Any:
    from tests.conftest import wait_usage

    rows = wait_usage(1, request_id=request_id)
    assert rows, f"no ledger row for {request_id}"
    return rows[0]


def test_a_candidate_over_the_remaining_budget_is_skipped_not_reserved_for(
    gateway_server: ServerThread, priced_pair: tuple[FakeOpenAI, FakeOpenAI], tenant_key: tuple[Any, str]
) -> None:
    """A rule to a dear model with a cheap fallback: the dear one's worst case ($1,000 per M
    tokens times the 4,096-token output cap, about $4.1) exceeds the $1 the tenant has left, so it
    is skipped "over budget" and the cheap one serves (before, the reservation covered the dearest
    deployment of the route and the request was refused with a 402)."""
    from budgets import services

    first, second = priced_pair
    tenant, key = tenant_key
    put_policy(tenant, "dear", "cheap")
    services.budget_put(tenant=tenant, period="month", limit_micro=1_000_000)
    client = client_for(gateway_server, key)
    raw = client.chat.completions.with_raw_response.create(model="dear", messages=SHORT)
    assert raw.headers["x-chittycan-provider"] == "two"
    assert raw.headers["x-chittycan-route"] == "rule=main; model=cheap; skipped=1; outcome=primary"
    row = wait_for_row(raw.headers["x-request-id"])
    dear, cheap = row.route["candidates"]
    assert dear["skipped"] == "over budget" and dear["deployment"] == "one/dear-up"
    assert float(dear["worst_case_usd"]) > 4.0
    assert "skipped" not in cheap and row.route["model"] == "cheap"
    assert float(row.route["budget_left_usd"]) == 1.0
    assert 0 < row.cost_micro < 1000  # the cheap model's price
    assert len(first.requests) == 0
    text = trace_text(raw.headers["x-request-id"])
    assert "skipped: over budget (worst case $" in text and "budget left $1" in text

    # What can route explain shows, without sending anything.
    import io
    import json
    from pathlib import Path

    from django.core.management import call_command

    request = Path("/tmp") / f"chittycan-gaps-{tenant.pk}.json"
    request.write_text(json.dumps({"model": "dear", "messages": SHORT}))
    out = io.StringIO()
    call_command("route", "explain", "--key", key, "-f", str(request), "--json", stdout=out)
    explained = json.loads(out.getvalue())
    assert explained["route"]["candidates"][0]["skipped"] == "over budget"
    assert explained["order"] == ["two/cheap-up"]

    # When nothing fits, nothing is skipped: the budget stage refuses as before (402).
    services.budget_put(tenant=tenant, period="month", limit_micro=10, allow_weaken=True)
    with pytest.raises(openai.APIStatusError) as refused:
        client.chat.completions.create(model="dear", messages=SHORT)
    assert refused.value.status_code == 402
    assert len(first.requests) == 0


# --- a half-open probe that streams closes the breaker only at the stream's end -----------------


@pytest.fixture
def solo(transactional_db: Any, fake_openai: tuple[FakeOpenAI, ServerThread]) -> tuple[FakeOpenAI, Any]:
    """Model ``solo`` on provider one alone, whose breaker opens at one failure for 0.3 s."""
    from gateway.models import Deployment, Provider

    app, server = fake_openai
    app.reset()
    one = Provider(
        slug="one", kind="openai", base_url=f"{server.url}/v1", max_retries=0, breaker_failures=1, breaker_cooldown=0.3
    )
    one.api_key = "sk-one"
    one.save()
    model = add_model("solo", one, upstream="solo-up")
    return app, Deployment.objects.get(model=model)


def breaker_state(deployment_pk: int) -> tuple[str, float]:
    from gateway.routing import breaker

    conn = redis.Redis.from_url(settings.REDIS_URL)
    try:
        s, u = conn.hmget(breaker.state_key(f"d{deployment_pk}"), ["s", "u"])
    finally:
        conn.close()
    state = s.decode() if isinstance(s, bytes) else str(s or "")
    return state, float(u or 0)


def open_then_half_open(client: openai.OpenAI, app: FakeOpenAI, deployment_pk: int) -> None:
    app.set_fault(Fault("down"))
    try:
        with pytest.raises(openai.APIStatusError):
            client.chat.completions.create(model="solo", messages=SHORT)
    finally:
        app.set_fault(None)
    state, until = breaker_state(deployment_pk)
    assert state == "open"
    time.sleep(max(until - time.time(), 0) + 0.05)  # the cool-down is over: the next request probes


def test_a_streaming_half_open_probe_closes_the_breaker_only_when_it_completes(
    gateway_server: ServerThread, solo: tuple[FakeOpenAI, Any], tenant_key: tuple[Any, str]
) -> None:
    app, dep = solo
    client = client_for(gateway_server, tenant_key[1])
    open_then_half_open(client, app, dep.pk)
    slow = app.chat_stream_reply({"model": "solo-up", "stream": True, "messages": SHORT})
    slow.frame_delay = 0.2
    app.push(PATH, slow)
    stream = client.chat.completions.create(model="solo", messages=SHORT, stream=True)
    chunks = iter(stream)
    next(chunks)
    assert breaker_state(dep.pk)[0] == "open"  # its first chunk is not a recovery yet
    rest = list(chunks)
    assert any(c.choices and c.choices[0].finish_reason == "stop" for c in rest)  # to its end
    wait_for(lambda: breaker_state(dep.pk)[0] == "closed")

    # A probe whose stream breaks mid-way reopens the breaker for another cool-down.
    open_then_half_open(client, app, dep.pk)
    broken = app.chat_stream_reply({"model": "solo-up", "stream": True, "messages": SHORT})
    broken.reset_after = 2
    app.push(PATH, broken)
    stream = client.chat.completions.create(model="solo", messages=SHORT, stream=True)
    with pytest.raises(openai.APIError):
        list(stream)
    state, until = breaker_state(dep.pk)
    assert state == "open" and until > time.time()


def test_least_in_flight_round_trips_through_the_configuration_file(
    transactional_db: Any, make_tenant: Callable[..., Any], tmp_path: Any
) -> None:
    import io
    from pathlib import Path

    import yaml
    from django.core.management import CommandError, call_command

    from gateway.models import LLMModel

    example = Path(__file__).resolve().parent.parent / "examples" / "routing-policy.yaml"
    make_tenant("demo")
    call_command("apply", "-f", str(example), stdout=io.StringIO(), stderr=io.StringIO())
    exported = io.StringIO()
    call_command("export", stdout=exported)
    document = yaml.safe_load(exported.getvalue())
    name = document["models"][0]["name"]
    document["models"][0]["strategy"] = "least_in_flight"
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(document))
    out = io.StringIO()
    call_command("apply", "-f", str(path), stdout=out, stderr=io.StringIO())
    assert f"update model {name}" in out.getvalue()
    assert LLMModel.objects.get(name=name).strategy == "least_in_flight"
    again = io.StringIO()
    call_command("export", stdout=again)
    model = next(m for m in yaml.safe_load(again.getvalue())["models"] if m["name"] == name)
    assert model["strategy"] == "least_in_flight"
    document["models"][0]["strategy"] = "fewest"
    path.write_text(yaml.safe_dump(document))
    err = io.StringIO()
    with pytest.raises(CommandError, match="nothing was written"):
        call_command("apply", "-f", str(path), stdout=io.StringIO(), stderr=err)
    assert "strategy" in err.getvalue()
