"""Per-hop timeout resolution (gateway.pipeline.dispatch), the probe request and passive outlier
detection in embedded mode (gateway.routing.health: state in this process, no Redis)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from gateway.pipeline import dispatch
from gateway.providers.base import ProbeSettings, ProviderConfig, UpstreamCall
from gateway.routing import breaker, health
from gateway.routing.table import DeploymentRoute, HopTimeouts, ModelRoute


@pytest.fixture(autouse=True)
def embedded(settings: Any) -> Iterator[None]:
    settings.REDIS_URL = ""
    breaker.reset_local()
    health.reset_local()
    yield
    breaker.reset_local()
    health.reset_local()


def provider(**fields: Any) -> ProviderConfig:
    return ProviderConfig(id=1, slug="p", kind="openai", base_url="https://example.com/v1", **fields)


def dep(dep_id: int = 1, hop: HopTimeouts = HopTimeouts(), **fields: Any) -> DeploymentRoute:
    return DeploymentRoute(id=dep_id, provider=provider(**fields), upstream_model="m", timeouts=hop)


def test_without_limits_nothing_bounds_an_attempt_but_the_read_timeout() -> None:
    d = dep()
    assert dispatch.first_byte_limit(d) is None and dispatch.total_limit(d) is None


def test_the_providers_limits_apply_and_first_byte_never_exceeds_total() -> None:
    assert dispatch.first_byte_limit(dep(first_byte_timeout=5.0)) == 5.0
    assert dispatch.first_byte_limit(dep(total_timeout=3.0)) == 3.0
    assert dispatch.first_byte_limit(dep(first_byte_timeout=5.0, total_timeout=3.0)) == 3.0
    assert dispatch.total_limit(dep(total_timeout=3.0)) == 3.0


def test_a_hops_limits_override_the_providers() -> None:
    d = dep(hop=HopTimeouts(connect=0.2, first_byte=2.0, total=10.0), first_byte_timeout=30.0, total_timeout=60.0)
    assert dispatch.first_byte_limit(d) == 2.0 and dispatch.total_limit(d) == 10.0
    # A limit the hop leaves empty is the provider's.
    d = dep(hop=HopTimeouts(first_byte=2.0), total_timeout=1.5)
    assert dispatch.first_byte_limit(d) == 1.5 and dispatch.total_limit(d) == 1.5


def test_the_hops_connect_timeout_reaches_the_http_client() -> None:
    base = provider(connect_timeout=5.0, read_timeout=600.0)
    assert UpstreamCall(provider=base, upstream_model="m", body={}).timeout.connect == 5.0
    hop = UpstreamCall(provider=base, upstream_model="m", body={}, connect_timeout=0.5).timeout
    assert hop.connect == 0.5 and hop.read == 600.0


def test_the_probe_request_is_the_providers_or_a_one_token_ping() -> None:
    route = ModelRoute(
        id=1, name="pub", kind="chat", owned_by="x", created=0, context_window=1, max_output_tokens=1, deployments=()
    )
    call = health.probe_call(route, dep())
    assert call.body == {**health.DEFAULT_PROBE, "model": "m"}
    custom = dep(probe=ProbeSettings(enabled=True, request={"messages": [], "max_tokens": 3, "stream": True}))
    assert health.probe_call(route, custom).body == {"messages": [], "max_tokens": 3, "model": "m"}
    embedding = ModelRoute(
        id=2, name="e", kind="embedding", owned_by="x", created=0, context_window=1, max_output_tokens=1, deployments=()
    )
    assert health.probe_call(embedding, dep()).body == {"input": "ping", "model": "m"}


def test_a_latency_outlier_is_ejected_only_against_a_measured_sibling() -> None:
    slow, fast = dep(1, outlier_latency_factor=3.0), dep(2, outlier_latency_factor=3.0)
    pool = (slow, fast)

    async def scenario() -> list[bool]:
        ejected = []
        for _ in range(health.OUTLIER_MIN_SAMPLES):  # no sibling measured yet: never an outlier
            ejected.append(await health.observe(pool, slow, 1.0))
        for _ in range(health.OUTLIER_MIN_SAMPLES - 1):
            ejected.append(await health.observe(pool, fast, 0.1))
        ejected.append(await health.observe(pool, slow, 1.0))  # the sibling has 9 answers: not yet
        ejected.append(await health.observe(pool, fast, 0.1))
        ejected.append(await health.observe(pool, slow, 1.0))  # 1.0 s > 3 x 0.1 s: ejected
        return ejected

    ejected = asyncio.run(scenario())
    assert ejected[-1] is True and not any(ejected[:-1])
    assert asyncio.run(breaker.snapshot("d1")).state() == "open"
    assert asyncio.run(breaker.snapshot("d2")).state() == "closed"
    assert "latency outlier" in health.records.local["d1"]["ejected_reason"]
    assert health.latency_of(slow) == (0.0, 0)  # a fresh average after the ejection


def test_no_ejection_when_off_or_within_the_factor() -> None:
    off, fast = dep(1), dep(2)
    within = dep(3, outlier_latency_factor=20.0)

    async def scenario() -> list[bool]:
        results = []
        for _ in range(health.OUTLIER_MIN_SAMPLES + 2):
            await health.observe((off, fast, within), fast, 0.1)
            results.append(await health.observe((off, fast, within), off, 1.0))
            results.append(await health.observe((off, fast, within), within, 1.0))
        return results

    assert not any(asyncio.run(scenario()))
