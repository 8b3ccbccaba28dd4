"""The circuit breaker in embedded mode (state in this process, no Redis), its classification of
errors, full-jitter backoff and the retry budget (gateway.routing.breaker, gateway.pipeline.dispatch)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest

from core import runtime
from gateway.errors import UpstreamError, upstream_status_error
from gateway.pipeline import dispatch
from gateway.providers.base import BreakerSettings, ProviderConfig
from gateway.routing import breaker
from gateway.routing.table import DeploymentRoute


@pytest.fixture(autouse=True)
def embedded(settings: Any) -> Iterator[None]:
    settings.REDIS_URL = ""
    settings.CHITTYCAN_BREAKER_CACHE_TTL = 1.0
    settings.CHITTYCAN_RETRY_BUDGET_RATIO = 0.2
    settings.CHITTYCAN_RETRY_BUDGET_BURST = 2.0
    breaker.reset_local()
    yield
    breaker.reset_local()


def deployment(dep_id: int | None = 1, **cfg: Any) -> DeploymentRoute:
    provider = ProviderConfig(
        id=1,
        slug="p",
        kind="openai",
        base_url="https://example.com/v1",
        breaker=BreakerSettings(**{"failures": 3, "cooldown": 0.2, **cfg}),
    )
    return DeploymentRoute(id=dep_id, provider=provider, upstream_model="m")


DOWN = upstream_status_error(500, "down")


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_errors_are_classified_for_the_breaker() -> None:
    assert breaker.outcome_of(None) == "success"
    assert breaker.outcome_of(upstream_status_error(500, "x")) == "failure"
    assert breaker.outcome_of(upstream_status_error(529, "overloaded")) == "failure"
    assert breaker.outcome_of(UpstreamError("timed out", retryable=True, status=504, code="timeout")) == "failure"
    assert breaker.outcome_of(upstream_status_error(401, "bad key")) == "failure"  # our credentials
    assert breaker.outcome_of(upstream_status_error(429, "slow down")) == "neutral"
    assert breaker.outcome_of(upstream_status_error(400, "bad request")) == "success"


def test_consecutive_failures_open_then_one_probe_closes() -> None:
    async def scenario() -> None:
        dep = deployment()
        for _ in range(2):
            admission = await breaker.admit(dep)
            assert admission is not None and not admission.probe
            await breaker.record(dep, admission, DOWN)
        ok = await breaker.admit(dep)
        await breaker.record(dep, ok, None)  # a success in between: the count starts again
        for _ in range(3):
            await breaker.record(dep, await breaker.admit(dep), DOWN)
        assert await breaker.admit(dep) is None  # open: skipped
        assert breaker.known_open(dep)
        await asyncio.sleep(0.25)
        probe = await breaker.admit(dep)
        assert probe is not None and probe.probe
        assert await breaker.admit(dep) is None  # one probe at a time
        await breaker.record(dep, probe, None)
        after = await breaker.admit(dep)
        assert after is not None and not after.probe
        assert (await breaker.snapshot(breaker.breaker_id(dep))).state() == "closed"

    run(scenario())


def test_a_failed_probe_reopens_and_a_429_never_opens() -> None:
    async def scenario() -> None:
        dep = deployment()
        for _ in range(3):
            await breaker.record(dep, await breaker.admit(dep), DOWN)
        await asyncio.sleep(0.25)
        probe = await breaker.admit(dep)
        assert probe is not None and probe.probe
        await breaker.record(dep, probe, DOWN)
        assert await breaker.admit(dep) is None
        assert (await breaker.snapshot(breaker.breaker_id(dep))).opened == 2

        other = deployment(dep_id=2)
        for _ in range(20):
            admission = await breaker.admit(other)
            assert admission is not None
            await breaker.record(other, admission, upstream_status_error(429, "slow down"))

    run(scenario())


def test_the_error_rate_opens_it_before_the_consecutive_count() -> None:
    async def scenario() -> None:
        dep = deployment(failures=1000, error_rate=0.5, min_requests=10, window=30)
        for i in range(10):  # alternate: never 2 failures in a row, but 50 % of 10
            await breaker.record(dep, await breaker.admit(dep), DOWN if i % 2 else None)
        assert await breaker.admit(dep) is None

    run(scenario())


def test_deployments_do_not_share_breakers() -> None:
    assert breaker.breaker_id(deployment(1)) != breaker.breaker_id(deployment(2))
    assert breaker.breaker_id(deployment(None)) == "pp:m"


def test_the_retry_budget_allows_a_share_of_requests() -> None:
    admission = breaker.Admission("d9")
    spent = 0
    for _ in range(20):
        breaker.budget_deposit(admission)
        while breaker.budget_spend(admission):
            spent += 1
    assert 2 + 3 <= spent <= 2 + 4  # the burst, then 0.2 per request


def test_backoff_has_full_jitter_and_a_429_with_fallback_moves_on() -> None:
    err = upstream_status_error(502, "bad gateway")
    waits = [dispatch._delay(3, err, fallback=False) for _ in range(400)]
    assert all(w is not None and 0 <= w <= 0.8 for w in waits)
    assert min(w for w in waits if w is not None) < 0.1  # full jitter reaches down to ~0
    limited = upstream_status_error(429, "slow down")
    limited.headers["retry-after"] = "1"
    assert dispatch._delay(0, limited, fallback=True) is None
    assert dispatch._delay(0, limited, fallback=False) == 1.0
    limited.headers["retry-after"] = "30"
    assert dispatch._delay(0, limited, fallback=False) is None


def test_the_calm_weather_reads_state_once_per_ttl() -> None:
    async def scenario() -> None:
        dep = deployment()
        started = time.monotonic()
        for _ in range(500):
            await breaker.record(dep, await breaker.admit(dep), None)
        assert time.monotonic() - started < 1.0
        assert breaker.reads == 1

    run(scenario())


def test_an_unreachable_redis_lets_requests_through(settings: Any) -> None:
    settings.REDIS_URL = "redis://127.0.0.1:1/0"  # nothing listens on port 1: refused at once

    async def scenario() -> None:
        dep = deployment()
        try:
            for _ in range(5):
                admission = await breaker.admit(dep)
                assert admission is not None and not admission.probe
                await breaker.record(dep, admission, DOWN)  # not written; never raises
            assert await breaker.admit(dep) is not None
        finally:
            await runtime.close_redis()

    run(scenario())


def test_half_open_admits_the_probe_only_to_a_request_that_may_take_it() -> None:
    async def scenario() -> None:
        dep = deployment()
        assert await breaker.admit(dep, may_probe=False) is not None  # closed: anyone goes through
        for _ in range(3):
            await breaker.record(dep, await breaker.admit(dep), DOWN)
        assert await breaker.admit(dep, may_probe=False) is None
        assert breaker.cached_state(dep) == "open"
        await asyncio.sleep(0.25)
        # Half-open: a request that may not probe (a stream with a fallback left) skips it and
        # leaves the lease free ...
        assert await breaker.admit(dep, may_probe=False) is None
        assert breaker.cached_state(dep) == "half_open" and not breaker.probe_busy(dep)
        # ... for the next request that may (negative control: the same call with may_probe True).
        probe = await breaker.admit(dep)
        assert probe is not None and probe.probe and breaker.probe_busy(dep)
        await breaker.record(dep, probe, None)
        assert breaker.cached_state(dep) == "closed"

    run(scenario())


def test_a_published_state_change_updates_only_the_breaker_cache() -> None:
    from core import invalidation

    dep = deployment(7)
    ident = breaker.breaker_id(dep)
    dropped: list[int] = []

    def drop() -> None:
        dropped.append(1)

    invalidation.subscribe(drop)
    try:
        breaker._remember(ident, breaker.CLOSED)
        until = time.time() + 30
        invalidation.deliver(f"brk\t{ident}\topen\t{until!r}\t3\t1\tconsecutive failures".encode())
        assert breaker.cached_state(dep) == "open" and dropped == []  # no other cache dropped
        assert breaker.skip_reason(dep) == ("breaker open", "consecutive failures")
        invalidation.deliver(f"brk\t{ident}\tclosed\t0\t0\t1\tconsecutive failures".encode())
        assert breaker.cached_state(dep) == "closed" and breaker.transitions_seen == {ident: 2}
        # Malformed: ignored (the cache keeps what it had), never raised into the listener.
        invalidation.deliver(f"brk\t{ident}\topen".encode())
        invalidation.deliver(b"brk\t\xff\xfe")
        invalidation.deliver(f"brk\t{ident}\topen\tsoon\t3\t1\tx".encode())
        assert breaker.cached_state(dep) == "closed" and breaker.transitions_seen == {ident: 2}
        # A configuration change (or a topic nobody here handles) still drops every cache.
        invalidation.deliver(b"config")
        invalidation.deliver(b"nobody\tpayload")
        assert dropped == [1, 1]
    finally:
        invalidation._subscribers.remove(drop)
