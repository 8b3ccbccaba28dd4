"""Load-balancing strategies (gateway.routing.strategy): the order a model's deployments are tried in."""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from core.money import PriceInfo
from gateway.providers.base import ProviderConfig
from gateway.routing import inflight, latency
from gateway.routing.strategy import HOP, order
from gateway.routing.table import DeploymentRoute, ModelRoute, deployment_ident


def dep(slug: str, priority: int = 0, weight: int = 1, id_: int | None = None) -> DeploymentRoute:
    provider = ProviderConfig(id=1, slug=slug, kind="openai", base_url="http://127.0.0.1:1/v1")
    return DeploymentRoute(id=id_, provider=provider, upstream_model="m", priority=priority, weight=weight)


def price(inp: str, out: str) -> tuple[PriceInfo, ...]:
    when = datetime(2020, 1, 1, tzinfo=UTC)
    return (PriceInfo(when, Decimal(inp), Decimal(inp), Decimal(inp), Decimal(out)),)


def route(*deps: DeploymentRoute, **extra: object) -> ModelRoute:
    return ModelRoute(
        id=1,
        name="m",
        kind="chat",
        owned_by="x",
        created=0,
        context_window=1000,
        max_output_tokens=100,
        deployments=deps,
        prices=price("1", "2"),
        **extra,  # type: ignore[arg-type]
    )


def key(d: DeploymentRoute) -> str:
    return d.provider.slug


def slugs(r: ModelRoute) -> list[str]:
    return [d.provider.slug for d in r.ordered_deployments()]


def test_priority_is_left_as_it_is() -> None:
    r = route(dep("b", priority=1), dep("a", priority=0))
    assert order(r, "priority", key_of=key) is r
    assert slugs(r) == ["a", "b"]


def test_weighted_ignores_priorities() -> None:
    r = route(dep("a", priority=0, weight=1), dep("b", priority=5, weight=3))
    firsts = Counter(slugs(order(r, "weighted", key_of=key))[0] for _ in range(2000))
    assert 0.68 < firsts["b"] / 2000 < 0.82


def test_lowest_latency_first_and_unmeasured_first() -> None:
    latency.reset()
    latency.observe("slow", 900)
    latency.observe("fast", 100)
    r = route(dep("slow"), dep("fast"))
    assert slugs(order(r, "lowest_latency", key_of=key)) == ["fast", "slow"]
    latency.observe("fast", 5000)  # decaying: one slow answer moves it, not all the way
    assert latency.ewma("fast") == 100 + 0.2 * (5000 - 100)
    assert slugs(order(r, "lowest_latency", key_of=key)) == ["slow", "fast"]
    assert slugs(order(route(dep("slow"), dep("new")), "lowest_latency", key_of=key))[0] == "new"
    latency.reset()


def test_lowest_cost_across_a_policy_routes_models_within_each_hop() -> None:
    dear, cheap, later = dep("dear", id_=1), dep("cheap", id_=2), dep("later", priority=HOP, id_=3)
    # "dear" is the model's own ($1 / $2 per M); "cheap" belongs to another model of the route.
    r = route(dear, cheap, later, hop_prices=((deployment_ident(cheap), price("0.1", "0.1")),))
    ordered = order(r, "lowest_cost", key_of=key, prompt_tokens=1000, output_tokens=100)
    assert slugs(ordered) == ["cheap", "dear", "later"]  # the fallback hop stays last


def test_least_in_flight_fewest_first_within_each_hop() -> None:
    busy, idle, later = dep("busy", weight=1000), dep("idle", weight=1), dep("later", priority=HOP)
    r = route(busy, idle, later)
    counts = {"busy": 3, "idle": 1, "later": 0}
    for _ in range(50):  # the weights only break ties
        assert slugs(order(r, "least_in_flight", key_of=key, in_flight=counts)) == ["idle", "busy", "later"]
    # Equal (or unknown) counts: the weighted order.
    firsts = Counter(slugs(order(r, "least_in_flight", key_of=key, in_flight={}))[0] for _ in range(500))
    assert firsts["busy"] > 450


def test_least_in_flight_local_counts_without_redis(settings: Any) -> None:
    settings.REDIS_URL = ""
    inflight.reset_local()

    async def scenario() -> list[dict[str, int]]:
        seen = [await inflight.counts(["a", "b"])]
        one = await inflight.start("a")
        two = await inflight.start("a")
        three = await inflight.start("b")
        seen.append(await inflight.counts(["a", "b"]))
        for slot in (one, two, three):
            await inflight.end(slot)
        await inflight.end(one)  # a second end never counts below zero
        seen.append(await inflight.counts(["a", "b"]))
        return seen

    assert asyncio.run(scenario()) == [{"a": 0, "b": 0}, {"a": 2, "b": 1}, {"a": 0, "b": 0}]
