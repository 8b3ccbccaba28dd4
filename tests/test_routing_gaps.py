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
