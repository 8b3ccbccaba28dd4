"""The route a policy decision makes is planned once per route table snapshot
(``gateway.pipeline.route._planned``): the same answer as planning it afresh, with the candidates'
breaker state read per request, and nothing kept from an older snapshot."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from bench.routing import _example_table
from gateway.pipeline import route
from gateway.routing import breaker
from gateway.routing.policy import evaluate

KINDS = ("chat",)


@pytest.fixture(autouse=True)
def _clean(settings) -> Iterator[None]:
    settings.REDIS_URL = ""
    settings.CHITTYCAN_MODE = "prod"
    breaker.reset_local()
    yield
    breaker.reset_local()


def decision_for(table, tokens: int):
    policy = next(iter(table.policies.by_name.values()))
    return evaluate([policy], {"tokens": tokens})


def test_a_planned_route_equals_a_fresh_plan_and_is_computed_once_per_snapshot() -> None:
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


def test_the_candidates_breaker_state_is_read_per_request() -> None:
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
