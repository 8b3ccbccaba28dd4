"""The route a policy decision makes is planned once per route table snapshot
(``gateway.pipeline.route._planned``): the same answer as planning it afresh, with the candidates'
breaker state read per request, and nothing kept from an older snapshot."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from bench.routing import _example_table
from gateway.pipeline import route
from gateway.routing import breaker
from gateway.routing.policy import evaluate

KINDS = ("chat",)


@pytest.fixture(autouse=True)
def _clean(settings) -> Iterator[None]:
    settings.CHITTYCAN_MODE = "prod"
    breaker.reset_local()
    yield
    breaker.reset_local()


def decision_for(table, tokens: int):
    policy = next(iter(table.policies.by_name.values()))
    return evaluate([policy], {"tokens": tokens})


def test_a_planned_route_equals_a_fresh_plan_and_is_computed_once_per_snapshot(settings) -> None:
    settings.REDIS_URL = ""
    table = _example_table(True)
    base = table.resolve("openai/gpt-4")
    for tokens in (10, 300, 900):  # each rule of the roadmap policy
        decision = decision_for(table, tokens)
        first = route._planned(decision, table, base, KINDS)
        again = route._planned(decision, table, base, KINDS)
        assert first == route._plan(decision, table, base, KINDS)  # the same as planning afresh
        assert again[0] is first[0]  # planned once
        assert again[1] == first[1] and all(a is not b for a, b in zip(again[1], first[1], strict=True))
        first[1][0]["mutated"] = True  # a request's explanation is its own
        assert "mutated" not in route._planned(decision, table, base, KINDS)[1][0]
    newer = _example_table(True)  # a new snapshot (a configuration change): planned again
    decision = decision_for(newer, 10)
    assert route._planned(decision, newer, newer.resolve("openai/gpt-4"), KINDS)[0] is not first[0]


def test_the_candidates_breaker_state_is_read_per_request(settings) -> None:
    settings.REDIS_URL = ""
    table = _example_table(True)
    base = table.resolve("openai/gpt-4")
    decision = decision_for(table, 10)
    routed, candidates, _ = route._planned(decision, table, base, KINDS)
    assert not any("skipped" in c for c in candidates), candidates
    cheap = routed.deployments[0]
    until = time.time() + 30
    breaker._remember(breaker.breaker_id(cheap), breaker.Snapshot(True, until, 3, 1, breaker.OPENED_BY_FAILURES))
    _, now, _ = route._planned(decision, table, base, KINDS)
    assert now[0]["skipped"] == "breaker open" and now[0]["reason"] == "consecutive failures", now
    assert now == route._plan(decision, table, base, KINDS)[1]


@pytest.mark.django_db(transaction=True)
def test_the_budget_check_reads_the_live_counters_from_redis(tenant_key, settings) -> None:
    """``budget_left`` and ``budget_used`` (the over-budget check and the ``budget_used`` variable)
    read the tenant's money counters with one MGET on the event loop's client: a value spent in
    Redis shows in both; an unbuilt counter counts as nothing spent."""
    import asyncio

    import redis as redis_lib
    from django.utils import timezone

    from budgets import counters, services
    from budgets import service as budget_service
    from budgets.periods import counters_for
    from core import runtime
    from gateway.auth import authenticate

    assert settings.REDIS_URL  # the suite's real Redis
    tenant, raw_key = tenant_key
    services.budget_put(tenant=tenant, period="month", limit_micro=4_000_000)

    async def authenticated() -> Any:
        try:
            return await authenticate(raw_key)
        finally:
            await runtime.close_redis()

    key = asyncio.run(authenticated())

    async def read() -> tuple[int | None, float]:
        try:
            return await route.budget_left(key), await route.budget_used(key)
        finally:
            await runtime.close_redis()

    assert asyncio.run(read()) == (4_000_000, 0.0)  # not built: nothing spent
    budgets = asyncio.run(budget_service.budgets_for(key))
    [counter] = [c for c in counters_for(key, budgets, timezone.now()) if c.kind == "m"]
    conn = redis_lib.Redis.from_url(settings.REDIS_URL)
    try:
        conn.set(counters.counter_key(key.root_id, counter.name), 3_000_000)
        assert asyncio.run(read()) == (1_000_000, 0.75)
    finally:
        conn.delete(counters.counter_key(key.root_id, counter.name))
        conn.close()
